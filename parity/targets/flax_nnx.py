"""Flax NNX's own recurrent modules as a target: ``flax.nnx.RNN`` over a stock cell.

The torch modules map as for ``flax.linen`` (``parity.targets.flax_linen``: the same tables,
read with NNX's paths), with NNX's cells:

* nn.LSTM / nn.LSTMCell -> ``nnx.OptimizedLSTMCell``: ``dense_i.kernel (F, 4H)`` (no bias) and
  ``dense_h.kernel (H, 4H)`` with ``dense_h.bias = bias_ih + bias_hh``, gates in torch's
  order i, f, g, o. ``nnx.LSTMCell`` (``ii if_ ig io`` / ``hi hf hg ho``, Linen's layout) is
  accepted everywhere too.
* nn.GRU / nn.GRUCell -> ``nnx.GRUCell``: ``dense_i`` (kernel ``(F, 3H)``, bias: the r and z
  sums and ``b_in``) and ``dense_h`` (kernel ``(H, 3H)``, no bias). NNX's GRU has no bias on
  ``W_hn h``: torch's ``b_hn`` must be zero (a ``bias=False`` GRU, or one that came from NNX);
  a nonzero ``b_hn`` is a ValueError (``"flax.linen"``'s GRUCell has it). The port has no
  gradient for ``bias_hh`` then: with ``bias=True`` a ``grads=True`` comparison reports it.
* nn.RNN / nn.RNNCell -> ``nnx.SimpleCell`` (``dense_i`` with the summed bias, ``dense_h``).
* ``bidirectional=True`` -> ``nnx.Bidirectional(nnx.RNN(cell), nnx.RNN(cell))``.
* torch_impl's ConvLSTM: NNX has no ConvLSTM cell (unsupported; use ``"flax.linen"``).

NNX modules hold their parameters: ``to_jax`` returns ``(module, None)``. The port splits
``graphdef, params, rest = nnx.split(module, nnx.Param, ...)``, differentiates ``params`` and
merges them back inside the jitted function; gradients are read with ``nnx.to_pure_dict``.
Carries, packed sequences and what is unsupported: as for ``flax.linen``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import recurrent

from ..convert import torch_param_arrays
from . import Piece, Target, apply_table, grads_to_torch, unsupported
from .flax_linen import (
    CellLayout,
    _paths,
    base_kind,
    build_torch,
    check_cell_kind,
    check_shapes,
    check_structure,
    check_torch,
    load_torch,
    make_run,
    nonlinearity_of,
    stock_object,
    stock_structure,
    suffixes,
    table,
    torch_dtype,
)

NAME = "flax.nnx"

# per cell class: its kind and where it keeps torch's arrays
_OPTIMIZED_LSTM = CellLayout(ih=_paths("dense_i/kernel"), hh=_paths("dense_h/kernel"),
                             bias=_paths("dense_h/bias"))
LAYOUTS: dict[type, tuple[str, CellLayout]] = {
    nnx.OptimizedLSTMCell: ("lstm", _OPTIMIZED_LSTM),
    nnx.LSTMCell: ("lstm", CellLayout(
        ih=_paths("ii/kernel", "if_/kernel", "ig/kernel", "io/kernel"),
        hh=_paths("hi/kernel", "hf/kernel", "hg/kernel", "ho/kernel"),
        bias=_paths("hi/bias", "hf/bias", "hg/bias", "ho/bias"),
    )),
    nnx.GRUCell: ("gru", CellLayout(ih=_paths("dense_i/kernel"), hh=_paths("dense_h/kernel"),
                                    bias=_paths("dense_i/bias"), hn_bias=None)),
    nnx.SimpleCell: ("rnn", CellLayout(ih=_paths("dense_i/kernel"), hh=_paths("dense_h/kernel"),
                                       bias=_paths("dense_i/bias"))),
}
_KINDS = ("lstm", "gru", "rnn")


def _cell_layout(cell: Any) -> tuple[str, CellLayout]:
    if type(cell) not in LAYOUTS:
        raise TypeError(f"{NAME}: {type(cell).__name__} is not a stock NNX cell "
                        f"({', '.join(c.__name__ for c in LAYOUTS)})")
    return LAYOUTS[type(cell)]


def _structure(obj: Any) -> tuple[str, list]:
    return stock_structure(obj, nnx, NAME, ())


def _table_for(cells, ends, bias: bool) -> list[Piece]:
    pieces = []
    for (cell, prefix), suffix in zip(cells, ends):
        kind, layout = _cell_layout(cell)
        pieces += table(kind, suffix, bias, layout, prefix)
    return pieces


def _check_b_hn(spec, module, state, ends) -> None:
    if base_kind(spec) != "gru" or not module.bias:
        return
    size = module.hidden_size
    for suffix in ends:
        if np.any(state[f"bias_hh{suffix}"][2 * size:] != 0):
            raise unsupported(
                f"a GRU bias b_hn (the n block of bias_hh{suffix}) that is not zero: nnx.GRUCell "
                "has no bias on W_hn h (target 'flax.linen' has)", NAME)


def _new_cell(kind: str, module, dtype) -> Any:
    """The stock cell, its parameters abstract (no random init: ``to_jax`` sets them all)."""
    size = (module.input_size, module.hidden_size)
    options = dict(param_dtype=dtype, dtype=None)
    if kind == "lstm":
        make = lambda: nnx.OptimizedLSTMCell(*size, **options, rngs=nnx.Rngs(0))
    elif kind == "gru":
        make = lambda: nnx.GRUCell(*size, **options, rngs=nnx.Rngs(0))
    else:
        activation = jax.nn.relu if module.nonlinearity == "relu" else jnp.tanh
        make = lambda: nnx.SimpleCell(*size, activation_fn=activation, **options,
                                      rngs=nnx.Rngs(0))
    return nnx.eval_shape(make)


def to_jax(spec, module, state, *, time_major=None):
    """``(flax.nnx module, None)``: the module holds the torch weights."""
    check_torch(spec, module, NAME, _KINDS)
    _check_b_hn(spec, module, state, suffixes(spec, module))
    obj, state, ends = stock_object(spec, module, state, time_major, _new_cell, nnx)
    _, cells = _structure(obj)
    params = nnx.state(obj, nnx.Param)
    pure = nnx.to_pure_dict(params)
    pieces = _table_for(cells, ends, True)
    check_shapes(pieces, state, pure, f"{NAME} {type(obj).__name__}")
    arrays = jax.tree_util.tree_map(jnp.asarray, apply_table(pieces, state))
    nnx.replace_by_pure_dict(params, arrays)
    nnx.update(obj, params)
    if not all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(nnx.state(obj))):
        raise RuntimeError(f"{NAME}: a parameter of {type(obj).__name__} was left unset")
    return obj, None


def _torch_expressible(cell: Any, kind: str, what: str) -> dict:
    if kind == "rnn":
        if cell.residual:
            raise ValueError(f"{what}: SimpleCell(residual=True) has no torch equivalent")
        return {"nonlinearity": nonlinearity_of(cell.activation_fn, what)}
    if cell.gate_fn is not jax.nn.sigmoid or cell.activation_fn is not jnp.tanh:
        raise ValueError(f"{what}: torch's {kind.upper()} has sigmoid gates and tanh; got "
                         f"gate_fn={cell.gate_fn!r}, activation_fn={cell.activation_fn!r}")
    return {}


def to_torch(obj, variables=None):
    """The torch cell for a bare cell, the sequence module (batch_first = not time_major) for an
    RNN or Bidirectional. A GRU comes back with ``bias_hh`` zero (NNX's GRU has no ``b_hn``)."""
    del variables  # NNX modules hold their parameters
    what = f"{NAME} {type(obj).__name__}"
    structure, cells = _structure(obj)
    kinds = {_cell_layout(c)[0] for c, _ in cells}
    sizes = {(c.in_features, c.hidden_features) for c, _ in cells}
    if len(kinds) != 1 or len(sizes) != 1:
        raise ValueError(f"{what}: forward and backward cells differ ({[type(c).__name__ for c, _ in cells]})")
    kind, (input_size, hidden) = kinds.pop(), sizes.pop()
    options = _torch_expressible(cells[0][0], kind, what)
    if any(_torch_expressible(c, kind, what) != options for c, _ in cells[1:]):
        raise ValueError(f"{what}: forward and backward cells have different options")
    if structure != "cell":
        if structure == "rnn" and obj.reverse:
            raise ValueError(f"{what}: reverse=True (a backward-only RNN) has no torch equivalent")
        if structure == "bidirectional" and obj.merge_fn is not recurrent._concatenate:
            raise ValueError(f"{what}: merge_fn {obj.merge_fn!r}; torch concatenates forward and backward")
        options.update(batch_first=not obj.time_major, bidirectional=structure == "bidirectional")
    pure = nnx.to_pure_dict(nnx.state(obj, nnx.Param))
    leaves = {str(i): np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(pure))}
    module = build_torch(kind, structure == "cell", input_size, hidden, torch_dtype(leaves),
                         **options)
    ends = ("",) if structure == "cell" else ("_l0", "_l0_reverse")[: len(cells)]
    return load_torch(module, _table_for(cells, ends, True), pure, what)


def port(spec, torch_module, obj, variables):
    """Calls the stock NNX module (merged from its split state inside the jitted function)."""
    from ..harness import Port

    del variables  # the module holds them
    check_torch(spec, torch_module, NAME, _KINDS)
    structure, cells = _structure(obj)
    check_structure(spec, torch_module, structure, NAME)
    check_cell_kind(spec, torch_module, {_cell_layout(c)[0] for c, _ in cells}, NAME)
    what = f"{NAME} {type(obj).__name__}"
    ends = suffixes(spec, torch_module)
    pieces = _table_for(cells, ends, torch_module.bias)
    graphdef, params, rest = nnx.split(obj, nnx.Param, ...)
    check_shapes(pieces, torch_param_arrays(torch_module), nnx.to_pure_dict(params), what)
    # NNX's GRU has no b_hn: no gradient for torch's bias_hh (the comparison reports it missing)
    no_b_hn = [f"bias_hh{s}" for (c, _), s in zip(cells, ends)
               if torch_module.bias and isinstance(c, nnx.GRUCell)]

    def call_seq(params, x, carry, lengths, time_major):
        model = nnx.merge(graphdef, params, rest)
        return model(x, initial_carry=carry, seq_lengths=lengths, return_carry=True,
                     time_major=time_major)

    def call_cell(params, carry, xt):
        return nnx.merge(graphdef, params, rest)(carry, xt)

    def grads_as_torch(grads):
        arrays = grads_to_torch(pieces, nnx.to_pure_dict(grads), f"{what} gradients")
        for name in no_b_hn:
            arrays.pop(name)
        return arrays

    run = make_run(spec, torch_module, structure, call_seq, call_cell)
    return Port(run, grads_as_torch), params


_OWNED = (nnx.RNN, nnx.Bidirectional) + tuple(LAYOUTS)


def owns(obj: Any) -> bool:
    """NNX's own RNN, Bidirectional and stock cells (not carryover's jax_impl.nnx modules)."""
    return isinstance(obj, _OWNED) and type(obj).__module__.startswith("flax.")


TARGET = Target(NAME, "flax", to_jax, to_torch, port, owns)
