"""The scan driver: layers, directions, sequence lengths and resets, apart from the cells.

Everything here is time-major: ``xs`` is ``(T, B, ...)`` with features last. A ``step`` is any
``step(weights, carry, x) -> (carry, y)`` (``cells.lstm_step``, ``cells.convlstm_step`` with its
options bound). A ``cells.Cell`` (``cells.lstm_cell(...)``, ``cells.convlstm_cell(...)``) is such a
step too, and gets a faster backward pass: see ``_scan_cell``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from .cells import Cell, lstm_update

Array = jax.Array
Step = Callable[[Any, Any, Array], tuple[Any, Array]]


def _where_rows(mask: Array, new, old):
    """Per batch row: ``new`` where ``mask`` (B,) is true, else ``old``; pytrees of (B, ...)."""

    def pick(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


def _reversal_index(lengths: Array, num_steps: int) -> Array:
    """``(T, B)`` time index that reverses each row's valid prefix and keeps the padding."""
    t = jnp.arange(num_steps)[:, None]  # (T, 1)
    return jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def _take_time(xs: Array, index: Array) -> Array:
    """``xs[index[t, b], b]`` for (T, B, ...) ``xs`` and (T, B) ``index``."""
    index = index.reshape(index.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, index, axis=0)


def scan_direction(
    step: Step,
    weights: Any,
    carry: Any,
    xs: Array,
    *,
    lengths: Optional[Array] = None,
    reset: Optional[Array] = None,
    reverse: bool = False,
    unroll: int = 1,
) -> tuple[Any, Array]:
    """Runs one layer in one direction over time, torch's packed-sequence semantics.

    Arguments:
        step: the cell function.
        weights: its parameters.
        carry: the initial carry, a pytree of ``(B, ...)`` arrays.
        xs: inputs ``(T, B, ...)``.
        lengths: ``(B,)`` ints in [0, T] or None. The forward direction stops at each row's last
            valid step; the reverse one runs over the valid prefix only, from ``len-1`` to 0.
            Outputs past a row's length are zero; length 0 keeps the initial carry.
        reset: ``(T, B)`` bools or None: the carry is zeroed before each marked step (in the
            reverse direction, a reset at ``t`` zeroes it before step ``t-1``, so the two
            halves of a split sequence never see each other).
        reverse: run from the end.
        unroll: ``jax.lax.scan``'s unroll.

    A ``cells.Cell`` step gets ``_scan_cell``'s backward pass (reverse mode only: ``jax.jvp``
    needs a plain step function); any other step, JAX's own differentiation of the scan.

    Returns:
        ``(final_carry, ys)`` with ``ys`` ``(T, B, ...)`` in the original time order.
    """
    num_steps = xs.shape[0]
    if reset is not None and lengths is not None:
        # A flag in a row's padding belongs to no step of it: it must not touch its carry.
        reset = reset & (jnp.arange(num_steps)[:, None] < lengths[None, :])
    if reverse and reset is not None:
        # Seen backwards, a segment starting at t ends at t: zero before step t-1 instead.
        reset = jnp.concatenate([reset[1:], jnp.zeros_like(reset[:1])], axis=0)

    index = None
    if reverse and lengths is not None:
        # Reverse each row's valid prefix in place, then scan forward; padding stays at the end.
        index = _reversal_index(lengths, num_steps)
        xs = _take_time(xs, index)
        if reset is not None:
            reset = _take_time(reset, index)
        reverse = False

    valid = None
    if lengths is not None:
        valid = jnp.arange(num_steps)[:, None] < lengths[None, :]  # (T, B)

    if isinstance(step, Cell):
        carry, ys = _scan_cell(step, weights, carry, xs, valid, reset, reverse, unroll)
    else:
        carry, ys = _scan_plain(step, weights, carry, xs, valid, reset, reverse, unroll)
    if index is not None:
        ys = _take_time(ys, index)  # the reversal is its own inverse
    return carry, ys


def _sequence_body(advance: Callable, weights: Any) -> Callable:
    """The scan body around one step: reset the carry before it, keep it where invalid.

    ``advance(weights, carry, x) -> (carry, y, extra)``; ``extra`` is stacked over time as is.
    """

    def body(carry, inputs):
        x, is_valid, is_reset = inputs
        if is_reset is not None:
            carry = _where_rows(is_reset, jax.tree_util.tree_map(jnp.zeros_like, carry), carry)
        new_carry, y, extra = advance(weights, carry, x)
        if is_valid is not None:
            new_carry = _where_rows(is_valid, new_carry, carry)
            y = _where_rows(is_valid, y, jnp.zeros_like(y))
        return new_carry, (y, extra)

    return body


def _scan_plain(step, weights, carry, xs, valid, reset, reverse, unroll):
    def advance(weights, carry, x):
        return (*step(weights, carry, x), None)

    carry, (ys, _) = jax.lax.scan(
        _sequence_body(advance, weights), carry, (xs, valid, reset), reverse=reverse, unroll=unroll
    )
    return carry, ys


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7))
def _scan_cell(cell: Cell, weights, carry, xs, valid, reset, reverse: bool, unroll: int):
    """``_scan_plain`` for a ``Cell``, with a backward pass that batches the linear maps.

    Why: differentiated as it stands, a scan accumulates every weight gradient inside the
    backward loop, one small matmul per step and weight, on one core. Here the backward loop
    carries only what is recurrent (``dh W_hh^T`` and the gate derivatives); the gradients of
    the weights and of ``xs`` are one large matmul (or convolution) each over all T*B rows,
    after the loop. Measured at B32 T128 H128: forward+backward 2.3x -> 1.6-1.7x torch's time.
    """
    return _scan_plain(cell, weights, carry, xs, valid, reset, reverse, unroll)


def _scan_cell_fwd(cell, weights, carry, xs, valid, reset, reverse, unroll):
    def advance(weights, carry, x):
        new_carry, gates, h_full = cell.step_with_gates(weights, carry, x)
        projected = h_full is not new_carry[0]  # Cell.output returns h itself when it is no map
        # ``carry`` is what entered the step (after any reset): the hidden map's input.
        return new_carry, new_carry[0], (gates, carry, h_full if projected else None)

    final, (ys, residuals) = jax.lax.scan(
        _sequence_body(advance, weights), carry, (xs, valid, reset), reverse=reverse, unroll=unroll
    )
    return (final, ys), (weights, xs, valid, reset, residuals)


def _scan_cell_bwd(cell, reverse, unroll, saved, cotangents):
    weights, xs, valid, reset, (gates, (h_in, c_in), h_full) = saved
    d_final, d_ys = cotangents

    def body(d_carry, inputs):
        d_h, d_c = d_carry  # with respect to the carry after this step
        d_y, g, h_prev, c_prev, h_step, is_valid, is_reset = inputs
        d_out = d_h + d_y  # the step's h went to the next step and to the output
        d_full = d_out
        if h_step is not None:
            _, output_vjp = jax.vjp(lambda h: cell.output(weights, h), h_step)
            (d_full,) = output_vjp(d_out)
        _, update_vjp = jax.vjp(lstm_update, g, c_prev)
        d_gates, d_c_prev = update_vjp((d_full, d_c))
        _, hidden_vjp = jax.vjp(lambda h: cell.hidden_gates(weights, h), h_prev)
        (d_h_prev,) = hidden_vjp(d_gates)
        if is_valid is not None:  # a step past the row's length left the carry as it was
            d_gates = _where_rows(is_valid, d_gates, jnp.zeros_like(d_gates))
            d_out = _where_rows(is_valid, d_out, jnp.zeros_like(d_out))
            d_h_prev, d_c_prev = _where_rows(is_valid, (d_h_prev, d_c_prev), (d_h, d_c))
        if is_reset is not None:  # the carry was zeroed before this step
            zeros = (jnp.zeros_like(d_h_prev), jnp.zeros_like(d_c_prev))
            d_h_prev, d_c_prev = _where_rows(is_reset, zeros, (d_h_prev, d_c_prev))
        return (d_h_prev, d_c_prev), (d_gates, d_out if h_step is not None else None)

    d_carry, (d_gates, d_outs) = jax.lax.scan(
        body,
        tuple(d_final),
        (d_ys, gates, h_in, c_in, h_full, valid, reset),
        reverse=not reverse,
        unroll=unroll,
    )

    def over_time(a):  # (T, B, ...) -> (T*B, ...): every step as one batch
        return a.reshape((-1,) + a.shape[2:])

    _, input_vjp = jax.vjp(cell.input_gates, weights, over_time(xs))
    d_weights, d_xs = input_vjp(over_time(d_gates))
    _, hidden_vjp = jax.vjp(lambda w: cell.hidden_gates(w, over_time(h_in)), weights)
    parts = [d_weights, hidden_vjp(over_time(d_gates))[0]]
    if h_full is not None:
        _, output_vjp = jax.vjp(lambda w: cell.output(w, over_time(h_full)), weights)
        parts.append(output_vjp(over_time(d_outs))[0])
    d_weights = jax.tree_util.tree_map(lambda *a: sum(a[1:], a[0]), *parts)
    return d_weights, d_carry, d_xs.reshape(xs.shape), None, None


_scan_cell.defvjp(_scan_cell_fwd, _scan_cell_bwd)


def run_stack(
    step: Step,
    layer_weights: Sequence[Sequence[Any]],
    carry: tuple[Array, Array],
    xs: Array,
    *,
    lengths: Optional[Array] = None,
    reset: Optional[Array] = None,
    keep_masks: Optional[Sequence[Array]] = None,
    dropout: float = 0.0,
    unroll: int = 1,
) -> tuple[Array, tuple[Array, Array]]:
    """Runs a stack of layers, each with one or two directions, torch.nn.LSTM's way.

    Arguments:
        step: the cell function.
        layer_weights: ``[layer][direction]`` weights; direction 0 forward, 1 reverse.
        carry: ``(h, c)`` stacked ``(layers * directions, B, ...)``, index ``layer * D + d``.
        xs: ``(T, B, ...)``.
        lengths, reset, unroll: as in ``scan_direction``.
        keep_masks: inter-layer dropout: one keep mask per gap between layers, each shaped
            like that layer's output ``(T, B, ...)``; applied as torch's F.dropout,
            ``y * (keep / (1 - dropout))``. None: no dropout.
        dropout: the rate the masks were drawn with.

    Returns:
        ``(ys, (h_n, c_n))``: the last layer's outputs with directions concatenated on the
        feature axis (forward first), and the final carry in the layout of ``carry``.
    """
    h0, c0 = carry
    num_directions = len(layer_weights[0])
    final_h, final_c = [], []
    for layer, directions in enumerate(layer_weights):
        outputs = []
        for d, weights in enumerate(directions):
            k = layer * num_directions + d
            (h, c), ys = scan_direction(
                step,
                weights,
                (h0[k], c0[k]),
                xs,
                lengths=lengths,
                reset=reset,
                reverse=d == 1,
                unroll=unroll,
            )
            final_h.append(h)
            final_c.append(c)
            outputs.append(ys)
        xs = outputs[0] if num_directions == 1 else jnp.concatenate(outputs, axis=-1)
        if keep_masks is not None and layer + 1 < len(layer_weights):
            xs = xs * (keep_masks[layer].astype(xs.dtype) / jnp.asarray(1.0 - dropout, xs.dtype))
    return xs, (jnp.stack(final_h), jnp.stack(final_c))


# Compiled once per step function, options and shapes: an eager ``apply`` would otherwise
# retrace and recompile every scan on every call. Under an outer jit it is simply inlined.
run_stack_jit = jax.jit(run_stack, static_argnums=0, static_argnames=("dropout", "unroll"))
