"""Resumable streams (``parity.checkpoint``): save mid-sequence, resume in a new process.

Every stream kind: the LSTM and ConvLSTM (state ``(h, c)``), the GRU and the RNN (state ``h``
alone), saved from either framework.

Same framework (and machine: the same program on the same shapes): the continuation equals an
uninterrupted run bit for bit. Across frameworks: within docs/design.md's bounds (float64 1e-12,
float32 1e-5). Crashes mid-save keep the previous file; truncated, corrupted or mismatched
files are a clear ValueError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch

import jax_impl
import torch_impl
from parity import checkpoint as ckpt
from parity import stream_to_jax, to_jax
from parity.checkpoint import load_stream, read_checkpoint, save_stream
from parity.mapping import CHANNELS_LAST

REPO = Path(__file__).resolve().parents[2]
BOUND = {"float64": 1e-12, "float32": 1e-5}

# Runs in a fresh interpreter: loads each checkpoint in the asked framework, feeds the rest
# of the stream chunk by chunk and saves outputs and final state in that framework's layout.
RESUME_SCRIPT = textwrap.dedent(
    """
    import contextlib, json, sys
    import jax, numpy as np, torch
    from parity.checkpoint import load_stream

    torch.set_num_threads(1)  # as in the parent: the same kernels, the same bits
    for job in json.load(open(sys.argv[1])):
        x64 = jax.enable_x64(True) if job["x64"] else contextlib.nullcontext()
        with x64:
            stream, position = load_stream(job["checkpoint"], job["framework"])
            x = np.load(job["x"])
            ys, start = [], 0
            for n in job["chunks"]:
                chunk = np.take(x, np.arange(start, start + n), axis=job["time_axis"])
                if job["framework"] == "torch":
                    with torch.no_grad():
                        ys.append(stream(torch.from_numpy(chunk)).numpy())
                    state = stream.get_state()
                else:
                    ys.append(np.asarray(stream(chunk)))
                    state = stream.carry
                start += n
            # (h, c) or the one array h (GRU, RNN)
            parts = state if isinstance(state, tuple) else (state,)
            states = {f"state{i}": np.asarray(p) for i, p in enumerate(parts)}
            np.savez(job["out"], y=np.concatenate(ys, axis=job["time_axis"]), position=position,
                     **states)
    """
)


from parity.tests.torch_threads import one_torch_thread  # noqa: F401, E402  (autouse)

# ------------------------------------------------------------------------------ helpers


@dataclass
class Case:
    """One stream to save mid-sequence: its kind, dtype, source framework and layout."""

    kind: str  # "lstm" | "gru" | "rnn_relu" | "convlstm"
    source: str  # "jax" | "torch"
    dtype: str  # "float64" | "float32"
    batch_first: bool

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.source}-{self.dtype}"

    @property
    def time_axis(self) -> int:
        return 1 if self.batch_first else 0


CASES = [
    Case("lstm", "jax", "float64", True),
    Case("lstm", "torch", "float64", True),
    Case("convlstm", "jax", "float64", False),
    Case("convlstm", "torch", "float64", False),
    Case("lstm", "jax", "float32", True),
    Case("gru", "jax", "float64", True),
    Case("gru", "torch", "float64", False),
    Case("gru", "torch", "float32", True),
    Case("rnn_relu", "jax", "float64", False),
    Case("rnn_relu", "torch", "float64", True),
]
DENSE_KINDS = ("lstm", "gru", "rnn_relu")  # (B, T, F) input; the state's names by kind:
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "rnn_relu": ("h",), "convlstm": ("h", "c")}
# chunks fed before the save, and after it; few lengths, so few JAX compilations
BEFORE, AFTER = [4], [4, 4]


def _torch_stream(case: Case, seed: int = 0) -> torch_impl.StatefulWrapper:
    torch.manual_seed(seed)
    dtype = getattr(torch, case.dtype)
    if case.kind == "lstm":
        return torch_impl.StatefulLSTM(
            3, 5, num_layers=2, batch_first=case.batch_first, bidirectional=True, proj_size=3,
            dtype=dtype,
        )  # fmt: skip
    if case.kind == "gru":
        return torch_impl.StatefulGRU(
            3, 5, num_layers=2, batch_first=case.batch_first, bidirectional=True, dtype=dtype
        )
    if case.kind == "rnn_relu":
        return torch_impl.StatefulRNN(
            3, 5, num_layers=2, nonlinearity="relu", batch_first=case.batch_first, bias=False,
            dtype=dtype,
        )  # fmt: skip
    return torch_impl.StatefulConvLSTM(
        2, 3, (2, 3), num_layers=2, batch_first=case.batch_first, dilation=(1, 2), dtype=dtype
    )


def _torch_input(case: Case, seed: int = 1) -> np.ndarray:
    """A (B, T, ...) or (T, B, ...) input in torch's layout, T = all chunks."""
    steps = sum(BEFORE) + sum(AFTER)
    shape = (2, steps) if case.batch_first else (steps, 2)
    shape += (3,) if case.kind in DENSE_KINDS else (2, 4, 5)
    return np.random.default_rng(seed).standard_normal(shape).astype(case.dtype)


def _layout(case: Case, framework: str, x: np.ndarray) -> np.ndarray:
    """An array in torch's activation layout, moved to ``framework``'s."""
    if framework == "jax" and case.kind == "convlstm":
        return np.ascontiguousarray(CHANNELS_LAST.to_jax(x))
    return x


def _x64(case: Case):
    return jax.enable_x64(case.dtype == "float64")


def _parts(state: Any) -> tuple[np.ndarray, ...]:
    """A state as a tuple of arrays: ``(h, c)``, or ``(h,)`` for a GRU / RNN."""
    return tuple(np.asarray(t) for t in (state if isinstance(state, tuple) else (state,)))


def _feed(stream: Any, framework: str, x: np.ndarray, chunks: list[int], axis: int):
    """Feeds ``chunks`` of ``x``; returns the concatenated outputs and the final state as a
    tuple (``(h, c)`` or ``(h,)``)."""
    ys, start = [], 0
    for n in chunks:
        chunk = np.take(x, np.arange(start, start + n), axis=axis)
        if framework == "torch":
            with torch.no_grad():
                ys.append(stream(torch.from_numpy(chunk)).numpy())
        else:
            ys.append(np.asarray(stream(chunk)))
        start += n
    state = stream.get_state() if framework == "torch" else stream.carry
    return np.concatenate(ys, axis=axis), _parts(state)


def _source_stream(case: Case) -> Any:
    torch_stream = _torch_stream(case)
    return torch_stream if case.source == "torch" else stream_to_jax(torch_stream)


def _run_script(script: str, jobs: Any, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "script.py").write_text(script)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), str(tmp_path / "jobs.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


# ------------------------------------------------------------------------------ resume


def test_resume_in_a_new_process_same_framework_bitwise_other_framework_within_bounds(tmp_path):
    """Save mid-sequence; a new process resumes in both frameworks. Same framework: bit for
    bit equal to the uninterrupted run; other framework: within docs/design.md's bounds."""
    jobs, expected = [], {}
    for case in CASES:
        with _x64(case):
            x = _torch_input(case)
            stream = _source_stream(case)
            first = sum(BEFORE)
            head = np.take(x, np.arange(first), axis=case.time_axis)
            _feed(stream, case.source, _layout(case, case.source, head), BEFORE, case.time_axis)
            path = tmp_path / f"{case.name}.safetensors"
            save_stream(stream, path, position=first)
            # the uninterrupted run goes on in this process
            tail = np.take(x, np.arange(first, x.shape[case.time_axis]), axis=case.time_axis)
            y, state = _feed(stream, case.source, _layout(case, case.source, tail), AFTER,
                             case.time_axis)  # fmt: skip
        for framework in ("jax", "torch"):
            key = f"{case.name}-to-{framework}"
            np.save(tmp_path / f"{key}-x.npy", _layout(case, framework, tail))
            jobs.append(dict(
                checkpoint=str(path), framework=framework, x64=case.dtype == "float64",
                x=str(tmp_path / f"{key}-x.npy"), chunks=AFTER, time_axis=case.time_axis,
                out=str(tmp_path / f"{key}.npz"),
            ))  # fmt: skip
            expected[key] = (case, framework, y, state)

    result = _run_script(RESUME_SCRIPT, jobs, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    for key, (case, framework, y, state) in expected.items():
        got = np.load(tmp_path / f"{key}.npz")
        assert int(got["position"]) == sum(BEFORE), key
        assert len(state) == len(STATE_NAMES[case.kind]), key
        # the resumed stream carries as many state arrays as the saved one, no more
        assert sorted(k for k in got.files if k.startswith("state")) == [
            f"state{i}" for i in range(len(state))
        ], key
        # the reference ran in the source framework: move it to the resumed one's layout
        ref = {"y": y, **{f"state{i}": s for i, s in enumerate(state)}}
        if case.kind == "convlstm" and framework != case.source:
            to = CHANNELS_LAST.to_jax if framework == "jax" else CHANNELS_LAST.to_torch
            ref = {k: to(v) for k, v in ref.items()}
        for name in ref:
            assert got[name].dtype == np.dtype(case.dtype), (key, name)
            assert got[name].shape == ref[name].shape, (key, name)
            if framework == case.source:  # the same program on the same chunks, CPU, threads
                assert np.array_equal(got[name], ref[name]), f"{key} {name} not bit for bit"
            else:
                err = float(np.max(np.abs(got[name] - ref[name])))
                assert err <= BOUND[case.dtype], f"{key} {name}: max abs error {err:.3g}"


@pytest.mark.parametrize("kind", DENSE_KINDS)
@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_in_process_round_trip_keeps_weights_state_and_position(tmp_path, framework, kind):
    case = Case(kind, "torch", "float64", True)
    source = _torch_stream(case)
    with torch.no_grad():
        source(torch.from_numpy(_torch_input(case)[:, :4]))
    path = save_stream(source, tmp_path / "s.safetensors", position=4)
    assert read_checkpoint(path).kind == kind.removesuffix("_relu")
    with jax.enable_x64(True):
        stream, position = load_stream(path, framework, expect=source)
        assert position == 4
        if framework == "torch":
            assert type(stream) is type(source) and stream.detach == source.detach
            assert repr(stream.module) == repr(source.module)
            assert getattr(stream.module, "nonlinearity", None) == getattr(
                source.module, "nonlinearity", None
            )
            for k, v in source.module.state_dict().items():
                assert torch.equal(stream.module.state_dict()[k], v) and v.dtype == torch.float64
            state = _parts(stream.get_state())
        else:
            assert getattr(stream.module, "nonlinearity", None) == getattr(
                source.module, "nonlinearity", None
            )
            state = _parts(stream.carry)
    ref = _parts(source.get_state())
    assert len(state) == len(ref) == len(STATE_NAMES[kind])
    for got, want in zip(state, ref):
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize(
    "make",
    [lambda: torch_impl.StatefulConvLSTM(2, 3, 3), lambda: torch_impl.StatefulGRU(2, 3),
     lambda: torch_impl.StatefulRNN(2, 3, nonlinearity="relu")],
    ids=["convlstm", "gru", "rnn-relu"],
)  # fmt: skip
def test_fresh_stream_without_state_round_trips(tmp_path, make):
    stream = make()
    path = save_stream(stream, tmp_path / "fresh.safetensors")
    checkpoint = read_checkpoint(path)
    assert checkpoint.state is None and checkpoint.position is None
    loaded, position = load_stream(path, "jax")
    assert loaded.carry is None and position is None
    assert load_stream(path, "torch")[0].get_state() is None


def test_jax_only_options_survive_a_jax_round_trip(tmp_path):
    module, variables = to_jax(torch.nn.LSTM(5, 4))  # no JAX init to compile
    module = module.clone(unroll=2, precision="highest")
    assert module.time_major
    stream = jax_impl.Stateful(module, variables)
    stream(jnp.ones((2, 2, 5)))  # (T, B, F); one chunk length: one compiled program
    loaded, _ = load_stream(save_stream(stream, tmp_path / "j.safetensors"), "jax", expect=stream)
    assert (loaded.module.unroll, loaded.module.precision, loaded.module.time_major) == (2, "highest", True)
    y_ref, y = stream(jnp.ones((2, 2, 5))), loaded(jnp.ones((2, 2, 5)))
    assert np.array_equal(np.asarray(y), np.asarray(y_ref))


def test_file_metadata_names_format_kind_config_and_checksum(tmp_path):
    path = save_stream(torch_impl.StatefulLSTM(3, 4), tmp_path / "m.safetensors", position=0)
    with safetensors.safe_open(str(path), "np") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["format"] == "carryover.stream" and metadata["format_version"] == "1"
    assert metadata["kind"] == "lstm" and json.loads(metadata["config"])["hidden_size"] == 4
    assert len(metadata["sha256"]) == 64 and json.loads(metadata["position"]) == 0
    assert keys == {"param.weight_ih_l0", "param.weight_hh_l0", "param.bias_ih_l0", "param.bias_hh_l0"}


PARAMS_L0 = {"param.weight_ih_l0", "param.weight_hh_l0", "param.bias_ih_l0", "param.bias_hh_l0"}


@pytest.mark.parametrize(
    "make, kind, state, tensors",
    [
        (lambda: torch_impl.StatefulLSTM(3, 4), "lstm", "hc", {"state.h", "state.c"}),
        (lambda: torch_impl.StatefulGRU(3, 4), "gru", "h", {"state.h"}),
        (lambda: torch_impl.StatefulWrapper(torch.nn.RNN(3, 4, nonlinearity="relu")), "rnn", "h",
         {"state.h"}),
    ],
    ids=["lstm", "gru", "rnn-relu"],
)  # fmt: skip
def test_state_tensors_and_metadata_by_kind(tmp_path, make, kind, state, tensors):
    """An LSTM stores ``state.h`` and ``state.c`` (``"hc"``, as before GRU streams existed);
    a GRU or RNN stores ``state.h`` alone (``"h"``)."""
    stream = make()
    with torch.no_grad():
        stream(torch.randn(2, 4, 3) if stream.module.batch_first else torch.randn(4, 2, 3))
    path = save_stream(stream, tmp_path / "m.safetensors")
    with safetensors.safe_open(str(path), "np") as f:
        metadata, keys = f.metadata(), set(f.keys())
    assert (metadata["kind"], metadata["state"]) == (kind, state)
    assert keys == PARAMS_L0 | tensors
    if kind == "rnn":
        assert json.loads(metadata["config"])["nonlinearity"] == "relu"
    checkpoint = read_checkpoint(path)
    assert len(checkpoint.state) == len(state)
    for got, ref in zip(checkpoint.state, _parts(stream.get_state())):
        assert np.array_equal(got, ref)


def _rewrite(path: Path, metadata_update: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """The checkpoint at ``path`` with metadata fields changed and tensors dropped, and a
    valid checksum again: what a writer other than ``save_stream`` (an older or a buggy one)
    could produce."""
    with safetensors.safe_open(str(path), "np") as f:
        metadata = dict(f.metadata())
    tensors = {k: v for k, v in safetensors.numpy.load_file(str(path)).items() if k not in drop}
    metadata.update(metadata_update or {})
    metadata["sha256"] = ckpt._digest(metadata, tensors)
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    return path


def test_an_lstm_file_in_the_original_layout_still_loads(tmp_path):
    """Format version 1 as first written (LSTM only: ``state.h``, ``state.c``, ``"hc"``),
    encoded here by hand from its description, loads in both frameworks."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True)
    h, c = np.full((1, 2, 4), 0.25, np.float32), np.full((1, 2, 4), -0.5, np.float32)
    tensors = {f"param.{k}": v.numpy() for k, v in lstm.state_dict().items()}
    tensors.update({"state.h": h, "state.c": c})
    config = {"batch_first": True, "bias": True, "bidirectional": False, "dropout": 0.0,
              "hidden_size": 4, "input_size": 3, "num_layers": 1, "proj_size": 0}
    metadata = {
        "format": "carryover.stream", "format_version": "1", "kind": "lstm",
        "config": json.dumps(config, sort_keys=True), "dtype": "float32", "state": "hc",
        "position": "7", "stream": json.dumps({"detach": True}), "jax": json.dumps({}),
    }  # fmt: skip
    metadata["sha256"] = ckpt._digest(metadata, tensors)
    path = tmp_path / "v1.safetensors"
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))
    stream, position = load_stream(path, "torch", expect=lstm)
    assert position == 7 and isinstance(stream, torch_impl.StatefulLSTM)
    assert all(np.array_equal(t.numpy(), a) for t, a in zip(stream.get_state(), (h, c)))
    jax_stream, _ = load_stream(path, "jax")
    assert all(np.array_equal(np.asarray(t), a) for t, a in zip(jax_stream.carry, (h, c)))
    # and save_stream writes LSTM streams exactly this way still
    again = save_stream(stream, tmp_path / "again.safetensors", position=7)
    with safetensors.safe_open(str(again), "np") as f:
        assert f.metadata() == metadata and set(f.keys()) == set(tensors)


def _gru_checkpoint(tmp_path: Path) -> Path:
    stream = torch_impl.StatefulGRU(3, 4)
    stream(torch.randn(2, 4, 3))
    return save_stream(stream, tmp_path / "gru.safetensors", position=4)


@pytest.mark.parametrize(
    "update, drop, error, message",
    [
        ({"state": "hc"}, (), ValueError,
         r"holds state 'hc', expected 'h' or 'none' for kind 'gru'"),
        ({"kind": "lstm"}, (), ValueError,
         r"holds state 'h', expected 'hc' or 'none' for kind 'lstm'"),
        ({}, ("state.h",), ValueError,
         r"says it holds a state but has no tensors \['state.h'\]"),
        ({"dtype": "abs"}, (), ValueError,
         r"has dtype 'abs', expected a torch dtype name \(e.g. 'float32', 'float64'\)"),
        ({"dtype": ""}, (), ValueError, r"has dtype '', expected a torch dtype name"),
        ({"config": json.dumps({"input_size": 3, "hidden_size": 4, "nonlinearity": "relu"})}, (),
         ValueError, r"has an unusable config .*nonlinearity"),
    ],
    ids=["gru-with-hc", "kind-lstm-state-h", "state-tensor-missing", "dtype-not-a-dtype",
         "dtype-empty", "gru-config-of-an-rnn"],
)  # fmt: skip
def test_inconsistent_gru_checkpoint_is_a_clear_value_error(tmp_path, update, drop, error, message):
    """A file whose checksum holds but whose fields disagree (written by something other than
    save_stream) is refused with a message naming the field, not resumed wrongly."""
    path = _rewrite(_gru_checkpoint(tmp_path), update, drop)
    with pytest.raises(error, match=message):
        load_stream(path, "torch")


# ------------------------------------------------------------------------------ crashes


def _saved(tmp_path: Path) -> tuple[torch_impl.StatefulLSTM, Path, bytes]:
    stream = torch_impl.StatefulLSTM(3, 16, num_layers=2)
    stream(torch.randn(2, 4, 3))
    path = save_stream(stream, tmp_path / "good.safetensors", position=4)
    return stream, path, path.read_bytes()


def test_crash_mid_save_leaves_the_previous_file(tmp_path, monkeypatch):
    stream, path, good = _saved(tmp_path)
    stream(torch.randn(2, 3, 3))
    calls = []

    def crashing_write(file, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:  # two chunks are in the temp file already
            raise RuntimeError("simulated crash during save")
        file.write(chunk)

    monkeypatch.setattr(ckpt, "_CHUNK_BYTES", 256)
    monkeypatch.setattr(ckpt, "_write_chunk", crashing_write)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_stream(stream, path, position=7)
    assert len(calls) == 3
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.safetensors"]  # temp removed
    assert load_stream(path, "torch")[1] == 4


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch_impl
    from parity import checkpoint as ckpt

    calls = []
    def dying_write(file, chunk):
        calls.append(1)
        file.write(chunk)
        file.flush()
        if len(calls) == 2:
            os._exit(17)  # killed mid-save: no cleanup, no exception handlers
    ckpt._CHUNK_BYTES = 256
    ckpt._write_chunk = dying_write
    stream = torch_impl.StatefulLSTM(3, 16, num_layers=2)
    stream(torch.randn(2, 4, 3))
    ckpt.save_stream(stream, sys.argv[1], position=99)
    """
)


def test_process_killed_mid_save_leaves_the_previous_file(tmp_path):
    _, path, good = _saved(tmp_path)
    (tmp_path / "kill.py").write_text(KILL_SCRIPT)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, str(tmp_path / "kill.py"), str(path)], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 17, result.stderr[-2000:]
    assert path.read_bytes() == good
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < len(good)
    assert load_stream(path, "torch")[1] == 4


# ------------------------------------------------------------------------------ corruption


def test_every_single_byte_flip_is_detected(tmp_path):
    """Flip each byte of a small checkpoint in turn (two patterns): always a ValueError."""
    path = save_stream(torch_impl.StatefulLSTM(2, 3), tmp_path / "s.safetensors", position=1)
    good = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    undetected = []
    for pattern in (0x01, 0xFF):
        for i in range(len(good)):
            data = bytearray(good)
            data[i] ^= pattern
            bad.write_bytes(bytes(data))
            try:
                read_checkpoint(bad)
            except ValueError:
                continue
            undetected.append((i, pattern))
    assert not undetected, f"flips not detected: {undetected[:10]}"


def test_every_truncation_is_detected(tmp_path):
    path = save_stream(torch_impl.StatefulLSTM(2, 3), tmp_path / "s.safetensors")
    good = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    for size in range(len(good)):
        bad.write_bytes(good[:size])
        with pytest.raises(ValueError, match="truncated|corrupted"):
            read_checkpoint(bad)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], r"has \d+ bytes, expected \d+ from its header: truncated"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 0x10]), r"failed its checksum: stored sha256 [0-9a-f]+\.\.\., computed"),
        (lambda b: b[:5], r"has 5 bytes, expected at least 8"),
        (lambda b: b + b"\0", r"has \d+ bytes, expected \d+ from its header"),
    ],
    ids=["cut-in-half", "flipped-data-byte", "cut-to-5-bytes", "trailing-byte"],
)
def test_damaged_file_is_a_clear_value_error(tmp_path, damage, message):
    _, path, good = _saved(tmp_path)
    path.write_bytes(damage(good))
    with pytest.raises(ValueError, match=message):
        load_stream(path, "torch")


def test_other_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ValueError, match="is not a stream checkpoint: format None, expected 'carryover.stream'"):
        load_stream(path, "jax")


# ------------------------------------------------------------------------------ expect=


@pytest.mark.parametrize(
    "expect, message",
    [
        (lambda: torch.nn.LSTM(3, 16, num_layers=1, batch_first=True), r"num_layers=2, expected 1"),
        (lambda: torch_impl.StatefulLSTM(3, 8, num_layers=2), r"hidden_size=16, expected 8"),
        (lambda: jax_impl.LSTM(16, num_layers=2, time_major=True), r"batch_first=True, expected False"),
        (lambda: jax_impl.LSTM(16, num_layers=2, param_dtype=jnp.float16), r"dtype=float32, expected float16"),
        (lambda: torch_impl.ConvLSTM2d(3, 16, 3), r"holds kind 'lstm', expected 'convlstm'"),
        (lambda: torch_impl.StatefulLSTM(4, 16, num_layers=2), r"input_size=3, expected 4"),
    ],
    ids=["torch-module-layers", "torch-stream-hidden", "jax-module-layout", "jax-module-dtype",
         "other-kind", "input-size"],
)
def test_checkpoint_of_another_configuration_is_refused(tmp_path, expect, message):
    _, path, _ = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"has a different configuration: .*" + message + "|" + message):
        load_stream(path, "torch", expect=expect())


def test_matching_expect_is_accepted(tmp_path):
    stream, path, _ = _saved(tmp_path)
    for expect in (stream, stream.module, stream_to_jax(stream), jax_impl.LSTM(16, num_layers=2)):
        assert load_stream(path, "torch", expect=expect)[1] == 4


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p: load_stream(p, "tensorflow"), ValueError, r"framework must be 'jax' or 'torch', got 'tensorflow'"),
        (lambda p: save_stream(torch.nn.LSTM(3, 4), p), TypeError, r"needs a jax_impl.Stateful or a torch_impl stateful module .*got LSTM"),
        (lambda p: save_stream(torch.nn.GRUCell(3, 4), p), TypeError, r"needs a jax_impl.Stateful or a torch_impl stateful module .*got GRUCell"),
        (lambda p: load_stream(p, "torch", expect=torch.nn.GRUCell(3, 16)), TypeError, r"GRUCell is a gru_cell; a stream checkpoint holds an LSTM, GRU, RNN or ConvLSTM"),
        (lambda p: load_stream(p, "torch", expect=torch_impl.StatefulGRU(3, 16, num_layers=2)), ValueError, r"holds kind 'lstm', expected 'gru'"),
        (lambda p: save_stream(torch_impl.StatefulLSTM(3, 4), p, position=-1), ValueError, r"position must be >= 0 \(steps consumed\), got -1"),
        (lambda p: save_stream(torch_impl.StatefulLSTM(3, 4), p, position=2.5), TypeError, r"position must be an int or None, got float"),
        (lambda p: load_stream(p, "torch", expect="lstm"), TypeError, r"expect must be a stream or a module .*got str"),
    ],
    ids=["framework", "bare-module", "unsupported-module", "unsupported-expect", "gru-expected",
         "negative-position", "float-position", "expect-type"],
)
def test_bad_arguments(tmp_path, call, error, message):
    _, path, _ = _saved(tmp_path)
    with pytest.raises(error, match=message):
        call(path)
