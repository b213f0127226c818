"""Resumable streams: one safetensors file holds a stream's weights, state, position and config.

A stream stopped in one framework resumes in either: ``save_stream`` takes a
``jax_impl.Stateful`` (over an LSTM, GRU, RNN or ConvLSTM) or a torch_impl stateful module
(StatefulLSTM, StatefulGRU, StatefulRNN, StatefulConvLSTM, or a StatefulWrapper around nn.LSTM,
nn.GRU, nn.RNN or ConvLSTM2d); ``load_stream`` rebuilds it as either.

File format (``format_version`` 1), one safetensors file:

- tensors ``param.<torch name>``: the weights under torch's names and layouts
  (``param.weight_ih_l0``, ...), in the parameters' dtype;
- tensors ``state.h`` and ``state.c``: the carried ``(h, c)`` of an LSTM or ConvLSTM in
  torch's layout (``(L*D, B, H_out)``, or ``(L, B, C, H, W)`` for the ConvLSTM); a GRU or RNN
  carries one tensor, ``state.h`` alone (``(L*D, B, H)``); absent when no state is carried
  (``state`` metadata ``"none"``). Unbatched streams drop the B axis;
- metadata (strings): ``format`` (``"carryover.stream"``), ``format_version``, ``kind``
  (``"lstm"``, ``"gru"``, ``"rnn"`` or ``"convlstm"``), ``config`` (JSON of the torch
  constructor options; an RNN's ``nonlinearity`` among them), ``dtype``, ``state`` (``"hc"``
  for an LSTM or ConvLSTM, ``"h"`` for a GRU or RNN, or ``"none"``; files written before GRU
  and RNN streams existed read as before), ``position`` (JSON: steps consumed, or null),
  ``stream`` (JSON of the stateful wrapper's options), ``jax`` (JSON of the JAX-only module
  options, so a JAX stream resumes with the same compiled program), and ``sha256``: a digest
  of all the other metadata and of every tensor's name, dtype, shape and bytes, so a
  corrupted file is refused rather than resumed.

The write is atomic: a temporary file in the same directory, fsync, ``os.replace``; a crash
mid-save leaves the previous file as it was.

Example:
    >>> stream = torch_impl.StatefulLSTM(3, 8)
    >>> y = stream(torch.randn(2, 100, 3))
    >>> path = save_stream(stream, "run.safetensors", position=100)
    >>> jax_stream, position = load_stream("run.safetensors", "jax")
    >>> position
    100
    >>> y_next = jax_stream(jnp.ones((2, 10, 3)))                      # continues the stream
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import torch
from torch import nn

import jax_impl
import torch_impl

from .convert import (
    jax_params_as_torch,
    spec_for_jax,
    spec_for_torch,
    state_to_torch,
    stream_to_jax,
    tensor_to_numpy,
    torch_param_arrays,
)
from .mapping import ModuleSpec

__all__ = [
    "StreamCheckpoint", "save_stream", "load_stream", "read_checkpoint", "snapshot", "check_matches",
    "atomic_write",
]

FORMAT = "carryover.stream"
FORMAT_VERSION = 1
STREAM_KINDS = ("lstm", "gru", "rnn", "convlstm")
# The ``state`` metadata of a checkpoint holding a state, by kind: which tensors it has.
STATE_FIELDS = {"lstm": "hc", "gru": "h", "rnn": "h", "convlstm": "hc"}
PathLike = Union[str, os.PathLike]

# Bytes per write call; a module attribute so a test can make a save crash half-way.
_CHUNK_BYTES = 1 << 20


@dataclass
class StreamCheckpoint:
    """The content of a stream checkpoint, framework-neutral (numpy arrays, torch layouts).

    Attributes:
        kind: ``"lstm"``, ``"gru"``, ``"rnn"`` or ``"convlstm"``.
        config: torch constructor options (``input_size``, ``hidden_size``, ... (an RNN's
            ``nonlinearity`` too) or ``input_channels``, ``hidden_channels``, ``kernel_size``,
            ...).
        dtype: the parameters' dtype name (``"float32"``, ``"float64"``).
        params: torch parameter name -> array.
        state: the carried state in torch's layout as a tuple: ``(h, c)`` for an LSTM or
            ConvLSTM, ``(h,)`` for a GRU or RNN; None when no state is carried.
        position: steps consumed when saved, or None if the caller did not say.
        stream: the stateful wrapper's options (``detach``).
        jax: JAX-only module options (``unroll``, ``dtype``, ``precision``).
    """

    kind: str
    config: dict
    dtype: str
    params: dict[str, np.ndarray]
    state: Optional[tuple[np.ndarray, ...]]
    position: Optional[int]
    stream: dict
    jax: dict


# ------------------------------------------------------------------------------ snapshots


def _torch_config(spec: ModuleSpec, get, params: dict[str, np.ndarray]) -> dict:
    """Torch constructor options through the spec's config rules (``get(torch_name)``)."""
    config = {rule.torch: get(rule.torch) for rule in spec.config}
    config.update(spec.torch_sizes(params))
    # JSON-friendly and canonical: pairs as lists, numpy scalars as Python numbers
    return json.loads(json.dumps(config, default=lambda v: v.item() if hasattr(v, "item") else list(v)))


def _one_dtype(params: dict[str, np.ndarray]) -> str:
    dtypes = sorted({str(a.dtype) for a in params.values()})
    if len(dtypes) != 1:
        raise TypeError(f"parameters have mixed dtypes {dtypes}; expected one dtype")
    return dtypes[0]


def _stream_spec(spec: ModuleSpec, what: str) -> ModuleSpec:
    if spec.kind not in STREAM_KINDS:
        raise TypeError(
            f"{what} is a {spec.kind}; a stream checkpoint holds an LSTM, GRU, RNN or ConvLSTM"
        )
    return spec


def _state_arrays(state: Any) -> Optional[tuple[np.ndarray, ...]]:
    """A carried state (``(h, c)``, or the one tensor / array ``h``) as a tuple of numpy
    copies; None stays None."""
    if state is None:
        return None
    parts = tuple(state) if isinstance(state, (tuple, list)) else (state,)
    return tuple(
        tensor_to_numpy(t).copy() if isinstance(t, torch.Tensor) else np.array(t) for t in parts
    )


def _jax_options(module: Any) -> dict:
    """The JAX-only options that shape the compiled program, JSON-ready."""
    precision = module.precision
    if isinstance(precision, jax.lax.Precision):
        precision = {"enum": precision.name}
    elif precision is not None and not isinstance(precision, str):
        raise TypeError(
            f"precision {precision!r} cannot be saved; expected None, a string or a "
            "jax.lax.Precision"
        )
    dtype = None if module.dtype is None else jnp.dtype(module.dtype).name
    return {"unroll": module.unroll, "dtype": dtype, "precision": precision}


def _snapshot_jax(stream: jax_impl.Stateful, position: Optional[int]) -> StreamCheckpoint:
    module = stream.module
    spec = _stream_spec(spec_for_jax(module), type(module).__name__)
    params = jax_params_as_torch(module, stream.variables)

    def get(name: str):
        rule = next(r for r in spec.config if r.torch == name)
        value = getattr(module, rule.jax)
        return rule.to_torch(value) if rule.to_torch else value

    state = _state_arrays(state_to_torch(spec, stream.carry))
    return StreamCheckpoint(
        spec.kind, _torch_config(spec, get, params), _one_dtype(params), params, state,
        position, {"detach": True}, _jax_options(module),
    )  # fmt: skip


def _snapshot_torch(stream: torch_impl.StatefulWrapper, position: Optional[int]) -> StreamCheckpoint:
    module = stream.module
    spec = _stream_spec(spec_for_torch(module), type(module).__name__)
    params = torch_param_arrays(module)
    state = _state_arrays(stream.get_state())
    return StreamCheckpoint(
        spec.kind, _torch_config(spec, lambda name: getattr(module, name), params),
        _one_dtype(params), params, state, position, {"detach": bool(stream.detach)}, {},
    )  # fmt: skip


def snapshot(stream: Any, position: Optional[int] = None) -> StreamCheckpoint:
    """A stream's weights, state and configuration as a ``StreamCheckpoint`` (no file).

    Arguments:
        stream: a ``jax_impl.Stateful`` (over an LSTM, GRU, RNN or ConvLSTM) or a torch_impl
            stateful module (StatefulLSTM, StatefulGRU, StatefulRNN, StatefulConvLSTM,
            StatefulWrapper).
        position: steps consumed so far (int >= 0) or None.

    Returns:
        The ``StreamCheckpoint``; arrays are copies in torch's layout, the state a tuple
        (``(h, c)``, or ``(h,)`` for a GRU or RNN).

    Example:
        >>> snapshot(torch_impl.StatefulLSTM(3, 8)).config["hidden_size"]
        8
    """
    if position is not None:
        if not isinstance(position, (int, np.integer)) or isinstance(position, bool):
            raise TypeError(f"position must be an int or None, got {type(position).__name__}")
        if position < 0:
            raise ValueError(f"position must be >= 0 (steps consumed), got {position}")
        position = int(position)
    if isinstance(stream, jax_impl.Stateful):
        return _snapshot_jax(stream, position)
    if isinstance(stream, torch_impl.StatefulWrapper):
        return _snapshot_torch(stream, position)
    raise TypeError(
        "save_stream needs a jax_impl.Stateful or a torch_impl stateful module (StatefulLSTM, "
        f"StatefulGRU, StatefulRNN, StatefulConvLSTM, StatefulWrapper), got "
        f"{type(stream).__name__}"
    )


# ------------------------------------------------------------------------------ file format


def _digest(metadata: dict[str, str], tensors: dict[str, np.ndarray]) -> str:
    """sha256 of the metadata (but the digest itself) and of each tensor's name, dtype, shape, bytes."""
    digest = hashlib.sha256()
    fields = {k: v for k, v in metadata.items() if k != "sha256"}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _encode(checkpoint: StreamCheckpoint) -> bytes:
    """The safetensors bytes of a checkpoint, digest included."""
    tensors = {f"param.{name}": np.ascontiguousarray(a) for name, a in checkpoint.params.items()}
    state_field = "none"
    if checkpoint.state is not None:
        state_field = STATE_FIELDS[checkpoint.kind]
        if len(checkpoint.state) != len(state_field):
            raise ValueError(
                f"a {checkpoint.kind} stream's state has {len(state_field)} tensor(s) "
                f"({', '.join(state_field)}), got {len(checkpoint.state)}"
            )
        for name, array in zip(state_field, checkpoint.state):
            tensors[f"state.{name}"] = np.ascontiguousarray(array)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": checkpoint.kind,
        "config": json.dumps(checkpoint.config, sort_keys=True),
        "dtype": checkpoint.dtype,
        "state": state_field,
        "position": json.dumps(checkpoint.position),
        "stream": json.dumps(checkpoint.stream, sort_keys=True),
        "jax": json.dumps(checkpoint.jax, sort_keys=True),
    }
    metadata["sha256"] = _digest(metadata, tensors)
    return safetensors.numpy.save(tensors, metadata=metadata)


def _write_chunk(file, chunk: memoryview) -> None:
    """One write call (a seam for the crash-during-save test)."""
    file.write(chunk)


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable; best effort (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_replace(path: PathLike) -> Iterator[str]:
    """Yields a temporary file name beside ``path``; once the block has written it, the file is
    fsynced and renamed over ``path`` (all of it or, after a crash, the old file). On any
    error the temporary file is removed and the error re-raised.

    The same directory makes ``os.replace`` a rename on one file system.

    Example:
        >>> with atomic_replace("state.bin") as tmp:
        ...     _ = open(tmp, "wb").write(b"...")
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp makes it 0600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def atomic_write(path: PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (see ``atomic_replace``).

    Arguments:
        path: the destination.
        data: the bytes.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> atomic_write("state.bin", b"...").name
        'state.bin'
    """
    with atomic_replace(path) as tmp, open(tmp, "wb") as file:
        view = memoryview(data)
        for start in range(0, len(view), _CHUNK_BYTES):
            _write_chunk(file, view[start : start + _CHUNK_BYTES])
    return Path(path)


def save_stream(stream: Any, path: PathLike, *, position: Optional[int] = None) -> Path:
    """Saves a stream (weights, carried state, position, configuration) to one safetensors file.

    Arguments:
        stream: a ``jax_impl.Stateful`` (of an LSTM, GRU, RNN or ConvLSTM) or a torch_impl
            stateful module (StatefulLSTM, StatefulGRU, StatefulRNN, StatefulConvLSTM,
            StatefulWrapper around nn.LSTM, nn.GRU, nn.RNN or ConvLSTM2d).
        path: the file; replaced atomically if it exists.
        position: steps consumed so far (you track it), or None; ``load_stream`` returns it.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> lstm = jax_impl.LSTM(8)
        >>> x = jnp.ones((2, 600, 3))
        >>> stream = jax_impl.Stateful(lstm, jax.jit(lstm.init)(jax.random.key(0), x[:, :1]))
        >>> y = stream(x[:, :500])
        >>> save_stream(stream, "ckpt.safetensors", position=500).name
        'ckpt.safetensors'
    """
    return atomic_write(path, _encode(snapshot(stream, position)))


# ------------------------------------------------------------------------------ reading


def _header(data: bytes, name: str) -> dict:
    """The safetensors JSON header, with clear errors for truncated or corrupt files."""
    if len(data) < 8:
        raise ValueError(
            f"{name} has {len(data)} bytes, expected at least 8 (a safetensors header): truncated"
        )
    size = int.from_bytes(data[:8], "little")
    if 8 + size > len(data):
        raise ValueError(
            f"{name} has {len(data)} bytes, expected at least {8 + size} (its header length "
            f"{size}): truncated or corrupted"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name} has a corrupted safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name} has a corrupted safetensors header (not a JSON object)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, ValueError, IndexError) as error:
        raise ValueError(f"{name} has a corrupted safetensors header ({error!r})") from None
    if len(data) != 8 + size + end:
        raise ValueError(
            f"{name} has {len(data)} bytes, expected {8 + size + end} from its header: "
            "truncated or corrupted"
        )
    return header


def _json_field(metadata: dict, key: str, name: str):
    try:
        return json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{name}: metadata field {key!r} is missing or not JSON") from None


def read_checkpoint(path: PathLike) -> StreamCheckpoint:
    """Reads and verifies a stream checkpoint (format, version, checksum), without building a module.

    Arguments:
        path: a file written by ``save_stream``.

    Returns:
        The ``StreamCheckpoint``.

    Raises:
        ValueError: the file is truncated, corrupted (checksum mismatch), not a stream
            checkpoint, or of an unsupported format version.

    Example:
        >>> path = save_stream(torch_impl.StatefulGRU(3, 8), "ckpt.safetensors", position=500)
        >>> read_checkpoint(path).position
        500
    """
    name = os.fspath(path)
    data = Path(path).read_bytes()
    metadata = _header(data, name).get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        got = metadata.get("format") if isinstance(metadata, dict) else None
        raise ValueError(f"{name} is not a stream checkpoint: format {got!r}, expected {FORMAT!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{name} has format_version {metadata.get('format_version')!r}, expected "
            f"{str(FORMAT_VERSION)!r}"
        )
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as error:  # safetensors raises its own error type
        raise ValueError(f"{name} is not a readable safetensors file ({error})") from None
    stored, computed = metadata.get("sha256"), _digest(metadata, tensors)
    if stored != computed:
        raise ValueError(
            f"{name} failed its checksum: stored sha256 {str(stored)[:16]}..., computed "
            f"{computed[:16]}...: the file is corrupted"
        )

    kind = metadata.get("kind")
    if kind not in STREAM_KINDS:
        raise ValueError(f"{name} holds kind {kind!r}, expected one of {STREAM_KINDS}")
    state_field = metadata.get("state")
    if state_field not in ("none", STATE_FIELDS[kind]):
        raise ValueError(
            f"{name} holds state {state_field!r}, expected {STATE_FIELDS[kind]!r} or 'none' for "
            f"kind {kind!r}"
        )
    state_names = [f"state.{n}" for n in state_field] if state_field != "none" else []
    missing = sorted(set(state_names) - tensors.keys())
    if missing:
        raise ValueError(f"{name} says it holds a state but has no tensors {missing}")
    return StreamCheckpoint(
        kind=kind,
        config=_json_field(metadata, "config", name),
        dtype=metadata.get("dtype", ""),
        params={k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")},
        state=tuple(tensors[n] for n in state_names) if state_names else None,
        position=_json_field(metadata, "position", name),
        stream=_json_field(metadata, "stream", name),
        jax=_json_field(metadata, "jax", name),
    )


# ------------------------------------------------------------------------------ rebuilding


def _expected(expect: Any) -> tuple[str, dict, Optional[str]]:
    """``(kind, torch options, dtype)`` of a module or stream to match against a checkpoint."""
    if isinstance(expect, jax_impl.Stateful):
        found = snapshot(expect)
        return found.kind, found.config, found.dtype
    if isinstance(expect, torch_impl.StatefulWrapper):
        found = snapshot(expect)
        return found.kind, found.config, found.dtype
    if isinstance(expect, nn.Module):
        spec = _stream_spec(spec_for_torch(expect), type(expect).__name__)
        params = torch_param_arrays(expect)
        return spec.kind, _torch_config(spec, lambda n: getattr(expect, n), params), _one_dtype(params)
    try:
        spec = _stream_spec(spec_for_jax(expect), type(expect).__name__)
    except TypeError:
        raise TypeError(
            "expect must be a stream or a module (jax_impl.Stateful / LSTM / GRU / RNN / ConvLSTM, "
            "torch_impl stateful module, nn.LSTM, nn.GRU, nn.RNN, ConvLSTM2d), got "
            f"{type(expect).__name__}"
        ) from None
    config = {}
    for rule in spec.config:  # a bare JAX module: no input size (that lives in its variables)
        value = getattr(expect, rule.jax)
        config[rule.torch] = rule.to_torch(value) if rule.to_torch else value
    config = json.loads(json.dumps(config, default=list))
    return spec.kind, config, jnp.dtype(expect.param_dtype).name


def check_matches(checkpoint: StreamCheckpoint, expect: Any, name: str = "checkpoint") -> None:
    """ValueError naming every option where ``checkpoint`` differs from ``expect``.

    Arguments:
        checkpoint: from ``read_checkpoint``.
        expect: a stream or module of the configuration the caller expects.
        name: how to call the checkpoint in messages (its path).

    Example:
        >>> path = save_stream(torch_impl.StatefulLSTM(3, 8), "ckpt.safetensors")
        >>> check_matches(read_checkpoint(path), torch.nn.LSTM(3, 8, batch_first=True))
    """
    kind, config, dtype = _expected(expect)
    if kind != checkpoint.kind:
        raise ValueError(f"{name} holds kind {checkpoint.kind!r}, expected {kind!r} (from expect)")
    diffs = [
        f"{key}={checkpoint.config.get(key)!r}, expected {value!r}"
        for key, value in config.items()
        if checkpoint.config.get(key) != value
    ]
    if dtype is not None and dtype != checkpoint.dtype:
        diffs.append(f"dtype={checkpoint.dtype}, expected {dtype}")
    if diffs:
        raise ValueError(f"{name} has a different configuration: {'; '.join(diffs)} (from expect)")


_STATEFUL_CLASSES = {
    "lstm": torch_impl.StatefulLSTM,
    "gru": torch_impl.StatefulGRU,
    "rnn": torch_impl.StatefulRNN,
    "convlstm": torch_impl.StatefulConvLSTM,
}


def _torch_dtype(value: Any, name: str) -> torch.dtype:
    """The torch dtype a checkpoint's ``dtype`` field names; ValueError naming the field's value
    otherwise (``"abs"`` names a torch function, not a dtype)."""
    dtype = getattr(torch, value, None) if isinstance(value, str) and value else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"{name} has dtype {value!r}, expected a torch dtype name (e.g. 'float32', 'float64')"
        )
    return dtype


def _torch_stream(checkpoint: StreamCheckpoint, name: str) -> torch_impl.StatefulWrapper:
    """The torch_impl stateful module a checkpoint describes, weights and state loaded."""
    config = dict(checkpoint.config)
    dtype = _torch_dtype(checkpoint.dtype, name)
    detach = bool(checkpoint.stream.get("detach", True))
    try:
        stream = _STATEFUL_CLASSES[checkpoint.kind](detach=detach, dtype=dtype, **config)
    except (TypeError, ValueError) as error:  # an unknown, missing or bad option in the config
        raise ValueError(f"{name} has an unusable config {config}: {error}") from None
    module = stream.module
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in checkpoint.params.items()}
    if expected != got:
        raise ValueError(f"{name} holds parameters {got}, expected {expected} for its config")
    module.load_state_dict(
        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in checkpoint.params.items()}
    )
    if checkpoint.state is not None:
        state = tuple(torch.from_numpy(np.array(a, copy=True)) for a in checkpoint.state)
        try:  # the module's form: (h, c), or the one tensor h
            stream.set_state(state if len(state) == 2 else state[0])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} holds a state that does not fit its config: {error}") from None
    return stream


def _jax_module_options(options: dict) -> dict:
    precision = options.get("precision")
    if isinstance(precision, dict):
        precision = jax.lax.Precision[precision["enum"]]
    return {
        "unroll": options.get("unroll", 1),
        "dtype": options.get("dtype"),
        "precision": precision,
    }


def load_stream(
    path: PathLike, framework: str, *, expect: Any = None
) -> tuple[Any, Optional[int]]:
    """Rebuilds a saved stream in either framework, ready to take the next chunk.

    Arguments:
        path: a file written by ``save_stream``.
        framework: ``"jax"`` (a ``jax_impl.Stateful``; float64 needs x64 mode, e.g. inside
            ``with jax.enable_x64(True):``) or ``"torch"`` (a ``StatefulLSTM``,
            ``StatefulGRU``, ``StatefulRNN`` or ``StatefulConvLSTM`` on the CPU).
        expect: optional module or stream whose configuration the checkpoint must have;
            a mismatch is a ValueError naming each differing option.

    Returns:
        ``(stream, position)``: position as given to ``save_stream`` (None if none was).

    Raises:
        ValueError: bad ``framework``, a truncated or corrupted file, or a configuration
            other than ``expect``'s.

    Example:
        >>> mine = torch_impl.StatefulLSTM(3, 8)
        >>> path = save_stream(mine, "ckpt.safetensors", position=0)
        >>> stream, position = load_stream(path, "torch", expect=mine)
        >>> y = stream(torch.randn(2, 10, 3)[:, position:])
    """
    if framework not in ("jax", "torch"):
        raise ValueError(f"framework must be 'jax' or 'torch', got {framework!r}")
    name = os.fspath(path)
    checkpoint = read_checkpoint(path)
    if expect is not None:
        check_matches(checkpoint, expect, name)
    if framework == "jax" and checkpoint.dtype == "float64" and not jax.config.jax_enable_x64:
        raise TypeError(
            f"{name} holds float64 weights, expected float32 outside JAX's x64 mode: load it "
            "inside `with jax.enable_x64(True):`"
        )
    stream = _torch_stream(checkpoint, name)
    if framework == "torch":
        return stream, checkpoint.position
    converted = stream_to_jax(stream)
    if checkpoint.jax:  # saved from JAX: the same module options, so the same program
        module = converted.module.clone(**_jax_module_options(checkpoint.jax))
        converted = jax_impl.Stateful(module, converted.variables, carry=converted.carry)
    return converted, checkpoint.position
