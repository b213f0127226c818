"""Whole-checkpoint conversion: every recurrent module of a torch state_dict, found by its names.

A torch checkpoint is a flat ``name -> tensor`` dict with no record of which module made which
tensor. The recurrent modules leave a signature in their parameter names (``{prefix}weight_ih_l0``,
``{prefix}weight_hh_l0_reverse``, ``{prefix}weight_hr_l1``, ``{prefix}bias_ih_l0``; cells:
``{prefix}weight_ih``, ``{prefix}weight_hh``, ...) and their configuration in the shapes:

- ``weight_hh`` ``(G*H, H)`` (rank 2): ``G = 4`` nn.LSTM, ``3`` nn.GRU, ``1`` nn.RNN; with
  ``weight_hr`` ``(P, H)`` an LSTM with ``proj_size=P`` (``weight_hh`` is then ``(4H, P)``);
- ``weight_hh`` ``(4H, H, kh, kw)`` (rank 4): torch_impl.ConvLSTM2d / ConvLSTMCell;
- input size from ``weight_ih``, layers from the ``_l{k}`` suffixes, ``bidirectional`` from
  ``_reverse``, ``bias`` from ``bias_ih``.

What the shapes cannot tell comes from keywords (``batch_first``, ``nonlinearity`` of nn.RNN,
``dilation`` of the ConvLSTM), each a value for every module or a dict ``{prefix: value}``.

Each module is rebuilt in torch (``load_state_dict(strict=True)``), then converted by
``parity.convert.to_jax``: this module infers configurations, the parameter mapping lives only
in ``parity.mapping``.

File format of ``save_converted`` / ``load_converted`` (``format_version`` 1), one safetensors
file:

- tensors ``"{prefix}/{flax path}"``: the JAX variables, e.g. ``"encoder.rnn/params/layer_0/ih_kernel"``
  (a module at the root has the prefix ``""``: ``"/params/layer_0/ih_kernel"``); always Flax
  linen's layout, whatever target the file is loaded as;
- the tensors no recurrent module claimed, under their own torch names;
- metadata (strings): ``format`` (``"carryover.converted"``), ``format_version``, ``target``
  (what ``load_converted`` builds by default), ``modules`` (JSON ``{prefix: config}``, see
  ``Converted.configs``) and ``untouched`` (JSON list of the other tensors' names).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import atomic_replace
from .convert import jax_params_as_torch, spec_for_jax, to_jax, to_torch
from .mapping import SPECS
from .targets import nest

__all__ = [
    "Converted",
    "RecurrentGroup",
    "find_recurrent",
    "convert_state_dict",
    "save_converted",
    "write_safetensors",
    "load_converted",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "carryover.converted"
FORMAT_VERSION = 1
PathLike = Union[str, os.PathLike]

# kind -> the torch class rebuilt from the shapes (dotted, resolved lazily)
TORCH_CLASSES = {
    "lstm": "torch.nn.LSTM",
    "gru": "torch.nn.GRU",
    "rnn": "torch.nn.RNN",
    "lstm_cell": "torch.nn.LSTMCell",
    "gru_cell": "torch.nn.GRUCell",
    "rnn_cell": "torch.nn.RNNCell",
    "convlstm": "torch_impl.ConvLSTM2d",
    "convlstm_cell": "torch_impl.ConvLSTMCell",
}
_GATES = {4: "lstm", 3: "gru", 1: "rnn"}
_NONLINEARITIES = ("tanh", "relu")
_DEFAULTS = {"batch_first": False, "nonlinearity": "tanh", "dilation": 1}
# keyword -> the kinds it applies to
_OPTION_KINDS = {
    "batch_first": ("lstm", "gru", "rnn", "convlstm"),
    "nonlinearity": ("rnn", "rnn_cell"),
    "dilation": ("convlstm", "convlstm_cell"),
}

_LAYERED = re.compile(
    r"^(?:(?P<prefix>.+)\.)?(?P<param>weight_ih|weight_hh|weight_hr|bias_ih|bias_hh)"
    r"_l(?P<layer>\d+)(?P<reverse>_reverse)?$"
)
_CELL = re.compile(r"^(?:(?P<prefix>.+)\.)?(?P<param>weight_ih|weight_hh|bias_ih|bias_hh)$")


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _shown(prefix: str) -> str:
    return prefix if prefix else "(root)"


# ------------------------------------------------------------------------------------ results


@dataclass(eq=False)
class Converted(Mapping):
    """The recurrent modules of a checkpoint as JAX modules, and everything else untouched.

    A read-only mapping ``prefix -> (jax_module, variables)`` (``converted["encoder.rnn"]``,
    ``converted.items()``), with the configurations and the leftover tensors alongside.

    Attributes:
        modules: ``prefix -> (jax_module, variables)``; the prefix is the torch module's
            name in the model (``"encoder.rnn"``; ``""`` for a checkpoint of the module alone).
        configs: ``prefix -> config``, JSON-ready: ``kind`` (``"lstm"``, ``"gru"``, ``"rnn"``,
            ``"lstm_cell"``, ``"gru_cell"``, ``"rnn_cell"``, ``"convlstm"``,
            ``"convlstm_cell"``), ``torch_class``, ``torch`` (the torch constructor arguments),
            ``jax_class``, ``jax`` (the JAX module's non-default constructor arguments, dtypes
            as ``{"dtype": name}``), ``dtype``, ``num_params``, ``target``.
        untouched: ``name -> tensor`` for the tensors of no recurrent module (embeddings,
            heads, buffers), as they were.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LSTM(8, 16))
        >>> converted = convert_state_dict(model.state_dict())
        >>> list(converted), sorted(converted.untouched)
        (['1'], ['0.bias', '0.weight'])
        >>> module, variables = converted["1"]
        >>> converted.configs["1"]["torch"]
        {'input_size': 8, 'hidden_size': 16, 'num_layers': 1, 'bias': True, 'batch_first': False, 'bidirectional': False, 'proj_size': 0}
    """

    modules: dict[str, tuple[Any, Any]]
    configs: dict[str, dict]
    untouched: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, prefix: str) -> tuple[Any, Any]:
        return self.modules[prefix]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        kinds = {prefix: self.configs[prefix]["kind"] for prefix in self.modules}
        return f"Converted(modules={kinds}, untouched={list(self.untouched)})"

    def to_torch_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole checkpoint back in torch: each module through ``parity.convert.to_torch``
        under ``f"{prefix}.{torch name}"``, plus the untouched tensors.

        Returns:
            ``name -> tensor``; for a checkpoint converted with ``convert_state_dict``, equal
            to the original state_dict bit for bit (names, dtypes, values).

        Example:
            >>> import torch
            >>> model = torch.nn.Sequential(torch.nn.LSTM(4, 8), torch.nn.Linear(8, 2))
            >>> state_dict = model.state_dict()
            >>> back = convert_state_dict(state_dict).to_torch_state_dict()
            >>> sorted(back) == sorted(state_dict)
            True
            >>> all(torch.equal(back[name], state_dict[name]) for name in state_dict)
            True
        """
        out: dict[str, torch.Tensor] = {}
        for prefix, (module, variables) in self.modules.items():
            for name, tensor in to_torch(module, variables).state_dict().items():
                out[_full(prefix, name)] = tensor
        for name, tensor in self.untouched.items():
            if name in out:
                raise ValueError(f"tensor {name} is both a converted parameter and an untouched tensor")
            out[name] = tensor
        return out


@dataclass(eq=False)
class RecurrentGroup:
    """One recurrent module found in a state_dict: what its names and shapes say.

    Attributes:
        prefix: the module's name in the model (``""`` at the root).
        kind: ``"lstm"``, ``"gru"``, ``"rnn"``, ``"lstm_cell"``, ``"gru_cell"``,
            ``"rnn_cell"``, ``"convlstm"`` or ``"convlstm_cell"``.
        torch_class: the torch class, dotted (``"torch.nn.LSTM"``, ``"torch_impl.ConvLSTM2d"``).
        config: its constructor arguments (JSON-ready: pairs as lists).
        params: ``local name -> tensor`` (``"weight_ih_l0"``, ...).
    """

    prefix: str
    kind: str
    torch_class: str
    config: dict
    params: dict[str, torch.Tensor]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.params.values())

    def build(self) -> nn.Module:
        """The torch module, in eval mode, holding this group's tensors (shared, not copied).

        Example:
            >>> import torch
            >>> groups, _ = find_recurrent(torch.nn.GRUCell(3, 5).state_dict())
            >>> groups[""].build()
            GRUCell(3, 5)
        """
        module = _make_torch(self.torch_class, self.config, self.dtype, device="meta")
        module.load_state_dict(self.params, strict=True, assign=True)
        return module.eval()


def _make_torch(torch_class: str, config: dict, dtype: torch.dtype, device: Any = None) -> nn.Module:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return _resolve(torch_class)(**kwargs, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------ finding


def _option(name: str, value: Any, prefix: str) -> Any:
    """The value of keyword ``name`` for ``prefix`` (a dict gives it per prefix)."""
    if isinstance(value, Mapping):
        return value.get(prefix, _DEFAULTS[name])
    return value


def _check_option(name: str, value: Any, where: str) -> Any:
    if name == "batch_first" and not isinstance(value, bool):
        raise TypeError(f"batch_first{where} must be a bool, got {value!r}")
    if name == "nonlinearity" and value not in _NONLINEARITIES:
        raise ValueError(f"nonlinearity{where} must be 'tanh' or 'relu', got {value!r}")
    if name == "dilation":
        pair = (value, value) if isinstance(value, int) else value
        if not (
            isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)
        ):
            raise ValueError(f"dilation{where} must be an int >= 1 or a pair of them, got {value!r}")
    return value


def _collect(state_dict: Mapping) -> tuple[dict[str, dict[str, Any]], dict[str, Optional[bool]], dict[str, Any]]:
    """Groups the recurrent-looking names by prefix: ``(params, layered, others)``;
    ``layered[prefix]`` is None where a prefix mixes a cell's names with a layered module's."""
    groups: dict[str, dict[str, Any]] = {}
    layered: dict[str, Optional[bool]] = {}
    others: dict[str, Any] = {}
    for name, tensor in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict keys must be strings, got {type(name).__name__} {name!r}")
        match = _LAYERED.match(name) or _CELL.match(name)
        if match is None:
            others[name] = tensor
            continue
        prefix = match["prefix"] or ""
        is_layered = match.re is _LAYERED
        if layered.setdefault(prefix, is_layered) != is_layered:
            layered[prefix] = None
        local = name[len(prefix) + 1 :] if prefix else name
        groups.setdefault(prefix, {})[local] = tensor
    return groups, layered, others


def _check_tensors(prefix: str, params: dict[str, Any]) -> torch.dtype:
    """One floating dtype for the whole group; a ValueError names the odd parameter."""
    first_name, first = None, None
    for name, tensor in params.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{_full(prefix, name)} is a {type(tensor).__name__}, expected a torch.Tensor")
        if not tensor.is_floating_point():
            raise ValueError(f"{_full(prefix, name)} has dtype {tensor.dtype}, expected a floating-point dtype")
        if first is None:
            first_name, first = name, tensor
        elif tensor.dtype != first.dtype:
            raise ValueError(
                f"{_shown(prefix)}: {_full(prefix, name)} is {tensor.dtype} while "
                f"{_full(prefix, first_name)} is {first.dtype}; a module's parameters share one dtype"
            )
    return first.dtype


def _need(prefix: str, params: dict, name: str, rank: Optional[int] = None) -> torch.Tensor:
    if name not in params:
        raise ValueError(
            f"{_shown(prefix)}: parameter {_full(prefix, name)} is missing "
            f"(the group has {sorted(params)})"
        )
    tensor = params[name]
    if rank is not None and tensor.dim() != rank:
        raise ValueError(
            f"{_shown(prefix)}: {_full(prefix, name)} has shape {tuple(tensor.shape)}, expected "
            f"rank {rank}"
        )
    return tensor


def _gates(prefix: str, name: str, hh: torch.Tensor, allowed: dict) -> int:
    rows, cols = hh.shape[0], hh.shape[1]
    if cols == 0 or rows % cols or rows // cols not in allowed:
        expected = ", ".join(f"{g}x ({kind})" for g, kind in allowed.items())
        raise ValueError(
            f"{_shown(prefix)}: {_full(prefix, name)} has shape {tuple(hh.shape)}: its rows "
            f"should be a gate multiple of its columns ({expected})"
        )
    return rows // cols


def _infer(prefix: str, params: dict, layered: Optional[bool], options: dict) -> RecurrentGroup:
    """The torch class and constructor arguments the names and shapes of one group imply."""
    if layered is None:
        cells = sorted(n for n in params if _CELL.match(n))
        stacks = sorted(n for n in params if _LAYERED.match(n))
        raise ValueError(
            f"{_shown(prefix)}: ambiguous: a cell's names {[_full(prefix, n) for n in cells]} "
            f"and a layered module's {[_full(prefix, n) for n in stacks]} under one prefix"
        )
    _check_tensors(prefix, params)
    suffix = "_l0" if layered else ""
    hh = _need(prefix, params, f"weight_hh{suffix}")
    if hh.dim() == 2:
        ih = _need(prefix, params, f"weight_ih{suffix}", rank=2)
        proj = 0
        if layered and "weight_hr_l0" in params:
            hr = _need(prefix, params, "weight_hr_l0", rank=2)
            proj, hidden = hr.shape
            if tuple(hh.shape) != (4 * hidden, proj):
                raise ValueError(
                    f"{_shown(prefix)}: {_full(prefix, 'weight_hh_l0')} has shape {tuple(hh.shape)}, "
                    f"expected {(4 * hidden, proj)} for an LSTM with hidden_size={hidden} and "
                    f"proj_size={proj} (from weight_hr_l0 {tuple(hr.shape)})"
                )
            kind = "lstm"
        else:
            hidden = hh.shape[1]
            kind = _GATES[_gates(prefix, f"weight_hh{suffix}", hh, _GATES)]
        config: dict[str, Any] = {"input_size": ih.shape[1], "hidden_size": hidden}
    elif hh.dim() == 4:
        ih = _need(prefix, params, f"weight_ih{suffix}", rank=4)
        _gates(prefix, f"weight_hh{suffix}", hh, {4: "ConvLSTM"})
        kind = "convlstm"
        config = {
            "input_channels": ih.shape[1],
            "hidden_channels": hh.shape[1],
            "kernel_size": [hh.shape[2], hh.shape[3]],
        }
    else:
        raise ValueError(
            f"{_shown(prefix)}: {_full(prefix, f'weight_hh{suffix}')} has shape {tuple(hh.shape)}; "
            f"expected rank 2 (LSTM, GRU, RNN and their cells) or 4 (ConvLSTM)"
        )
    if layered:
        found = [_LAYERED.match(name) for name in params]
        config["num_layers"] = 1 + max(int(m["layer"]) for m in found)
    config["bias"] = f"bias_ih{suffix}" in params or f"bias_hh{suffix}" in params
    if layered:
        config["batch_first"] = options["batch_first"]
    if kind == "convlstm":
        dilation = options["dilation"]
        config["dilation"] = [dilation, dilation] if isinstance(dilation, int) else list(dilation)
    elif layered:
        config["bidirectional"] = any(m["reverse"] for m in found)
        if kind == "lstm":
            config["proj_size"] = proj
    if kind == "rnn":
        config["nonlinearity"] = options["nonlinearity"]
    if not layered:
        kind += "_cell"
    group = RecurrentGroup(prefix, kind, TORCH_CLASSES[kind], config, dict(params))
    _check_against_torch(group)
    return group


def _check_against_torch(group: RecurrentGroup) -> None:
    """The group's names and shapes against those of the module it implies (built on the meta
    device: no memory, no initialisation); a ValueError names the first difference."""
    prefix, params = group.prefix, group.params
    described = f"{group.torch_class}({', '.join(f'{k}={v}' for k, v in group.config.items())})"
    try:
        module = _make_torch(group.torch_class, group.config, group.dtype, device="meta")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{_shown(prefix)}: the shapes imply {described}, which torch refuses: {error}") from None
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    missing = [name for name in expected if name not in params]
    if missing:
        raise ValueError(
            f"{_shown(prefix)}: parameter {_full(prefix, missing[0])} is missing for {described}"
            + (f" (also missing: {missing[1:]})" if missing[1:] else "")
        )
    extra = sorted(set(params) - set(expected))
    if extra:
        raise ValueError(f"{_shown(prefix)}: parameter {_full(prefix, extra[0])} does not belong to {described}")
    for name, shape in expected.items():
        if tuple(params[name].shape) != shape:
            raise ValueError(
                f"{_shown(prefix)}: {_full(prefix, name)} has shape {tuple(params[name].shape)}, "
                f"expected {shape} for {described}"
            )


def find_recurrent(
    state_dict: Mapping[str, Any],
    *,
    batch_first: Union[bool, Mapping[str, bool]] = False,
    nonlinearity: Union[str, Mapping[str, str]] = "tanh",
    dilation: Union[int, tuple, Mapping[str, Any]] = 1,
    skip: Iterable[str] = (),
) -> tuple[dict[str, RecurrentGroup], dict[str, Any]]:
    """Finds the recurrent modules of a torch state_dict and infers their configurations.

    Arguments:
        state_dict: a flat ``name -> tensor`` dict (``model.state_dict()``).
        batch_first: the layout of nn.LSTM / GRU / RNN / ConvLSTM2d (not in the shapes); a
            bool for all, or ``{prefix: bool}`` (others: False).
        nonlinearity: ``"tanh"`` or ``"relu"`` for nn.RNN / RNNCell; or ``{prefix: value}``.
        dilation: the ConvLSTM's dilation (int or pair); or ``{prefix: value}``.
        skip: prefixes to leave alone (their tensors end in the leftovers).

    Returns:
        ``(groups, others)``: ``prefix -> RecurrentGroup`` in the order of the state_dict, and
        ``name -> tensor`` for everything else.

    Raises:
        ValueError: a group that is inconsistent (a missing layer or bias, shapes that do not
            fit one module, mixed dtypes) or ambiguous, naming the prefix and the parameter; a
            per-prefix keyword naming no recurrent module, or one of another kind.

    Example:
        >>> import torch
        >>> model = torch.nn.ModuleDict({"rnn": torch.nn.GRU(3, 6, num_layers=2), "head": torch.nn.Linear(6, 1)})
        >>> groups, others = find_recurrent(model.state_dict())
        >>> groups["rnn"].kind, groups["rnn"].config["num_layers"], sorted(others)
        ('gru', 2, ['head.bias', 'head.weight'])
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    raw = {"batch_first": batch_first, "nonlinearity": nonlinearity, "dilation": dilation}
    for name, value in raw.items():  # "encoder.rnn." names the same module as "encoder.rnn"
        if isinstance(value, Mapping):
            raw[name] = {k[:-1] if k.endswith(".") else k: v for k, v in value.items()}
    params_by_prefix, layered, others = _collect(state_dict)
    skip = {s[:-1] if s.endswith(".") else s for s in ([skip] if isinstance(skip, str) else skip)}
    unknown = sorted(skip - set(params_by_prefix))
    if unknown:
        raise ValueError(f"skip names no recurrent module: {unknown} (found {sorted(params_by_prefix)})")

    groups: dict[str, RecurrentGroup] = {}
    for prefix, params in params_by_prefix.items():
        if prefix in skip:
            continue
        options = {}
        for name, value in raw.items():
            where = f" for {_shown(prefix)}" if isinstance(value, Mapping) else ""
            options[name] = _check_option(name, _option(name, value, prefix), where)
        try:
            groups[prefix] = _infer(prefix, params, layered[prefix], options)
        except ValueError as error:
            raise ValueError(
                f"{error} [not a torch recurrent module? leave it alone with skip=[{prefix!r}], "
                f"or --skip {prefix or repr('')} on the command line]"
            ) from None

    for name, value in raw.items():
        if not isinstance(value, Mapping):
            continue
        for prefix in value:
            if prefix not in groups:
                raise ValueError(f"{name} names {prefix!r}, which is no recurrent module (found {list(groups)})")
            if groups[prefix].kind not in _OPTION_KINDS[name]:
                raise ValueError(
                    f"{name} names {prefix!r}, a {groups[prefix].kind}, which takes no {name}"
                )
    # leftovers in the state_dict's order
    skipped = {_full(prefix, name) for prefix in skip for name in params_by_prefix[prefix]}
    leftover = {name: t for name, t in state_dict.items() if name in others or name in skipped}
    return groups, leftover


# ------------------------------------------------------------------------------------ converting


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _encode(value: Any) -> Any:
    """A JAX constructor argument as JSON (pairs as lists, dtypes as ``{"dtype": name}``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, np.dtype) or (isinstance(value, type) and hasattr(value, "dtype")):
        return {"dtype": np.dtype(value).name}
    raise TypeError(f"cannot store a {type(value).__name__} ({value!r}) as a module argument")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        if set(value) != {"dtype"}:
            raise ValueError(f"unknown module argument encoding {value!r}")
        return jnp.dtype(value["dtype"])
    return value


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an argument that cannot compare is recorded
        return False


def _jax_kwargs(module: Any) -> Optional[dict]:
    """A linen module's constructor arguments that differ from the defaults, JSON-ready."""
    if not dataclasses.is_dataclass(module):
        return None
    kwargs = {}
    for f in dataclasses.fields(module):
        if not f.init or f.name in ("parent", "name"):
            continue
        value = getattr(module, f.name)
        if f.default is not dataclasses.MISSING and _same(value, f.default):
            continue
        kwargs[f.name] = _encode(value)
    return kwargs


def _to_jax(module: nn.Module, target: str) -> tuple[Any, Any]:
    if target == "linen":
        return to_jax(module)
    if "target" not in inspect.signature(to_jax).parameters:
        raise TypeError(
            f"target={target!r} needs a parity.convert.to_jax with a target parameter; this one "
            f"converts to Flax linen only (target='linen')"
        )
    return to_jax(module, target=target)


def _config(group: RecurrentGroup, jax_module: Any, target: str) -> dict:
    try:
        jax_class = spec_for_jax(jax_module).jax_class
    except TypeError:
        jax_class = f"{type(jax_module).__module__}.{type(jax_module).__qualname__}"
    return {
        "kind": group.kind,
        "torch_class": group.torch_class,
        "torch": dict(group.config),
        "jax_class": jax_class,
        "jax": _jax_kwargs(jax_module),
        "dtype": _dtype_name(group.dtype),
        "num_params": group.num_params,
        "target": target,
    }


def convert_state_dict(
    state_dict: Mapping[str, Any],
    *,
    target: str = "linen",
    batch_first: Union[bool, Mapping[str, bool]] = False,
    nonlinearity: Union[str, Mapping[str, str]] = "tanh",
    dilation: Union[int, tuple, Mapping[str, Any]] = 1,
    skip: Iterable[str] = (),
) -> Converted:
    """Converts every recurrent module of a torch state_dict to its JAX module and variables.

    Each group of names (``find_recurrent``) is rebuilt as its torch module
    (``load_state_dict(strict=True)``) and converted by ``parity.convert.to_jax``.

    Arguments:
        state_dict: a flat ``name -> tensor`` dict (``model.state_dict()``).
        target: ``"linen"`` (Flax linen modules); another value is passed to
            ``to_jax(module, target=target)``.
        batch_first: layout of the layered modules (the shapes do not tell): a bool for all or
            ``{prefix: bool}``; the JAX modules get ``time_major = not batch_first``.
        nonlinearity: nn.RNN / RNNCell's ``"tanh"`` or ``"relu"``; or ``{prefix: value}``.
        dilation: the ConvLSTM's dilation; or ``{prefix: value}``.
        skip: prefixes to leave alone (their tensors go to ``untouched``).

    Returns:
        A ``Converted``: ``converted[prefix] -> (jax_module, variables)``, with ``configs`` and
        the ``untouched`` tensors. float64 weights need ``with jax.enable_x64(True):`` around
        the call (and around their use).

    Raises:
        ValueError: an inconsistent or ambiguous group, naming the prefix and the parameter.
        TypeError: a kind ``to_jax`` cannot convert (from ``to_jax``).

    Example:
        >>> import jax.numpy as jnp, torch
        >>> model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 4),
        ...                              "rnn": torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)})
        >>> converted = convert_state_dict(model.state_dict(), batch_first=True)
        >>> module, variables = converted["rnn"]
        >>> y, (h, c) = module.apply(variables, jnp.ones((2, 5, 4)))
        >>> y.shape, list(converted.untouched)
        ((2, 5, 8), ['embed.weight'])
    """
    groups, others = find_recurrent(
        state_dict, batch_first=batch_first, nonlinearity=nonlinearity, dilation=dilation, skip=skip
    )
    modules, configs = {}, {}
    for prefix, group in groups.items():
        try:
            jax_module, variables = _to_jax(group.build(), target)
        except (TypeError, ValueError) as error:  # e.g. a kind to_jax does not convert yet
            raise type(error)(f"{_shown(prefix)}: {error}") from error
        modules[prefix] = (jax_module, variables)
        configs[prefix] = _config(group, jax_module, target)
    return Converted(modules, configs, others)


# ------------------------------------------------------------------------------------ files


def _flatten(tree: Any, path: tuple = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping) or hasattr(tree, "items"):
        for key, value in tree.items():
            yield from _flatten(value, path + (str(key),))
    else:
        yield path, tree


def _torch_view(array: Any) -> torch.Tensor:
    """A CPU torch tensor on the bytes of a JAX/numpy array (no copy where possible)."""
    array = np.ascontiguousarray(np.asarray(array))
    with warnings.catch_warnings():  # read-only arrays: safetensors only reads them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (tied weights are written twice)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} is a {type(tensor).__name__}, expected a torch.Tensor")
        tensor = tensor.detach().cpu()
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key in seen or not tensor.is_contiguous():
            tensor = tensor.contiguous().clone()
        elif tensor.numel():
            seen.add(key)
        out[name] = tensor
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: PathLike, metadata: dict[str, str]) -> Path:
    """Writes torch tensors to a safetensors file atomically: a temporary file in the same
    directory, written by safetensors directly (no copy of the whole file in memory), fsynced,
    then renamed over ``path``; on any error the temporary file is removed.

    Arguments:
        tensors: ``name -> tensor`` (see ``_storable`` for tied or strided tensors).
        path: the destination.
        metadata: string metadata for the header.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> write_safetensors({"a": torch.zeros(2)}, path, {"format": "pt"}).name
        't.safetensors'
    """
    with atomic_replace(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def save_converted(converted: Converted, path: PathLike, *, target: Optional[str] = None) -> Path:
    """Writes a ``Converted`` to one safetensors file (see the module docstring), atomically.

    Arguments:
        converted: from ``convert_state_dict`` with ``target="linen"`` (the file holds Flax
            linen variables).
        path: the file to write.
        target: what ``load_converted`` builds by default (``"linen"``, or ``"nnx"`` where
            ``to_jax`` supports it); default: the modules' recorded target.

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> import os, tempfile, torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LSTMCell(4, 6))
        >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
        >>> _ = save_converted(convert_state_dict(model.state_dict()), path)
        >>> loaded = load_converted(path)
        >>> loaded.configs["1"]["kind"], sorted(loaded.untouched)
        ('lstm_cell', ['0.bias', '0.weight'])
    """
    tensors: dict[str, torch.Tensor] = {}
    configs = {}
    targets = set()
    for prefix, (module, variables) in converted.modules.items():
        try:
            spec_for_jax(module)
        except TypeError:
            raise TypeError(
                f"save_converted writes Flax linen modules of jax_impl; {_shown(prefix)} is a "
                f"{type(module).__name__} (convert with target='linen' and pass target= here)"
            ) from None
        config = dict(converted.configs[prefix])
        targets.add(config.get("target", "linen"))
        if config.get("jax") is None:
            config["jax"] = _jax_kwargs(module)
        configs[prefix] = config
        for keys, array in _flatten(variables):
            tensors[f"{prefix}/{'/'.join(keys)}"] = _torch_view(array)
    untouched = _storable(dict(converted.untouched))
    clash = sorted(set(untouched) & set(tensors))
    if clash:
        raise ValueError(f"untouched tensors {clash} have the names of converted parameters")
    tensors.update(untouched)
    if target is None:
        target = targets.pop() if len(targets) == 1 else "linen"
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "target": target,
        "modules": json.dumps(configs),
        "untouched": json.dumps(list(untouched)),
    }
    return write_safetensors(tensors, path, metadata)


def _allowed_jax_classes() -> dict[str, str]:
    """jax class name -> kind, for the classes ``parity.mapping`` knows (the only classes a
    file may name: metadata never chooses arbitrary code)."""
    return {spec.jax_class: spec.kind for spec in SPECS}


def _build_jax(prefix: str, config: dict, name: str) -> Any:
    jax_class = config.get("jax_class")
    allowed = _allowed_jax_classes()
    if jax_class not in allowed:
        raise ValueError(f"{name}: module {_shown(prefix)} names class {jax_class!r}; expected one of {sorted(allowed)}")
    cls = _resolve(jax_class)
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
    kwargs = config.get("jax") or {}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(f"{name}: module {_shown(prefix)}: {jax_class} has no arguments {unknown}")
    return cls(**{k: _decode(v) for k, v in kwargs.items()})


def load_converted(path: PathLike, *, target: Optional[str] = None) -> Converted:
    """Reads a file written by ``save_converted`` (or ``python -m parity convert``).

    Arguments:
        path: the safetensors file.
        target: ``"linen"`` or another ``to_jax`` target; default: the one the file records.

    Returns:
        A ``Converted``: ``prefix -> (jax_module, variables)``, the configurations and the
        untouched tensors (torch tensors, as they were). float64 weights need
        ``with jax.enable_x64(True):`` around the call.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a converted file, or one whose tensors do not fit its modules.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "lstm.safetensors")
        >>> _ = save_converted(convert_state_dict(torch.nn.LSTM(2, 3).state_dict()), path)
        >>> module, variables = load_converted(path)[""]
        >>> module.hidden_size, sorted(variables["params"]["layer_0"])
        (3, ['hh_bias', 'hh_kernel', 'ih_bias', 'ih_kernel'])
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file")
    try:
        reader = safe_open(str(path), framework="np")
    except Exception as error:  # safetensors raises its own error type
        raise ValueError(f"{name} is not a readable safetensors file ({error})") from None
    with reader:
        metadata = reader.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{name} is not a converted checkpoint (no {FORMAT!r} metadata); convert a torch "
                f"checkpoint with `python -m parity convert CHECKPOINT --out OUT.safetensors`"
            )
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{name} has format_version {metadata.get('format_version')!r}; this version reads {FORMAT_VERSION}"
            )
        try:
            configs = json.loads(metadata["modules"])
            untouched_names = json.loads(metadata["untouched"])
        except (KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"{name} has corrupted metadata ({error!r})") from None
        target = target or metadata.get("target", "linen")
        keys = list(reader.keys())
        prefixes = sorted(configs, key=len, reverse=True)
        flat: dict[str, dict] = {prefix: {} for prefix in configs}
        for key in keys:
            if key in untouched_names:
                continue
            prefix = next((p for p in prefixes if key.startswith(p + "/")), None)
            if prefix is None:
                raise ValueError(f"{name}: tensor {key!r} belongs to no module of the file")
            flat[prefix][tuple(key[len(prefix) + 1 :].split("/"))] = reader.get_tensor(key)
    missing = sorted(set(untouched_names) - set(keys))
    if missing:
        raise ValueError(f"{name}: untouched tensors {missing} are listed but absent")
    untouched = {}
    if untouched_names:
        with safe_open(str(path), framework="pt") as torch_reader:
            untouched = {key: torch_reader.get_tensor(key) for key in untouched_names}

    modules, out_configs = {}, {}
    for prefix in configs:  # the order they were written in
        config = dict(configs[prefix])
        if config.get("dtype") == "float64" and not jax.config.jax_enable_x64:
            raise TypeError(
                f"{name}: module {_shown(prefix)} has float64 weights, which need JAX's x64 mode: "
                f"call load_converted inside `with jax.enable_x64(True):`"
            )
        module = _build_jax(prefix, config, name)
        variables = nest({k: jnp.asarray(v) for k, v in flat[prefix].items()})
        try:
            jax_params_as_torch(module, variables)  # every path present, nothing more
        except ValueError as error:
            raise ValueError(f"{name}: module {_shown(prefix)}: {error}") from None
        if target != "linen":
            module, variables = _to_jax(to_torch(module, variables), target)
        config["target"] = target
        modules[prefix] = (module, variables)
        out_configs[prefix] = config
    return Converted(modules, out_configs, untouched)
