"""The torch <-> JAX correspondence, declared once as data and read in both directions.

Each supported module kind has:
- ``params``: rules ``torch name <-> JAX path`` with a layout (how the array is transposed);
- ``config``: constructor arguments ``torch name <-> JAX name`` (with a value map where they
  differ, e.g. ``batch_first`` <-> ``time_major``);
- ``activation``: how an input/output/state tensor moves between the two layouts.

``parity.convert`` and ``parity.harness`` only interpret these tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Layout:
    """A lossless array re-layout: ``to_jax(torch_array)`` and its inverse ``to_torch``."""

    name: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Layout("identity", lambda a: a, lambda a: a)
# torch Linear weight (out, in) <-> Flax kernel (in, out)
LINEAR = Layout("linear", lambda a: a.T, lambda a: a.T)
# torch conv weight OIHW <-> Flax/lax conv kernel HWIO
CONV = Layout(
    "conv", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)
)
# torch activations (..., C, H, W) <-> channels-last (..., H, W, C)
CHANNELS_LAST = Layout(
    "channels_last",
    lambda a: np.moveaxis(a, -3, -1),
    lambda a: np.moveaxis(a, -1, -3),
)


@dataclass(frozen=True)
class ParamRule:
    """One parameter: ``torch`` name template <-> ``jax`` path template under ``params``.

    Templates use ``{layer}`` and ``{suffix}`` (``""`` or ``"_reverse"``). ``when`` names the
    option that must hold for the parameter to exist (``"bias"`` or ``"proj"``).
    """

    torch: str
    jax: tuple[str, ...]
    layout: Layout
    when: Optional[str] = None


@dataclass(frozen=True)
class ConfigRule:
    """One constructor argument: ``torch`` attribute <-> ``jax`` field, values mapped by
    ``to_jax``/``to_torch`` (identity when None)."""

    torch: str
    jax: str
    to_jax: Optional[Callable] = None
    to_torch: Optional[Callable] = None


@dataclass(frozen=True)
class ModuleSpec:
    """Everything that pairs one torch module class with one jax_impl module class."""

    kind: str  # "lstm", "lstm_cell", "gru", "gru_cell", "rnn", "rnn_cell", "convlstm", ...
    torch_class: str  # resolved lazily: "torch.nn.LSTM", "torch_impl.ConvLSTM2d", ...
    jax_class: str  # "jax_impl.LSTM", ...
    params: tuple[ParamRule, ...]
    config: tuple[ConfigRule, ...]
    layered: bool  # params repeat per layer (and direction)
    activation: Layout  # input / output / state layout change
    # torch constructor arguments that come from parameter shapes, not from the JAX config
    torch_sizes: Callable[[dict], dict]
    cell_state: bool = True  # the state is (h, c); else one tensor h
    directions: bool = False  # has torch's ``bidirectional``
    feature_rank: int = 1  # trailing feature axes of one input step (3 for a ConvLSTM)

    @property
    def is_cell(self) -> bool:
        return not self.layered

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell_state else ("h",)


def _negate(value: bool) -> bool:
    return not value


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


_LSTM_PARAMS = (
    ParamRule("weight_ih_l{layer}{suffix}", ("layer_{layer}{suffix}", "ih_kernel"), LINEAR),
    ParamRule("weight_hh_l{layer}{suffix}", ("layer_{layer}{suffix}", "hh_kernel"), LINEAR),
    ParamRule("bias_ih_l{layer}{suffix}", ("layer_{layer}{suffix}", "ih_bias"), IDENTITY, "bias"),
    ParamRule("bias_hh_l{layer}{suffix}", ("layer_{layer}{suffix}", "hh_bias"), IDENTITY, "bias"),
    ParamRule("weight_hr_l{layer}{suffix}", ("layer_{layer}{suffix}", "proj_kernel"), LINEAR, "proj"),
)
_LSTM_CELL_PARAMS = (
    ParamRule("weight_ih", ("ih_kernel",), LINEAR),
    ParamRule("weight_hh", ("hh_kernel",), LINEAR),
    ParamRule("bias_ih", ("ih_bias",), IDENTITY, "bias"),
    ParamRule("bias_hh", ("hh_bias",), IDENTITY, "bias"),
)
# GRU and RNN: the LSTM's table without the projection (3H or H rows instead of 4H)
_GATED_PARAMS = tuple(rule for rule in _LSTM_PARAMS if rule.when != "proj")

_CONVLSTM_PARAMS = (
    ParamRule("weight_ih_l{layer}", ("layer_{layer}", "ih_kernel"), CONV),
    ParamRule("weight_hh_l{layer}", ("layer_{layer}", "hh_kernel"), CONV),
    ParamRule("bias_ih_l{layer}", ("layer_{layer}", "ih_bias"), IDENTITY, "bias"),
    ParamRule("bias_hh_l{layer}", ("layer_{layer}", "hh_bias"), IDENTITY, "bias"),
)
_CONVLSTM_CELL_PARAMS = (
    ParamRule("weight_ih", ("ih_kernel",), CONV),
    ParamRule("weight_hh", ("hh_kernel",), CONV),
    ParamRule("bias_ih", ("ih_bias",), IDENTITY, "bias"),
    ParamRule("bias_hh", ("hh_bias",), IDENTITY, "bias"),
)


_RNN_BASE_CONFIG = (
    ConfigRule("hidden_size", "hidden_size"),
    ConfigRule("num_layers", "num_layers"),
    ConfigRule("bias", "use_bias"),
    ConfigRule("dropout", "dropout"),
    ConfigRule("bidirectional", "bidirectional"),
    ConfigRule("batch_first", "time_major", _negate, _negate),
)
_CELL_CONFIG = (ConfigRule("hidden_size", "hidden_size"), ConfigRule("bias", "use_bias"))
_NONLINEARITY = ConfigRule("nonlinearity", "nonlinearity")


def _input_size(name: str) -> Callable[[dict], dict]:
    return lambda p: {"input_size": p[name].shape[1]}


def _dense_specs(kind: str, name: str, cell_state: bool, extra: tuple[ConfigRule, ...]):
    """torch.nn.{name} and torch.nn.{name}Cell <-> jax_impl.{name} and jax_impl.{name}Cell."""
    sequence_params = _LSTM_PARAMS if kind == "lstm" else _GATED_PARAMS
    # the cells take no proj_size (torch's LSTMCell has none)
    cell_extra = tuple(rule for rule in extra if rule.torch != "proj_size")
    return (
        ModuleSpec(kind, f"torch.nn.{name}", f"jax_impl.{name}", sequence_params,
                   _RNN_BASE_CONFIG + extra, layered=True, activation=IDENTITY,
                   torch_sizes=_input_size("weight_ih_l0"), cell_state=cell_state,
                   directions=True),
        ModuleSpec(f"{kind}_cell", f"torch.nn.{name}Cell", f"jax_impl.{name}Cell",
                   _LSTM_CELL_PARAMS, _CELL_CONFIG + cell_extra, layered=False,
                   activation=IDENTITY, torch_sizes=_input_size("weight_ih"),
                   cell_state=cell_state),
    )


_LSTM, _LSTM_CELL = _dense_specs("lstm", "LSTM", True, (ConfigRule("proj_size", "proj_size"),))
_GRU, _GRU_CELL = _dense_specs("gru", "GRU", False, ())
_RNN, _RNN_CELL = _dense_specs("rnn", "RNN", False, (_NONLINEARITY,))

SPECS: tuple[ModuleSpec, ...] = (
    _LSTM,
    _GRU,
    _RNN,
    _LSTM_CELL,
    _GRU_CELL,
    _RNN_CELL,
    ModuleSpec(
        kind="convlstm",
        torch_class="torch_impl.ConvLSTM2d",
        jax_class="jax_impl.ConvLSTM",
        params=_CONVLSTM_PARAMS,
        config=(
            ConfigRule("hidden_channels", "hidden_channels"),
            ConfigRule("kernel_size", "kernel_size", _pair, _pair),
            ConfigRule("num_layers", "num_layers"),
            ConfigRule("bias", "use_bias"),
            ConfigRule("dilation", "dilation", _pair, _pair),
            ConfigRule("dropout", "dropout"),
            ConfigRule("batch_first", "time_major", _negate, _negate),
        ),
        layered=True,
        activation=CHANNELS_LAST,
        torch_sizes=lambda p: {"input_channels": p["weight_ih_l0"].shape[1]},
        feature_rank=3,
    ),
    ModuleSpec(
        kind="convlstm_cell",
        torch_class="torch_impl.ConvLSTMCell",
        jax_class="jax_impl.ConvLSTMCell",
        params=_CONVLSTM_CELL_PARAMS,
        config=(
            ConfigRule("hidden_channels", "hidden_channels"),
            ConfigRule("kernel_size", "kernel_size", _pair, _pair),
            ConfigRule("bias", "use_bias"),
            ConfigRule("dilation", "dilation", _pair, _pair),
        ),
        layered=False,
        activation=CHANNELS_LAST,
        torch_sizes=lambda p: {"input_channels": p["weight_ih"].shape[1]},
        feature_rank=3,
    ),
)


def expand_rules(
    spec: ModuleSpec, *, num_layers: int = 1, bidirectional: bool = False, bias: bool, proj: bool
) -> list[tuple[str, tuple[str, ...], Layout]]:
    """The concrete ``(torch_name, jax_path, layout)`` list for one module's options."""
    options = {"bias": bias, "proj": proj}
    suffixes = ("", "_reverse") if bidirectional else ("",)
    layers = range(num_layers) if spec.layered else range(1)
    rules = []
    for layer in layers:
        for suffix in suffixes:
            for rule in spec.params:
                if rule.when is not None and not options[rule.when]:
                    continue
                fill = dict(layer=layer, suffix=suffix)
                rules.append(
                    (rule.torch.format(**fill), tuple(p.format(**fill) for p in rule.jax), rule.layout)
                )
    return rules
