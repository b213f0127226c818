"""Lossless conversion between torch modules and jax_impl modules, both ways.

``to_jax`` and ``to_torch`` read the same tables (``parity.mapping``): a round trip gives back
equal state_dicts, bit for bit, dtypes included.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

import jax_impl
import torch_impl

from .mapping import SPECS, ModuleSpec, expand_rules
from .targets import TARGETS, get_target, target_of

__all__ = [
    "to_jax",
    "to_torch",
    "stream_to_jax",
    "stream_to_torch",
    "state_to_jax",
    "state_to_torch",
    "spec_for_torch",
    "spec_for_jax",
    "torch_param_arrays",
    "jax_params_as_torch",
    "params_tree_as_torch",
    "torch_options",
]


def _resolve(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _unwrap_stateful(module: Any) -> Any:
    """The recurrent module inside a torch_impl stateful module (the module itself otherwise)."""
    return module.module if isinstance(module, torch_impl.StatefulWrapper) else module


def spec_for_torch(module: Any) -> ModuleSpec:
    """The mapping spec for a torch module; TypeError naming the type when unsupported."""
    for spec in SPECS:
        if type(module) is _resolve(spec.torch_class):
            return spec
    supported = ", ".join(s.torch_class for s in SPECS)
    raise TypeError(
        f"cannot convert a {type(module).__module__}.{type(module).__name__}; supported: "
        f"{supported} (and torch_impl stateful modules wrapping them)"
    )


def spec_for_jax(module: Any) -> ModuleSpec:
    module = as_linen(module)[0]
    for spec in SPECS:
        if type(module) is _resolve(spec.jax_class):
            return spec
    supported = ", ".join(s.jax_class for s in SPECS)
    raise TypeError(f"cannot convert a {type(module).__name__}; supported: {supported}")


def _options(spec: ModuleSpec, get) -> dict:
    """The options that decide which parameters exist, read through ``get(torch_attr)``."""
    return dict(
        num_layers=get("num_layers") if spec.layered else 1,
        bidirectional=bool(get("bidirectional")) if spec.directions else False,
        bias=bool(get("bias")),
        proj=bool(get("proj_size")) if spec.kind == "lstm" else False,
    )


def _torch_getter(spec: ModuleSpec, jax_module: Any):
    """Reads a JAX module's options under their torch names (through the config rules)."""
    by_torch = {rule.torch: rule for rule in spec.config}

    def get(name: str):
        rule = by_torch[name]
        value = getattr(jax_module, rule.jax)
        return rule.to_torch(value) if rule.to_torch else value

    return get


def _x64_enabled() -> bool:
    return bool(jax.config.jax_enable_x64)


def _check_finite(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise ValueError(f"parameter {name} has {bad} non-finite values (NaN or Inf); expected finite weights")


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's exact values as numpy, bfloat16 included (numpy has no bfloat16 of its own:
    the bits are reinterpreted as ml_dtypes' bfloat16, which JAX uses)."""
    tensor = tensor.detach()
    if tensor.is_meta:
        raise ValueError(
            "the module's parameters are on the 'meta' device (not materialized): call "
            "module.to_empty(device='cpu') and load its weights (load_state_dict) first"
        )
    tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(jnp.bfloat16)
    return tensor.numpy()


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """The inverse of ``tensor_to_numpy``: a new tensor with exactly these values."""
    array = np.array(array, order="C", copy=True)
    if array.dtype == jnp.bfloat16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_param_arrays(module: nn.Module) -> dict[str, np.ndarray]:
    """A torch module's parameters as numpy arrays, exact (detached, on the CPU)."""
    return {k: tensor_to_numpy(v) for k, v in module.state_dict().items()}


def _check_keys(expected: set, got: set, what: str) -> None:
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"{what}: {'; '.join(parts)}")




def to_jax(
    torch_module: nn.Module, *, target: str = "linen", time_major: Optional[bool] = None
) -> tuple[Any, Optional[dict]]:
    """Converts a torch recurrent module to the equivalent JAX module and its variables.

    Arguments:
        torch_module: nn.LSTM, nn.GRU, nn.RNN, their cells, torch_impl.ConvLSTM2d /
            ConvLSTMCell, or a torch_impl stateful module wrapping one of them.
        target: which JAX module to build: ``"linen"``, carryover's Linen modules (returned
            with their variables); ``"nnx"``, carryover's ``jax_impl.nnx`` modules (which
            hold their parameters: the variables returned are None); or another library's
            own (``parity.targets.TARGETS``: ``"flax.linen"``, ``"flax.nnx"``, ``"equinox"``,
            ``"keras"``), where an option it cannot express is a ValueError.
        time_major: the JAX module's layout; default the torch module's (``not batch_first``,
            which is False for nn.LSTM/GRU/RNN unless set): pass ``time_major=False`` when
            your JAX data is ``(B, T, ...)`` while the torch module is time-major.

    Returns:
        ``(jax_module, variables)``; the JAX module keeps the parameters' dtype (float64 needs
        ``jax.enable_x64``; bfloat16 is kept).

    Example:
        >>> lstm = torch.nn.LSTM(16, 32, num_layers=2, batch_first=True)
        >>> module, variables = to_jax(lstm)
        >>> y, (h, c) = module.apply(variables, jnp.ones((4, 10, 16)))
        >>> y.shape
        (4, 10, 32)
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    foreign = None if target in ("linen", "nnx") else get_target(target)
    torch_module = _unwrap_stateful(torch_module)
    spec = spec_for_torch(torch_module)
    state = torch_param_arrays(torch_module)
    rules = expand_rules(spec, **torch_options(torch_module))
    _check_keys({r[0] for r in rules}, set(state), f"{type(torch_module).__name__} state_dict")

    dtypes = {state[name].dtype for name, _, _ in rules}
    if len(dtypes) != 1:
        raise TypeError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; expected one dtype")
    dtype = dtypes.pop()
    if dtype == np.float64 and not _x64_enabled():
        raise TypeError(
            "float64 weights need JAX's x64 mode: call to_jax inside `with jax.enable_x64(True):`"
        )

    for torch_name, _, _ in rules:
        _check_finite(torch_name, state[torch_name])
    if foreign is not None:
        return foreign.to_jax(spec, torch_module, state, time_major=time_major)

    params: dict = {}
    for torch_name, path, layout in rules:
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(np.ascontiguousarray(layout.to_jax(state[torch_name])))

    config = {}
    for rule in spec.config:
        if hasattr(torch_module, rule.torch):
            value = getattr(torch_module, rule.torch)
            config[rule.jax] = rule.to_jax(value) if rule.to_jax else value
    if time_major is not None and "time_major" in config:
        config["time_major"] = bool(time_major)
    if target == "nnx":
        return _nnx_module(spec, config, params, state, jnp.dtype(dtype)), None
    jax_module = _resolve(spec.jax_class)(**config, param_dtype=jnp.dtype(dtype))
    return jax_module, {"params": params}


def _nnx_module(spec: ModuleSpec, config: dict, params: dict, state: dict, dtype) -> Any:
    """The ``jax_impl.nnx`` twin of ``spec.jax_class`` with these parameters."""
    from flax import nnx

    from jax_impl import nnx as jax_nnx

    sizes = spec.torch_sizes(state)  # input_size / input_channels, from the weights
    module = getattr(jax_nnx, spec.jax_class.rpartition(".")[2])(
        **sizes, **config, param_dtype=dtype, rngs=nnx.Rngs(0)
    )
    jax_nnx.load_linen_params(module, params)
    return module


def is_nnx(module: Any) -> bool:
    """Whether ``module`` is a ``jax_impl.nnx`` module (without importing flax.nnx otherwise)."""
    nnx_module = sys.modules.get("jax_impl.nnx")
    return nnx_module is not None and isinstance(module, (nnx_module._Recurrent, nnx_module._Cell))


def as_linen(module: Any, variables: Any = None) -> tuple[Any, Any]:
    """``(linen_module, variables)`` of a ``jax_impl.nnx`` module (its Linen twin and
    parameters); a Linen module and its variables are returned as they are."""
    if not is_nnx(module):
        return module, variables
    from jax_impl.nnx import nnx_params_as_linen

    return module.linen, {"params": nnx_params_as_linen(module)}


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) or hasattr(value, "items"):
            flat.update(_flatten(dict(value), prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def jax_params_as_torch(jax_module: Any, variables: Any) -> dict[str, np.ndarray]:
    """A jax_impl module's parameters (or any pytree in their structure, e.g. gradients) under
    torch's names and layouts, as numpy arrays."""
    spec = spec_for_jax(jax_module)
    return params_tree_as_torch(spec, _options(spec, _torch_getter(spec, jax_module)), variables)


def params_tree_as_torch(spec: ModuleSpec, options: dict, variables: Any) -> dict[str, np.ndarray]:
    """A params pytree in jax_impl's structure, for the module ``spec`` with ``options``, under
    torch's names and layouts; a ValueError names missing and unexpected paths."""
    params = variables.get("params", variables)
    flat = _flatten(dict(params))
    rules = expand_rules(spec, **options)
    torch_name = {"/".join(path): name for name, path, _ in rules}
    got = {"/".join(path) for path in flat}
    missing = sorted(set(torch_name) - got)
    if missing:  # name both sides: the JAX path and the torch parameter it stands for
        missing_text = ", ".join(f"{p} (torch {torch_name[p]})" for p in missing)
        extra = sorted(got - set(torch_name))
        raise ValueError(
            f"{spec.jax_class} params: missing {missing_text}"
            + (f"; unexpected {extra}" if extra else "")
        )
    _check_keys(set(torch_name), got, f"{spec.jax_class} params")
    return {
        torch_name: np.ascontiguousarray(layout.to_torch(np.asarray(flat[path])))
        for torch_name, path, layout in rules
    }


def torch_options(torch_module: nn.Module) -> dict:
    """The options of a torch module that decide which parameters exist."""
    torch_module = _unwrap_stateful(torch_module)
    return _options(spec_for_torch(torch_module), lambda name: getattr(torch_module, name))


def to_torch(
    jax_module: Any, variables: Any = None, device: Optional[torch.device] = None
) -> nn.Module:
    """The exact inverse of ``to_jax``: a torch module with the same weights, bit for bit.

    ``jax_module`` is a carryover Linen module with its ``variables``, or a ``jax_impl.nnx``
    module (variables None: it holds them).

    Example:
        >>> module, variables = to_jax(torch.nn.LSTM(8, 16))
        >>> lstm = to_torch(module, variables)          # an nn.LSTM equal to the original
    """
    foreign = target_of(jax_module)
    if foreign is not None:
        return foreign.to_torch(jax_module, variables)
    jax_module, variables = as_linen(jax_module, variables)
    spec = spec_for_jax(jax_module)
    arrays = jax_params_as_torch(jax_module, variables)
    get = _torch_getter(spec, jax_module)
    config = {rule.torch: get(rule.torch) for rule in spec.config}
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) != 1:
        raise TypeError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; expected one dtype")
    dtype = numpy_to_tensor(np.zeros(0, dtypes.pop())).dtype
    torch_class = _resolve(spec.torch_class)
    module = torch_class(**spec.torch_sizes(arrays), **config, dtype=dtype, device=device)
    expected = module.state_dict()
    for name, array in arrays.items():
        _check_finite(name, array)
        if tuple(expected[name].shape) != array.shape:
            raise ValueError(
                f"parameter {name} has shape {array.shape} after conversion, expected "
                f"{tuple(expected[name].shape)} for {torch_class.__name__}({config})"
            )
    module.load_state_dict({k: numpy_to_tensor(v) for k, v in arrays.items()}, strict=True)
    return module


# ----------------------------------------------------------------------------- state and streams


def state_to_jax(spec: ModuleSpec, state: Any) -> Any:
    """A torch state (``(h, c)``, or ``h``) as the JAX carry (channels-last for a ConvLSTM)."""
    if state is None:
        return None
    tensors = _state_tensors(spec, state)
    arrays = [jnp.asarray(np.ascontiguousarray(spec.activation.to_jax(tensor_to_numpy(t))))
              for t in tensors]
    return jax_impl.LSTMState(*arrays) if spec.cell_state else arrays[0]


def _state_tensors(spec: ModuleSpec, state: Any) -> tuple:
    """The torch state as a tuple ``(h, c)`` or ``(h,)``; a TypeError for the other kind."""
    if spec.cell_state:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"state must be a pair (h, c), got {type(state).__name__}")
        return tuple(state)
    if isinstance(state, (tuple, list)):
        if len(state) == 1:
            return tuple(state)
        raise TypeError(
            f"state must be one tensor h, got a {type(state).__name__} of {len(state)} "
            "(an LSTM's (h, c)?)"
        )
    return (state,)


def state_to_torch(spec: ModuleSpec, carry: Any) -> Any:
    """A JAX carry as torch's state: ``(h, c)``, or the tensor ``h``."""
    if carry is None:
        return None
    tensors = tuple(
        numpy_to_tensor(spec.activation.to_torch(np.asarray(a)))
        for a in jax.tree_util.tree_leaves(carry)
    )
    return tensors if spec.cell_state else tensors[0]


def stream_to_jax(stateful: Any, *, target: str = "linen") -> jax_impl.Stateful:
    """A torch_impl stateful module as a ``jax_impl.Stateful`` that continues its stream.

    Works for the stateful LSTM, GRU, RNN and ConvLSTM (and ``StatefulWrapper`` around them);
    ``target`` as for ``to_jax`` (``"nnx"``: the stream runs a ``jax_impl.nnx`` module).

    The live carried state comes along: the next chunk fed to the JAX stream gives what the
    torch module would have given.
    """
    if not isinstance(stateful, torch_impl.StatefulWrapper):
        raise TypeError(
            f"stream_to_jax needs a torch_impl stateful module, got {type(stateful).__name__}"
        )
    module, variables = to_jax(stateful, target=target)
    spec = spec_for_torch(_unwrap_stateful(stateful))
    return jax_impl.Stateful(module, variables, carry=state_to_jax(spec, stateful.get_state()))


def stream_to_torch(stream: jax_impl.Stateful) -> Any:
    """A ``jax_impl.Stateful`` as a torch_impl stateful module holding the same state."""
    if not isinstance(stream, jax_impl.Stateful):
        raise TypeError(f"stream_to_torch needs a jax_impl.Stateful, got {type(stream).__name__}")
    jax_module, variables = stream.module, stream.variables
    if hasattr(jax_module, "graphdef"):  # an NNX stream (jax_impl.nnx.LinenView)
        from flax import nnx

        jax_module, variables = as_linen(nnx.merge(jax_module.graphdef, variables))
    spec = spec_for_jax(jax_module)
    module = to_torch(jax_module, variables)
    stateful = _STATEFUL_TORCH[spec.kind](module)
    stateful.set_state(state_to_torch(spec, stream.carry))
    return stateful


def _stateful_rnn(stateful_class, attribute: str, extra: tuple[str, ...] = ()):
    """Builds ``stateful_class`` around a copy of the weights of a converted torch module."""

    def build(module):
        options = {name: getattr(module, name) for name in extra}
        stateful = stateful_class(
            module.input_size, module.hidden_size, module.num_layers,
            batch_first=module.batch_first, bias=module.bias, dropout=module.dropout,
            bidirectional=module.bidirectional, dtype=module.weight_ih_l0.dtype, **options,
        )
        getattr(stateful, attribute).load_state_dict(module.state_dict())
        return stateful

    return build


def _stateful_convlstm(module):
    stateful = torch_impl.StatefulConvLSTM(
        module.input_channels, module.hidden_channels, module.kernel_size, module.num_layers,
        batch_first=module.batch_first, bias=module.bias, dilation=module.dilation,
        dropout=module.dropout, dtype=module.weight_ih_l0.dtype,
    )
    stateful.convlstm.load_state_dict(module.state_dict())
    return stateful


_STATEFUL_TORCH = {
    "lstm": _stateful_rnn(torch_impl.StatefulLSTM, "lstm", ("proj_size",)),
    "gru": _stateful_rnn(torch_impl.StatefulGRU, "gru"),
    "rnn": _stateful_rnn(torch_impl.StatefulRNN, "rnn", ("nonlinearity",)),
    "convlstm": _stateful_convlstm,
}
