"""Equinox as a target: ``eqx.nn.LSTMCell`` and ``eqx.nn.GRUCell``.

Equinox keeps torch's ``(G*H, F)`` layout and gate order, with one bias: the LSTM's is
``bias_ih + bias_hh``; the GRU's ``bias`` holds the r and z sums and ``b_in``, and ``bias_n``
holds ``b_hn`` (the reset gate multiplies it, so it stays apart). Its cells take one unbatched
step; the port scans them over time and maps them over the batch. One layer, one direction,
no projection, no packed lengths (nn.LSTM / nn.GRU with ``num_layers=1`` or the cells).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

from ..convert import numpy_to_tensor
from . import (
    Piece,
    Target,
    apply_table,
    as_is,
    check_one_layer,
    grads_to_torch,
    summed,
    table_to_torch,
    unsupported,
)

NAME = "equinox"
_CELLS = {"lstm": eqx.nn.LSTMCell, "lstm_cell": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell,
          "gru_cell": eqx.nn.GRUCell}


def _gru_biases(bias_ih: str, bias_hh: str) -> Piece:
    """torch's two GRU biases as Equinox's ``bias`` (r, z sums and ``b_in``) and ``bias_n``."""

    def to_jax(b_ih, b_hh):
        size = b_ih.shape[0] // 3
        folded = b_ih + np.concatenate([b_hh[: 2 * size], np.zeros_like(b_hh[2 * size :])])
        return folded, b_hh[2 * size :]

    def to_torch(bias, bias_n):
        return bias, np.concatenate([np.zeros_like(bias[: 2 * bias_n.shape[0]]), bias_n])

    def grad_to_torch(bias, bias_n):
        return bias, np.concatenate([bias[: 2 * bias_n.shape[0]], bias_n])

    return Piece((bias_ih, bias_hh), (("bias",), ("bias_n",)), to_jax, to_torch, grad_to_torch)


def _table(kind: str, suffix: str, bias: bool) -> list[Piece]:
    """torch names (``weight_ih{suffix}`` ...) <-> the Equinox cell's fields."""
    table = [as_is(f"weight_ih{suffix}", ("weight_ih",)),
             as_is(f"weight_hh{suffix}", ("weight_hh",))]
    if bias:
        names = (f"bias_ih{suffix}", f"bias_hh{suffix}")
        if kind.startswith("gru"):
            table.append(_gru_biases(*names))
        else:
            table.append(summed(names, lambda name: as_is(name, ("bias",))))
    return table


def _check(spec, module) -> None:
    check_one_layer(spec, module, NAME, spec.kind in _CELLS)
    if not spec.is_cell and module.bidirectional:
        raise unsupported("bidirectional", NAME, True)


def _fields(cell: Any) -> dict:
    return {name: getattr(cell, name) for name in ("weight_ih", "weight_hh", "bias", "bias_n")
            if getattr(cell, name, None) is not None}


def to_jax(spec, module, state, *, time_major=None):
    """``(eqx cell, None)`` holding the torch weights (the cell is its own variables)."""
    del time_major  # a cell takes one step; the layout is the port's business
    _check(spec, module)
    suffix = "" if spec.is_cell else "_l0"
    arrays = apply_table(_table(spec.kind, suffix, module.bias), state)
    cell = _CELLS[spec.kind](module.input_size, module.hidden_size, use_bias=module.bias,
                             dtype=jnp.dtype(state[f"weight_ih{suffix}"].dtype),
                             key=jax.random.key(0))
    names = list(arrays)
    return eqx.tree_at(lambda c: [getattr(c, n) for n in names], cell,
                       [jnp.asarray(arrays[n]) for n in names]), None


def to_torch(cell, variables=None):
    """The torch cell (nn.LSTMCell / nn.GRUCell) with the Equinox cell's weights."""
    del variables
    kind = "lstm_cell" if isinstance(cell, eqx.nn.LSTMCell) else "gru_cell"
    table = _table(kind, "", cell.use_bias)
    state = table_to_torch(table, {k: np.asarray(v) for k, v in _fields(cell).items()},
                           f"{NAME} {type(cell).__name__}")
    torch_class = torch.nn.LSTMCell if kind == "lstm_cell" else torch.nn.GRUCell
    dtype = numpy_to_tensor(np.zeros(0, state["weight_ih"].dtype)).dtype
    module = torch_class(cell.input_size, cell.hidden_size, bias=cell.use_bias, dtype=dtype)
    module.load_state_dict({k: numpy_to_tensor(v) for k, v in state.items()})
    return module


def port(spec, module, cell, variables):
    """Scans the cell over time (vmapped over the batch) from a carry in torch's order."""
    from ..harness import Port

    _check(spec, module)
    time_major = spec.is_cell or not module.batch_first
    suffix = "" if spec.is_cell else "_l0"
    table = _table(spec.kind, suffix, cell.use_bias)

    def run(cell, x, carry, lengths, masks):
        if lengths is not None:
            raise ValueError(f"the {NAME} port has no packed sequences (seq_lengths)")
        del masks  # one layer: no inter-layer dropout
        batched = x.ndim == 3
        xs = x if (time_major or not batched) else jnp.swapaxes(x, 0, 1)
        state = tuple(s if spec.is_cell else s[0] for s in carry)  # drop the layer axis
        step = cell if batched is False else jax.vmap(cell)
        if spec.cell_state:
            def body(state, xt):
                h, c = step(xt, state)
                return (h, c), h
        else:
            def body(state, xt):
                h = step(xt, state[0])
                return (h,), h
        final, ys = jax.lax.scan(body, state, xs)
        ys = ys if (time_major or not batched) else jnp.swapaxes(ys, 0, 1)
        return ys, tuple(s if spec.is_cell else s[None] for s in final)

    def grads_as_torch(grads):
        return grads_to_torch(table, _fields(grads), f"{NAME} gradients")

    return Port(run, grads_as_torch), cell


TARGET = Target(NAME, "equinox", to_jax, to_torch, port,
                owns=lambda obj: isinstance(obj, tuple(set(_CELLS.values()))))
