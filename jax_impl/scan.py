"""The scan driver: layers, directions, sequence lengths and resets, apart from the cells.

Everything here is time-major: ``xs`` is ``(T, B, ...)`` with features last. A ``step`` is any
``step(weights, carry, x) -> (carry, y)`` (``cells.lstm_step``, ``cells.convlstm_step`` with its
options bound).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

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

    def body(carry, inputs):
        x, is_valid, is_reset = inputs
        if is_reset is not None:
            carry = _where_rows(is_reset, jax.tree_util.tree_map(jnp.zeros_like, carry), carry)
        new_carry, y = step(weights, carry, x)
        if is_valid is not None:
            new_carry = _where_rows(is_valid, new_carry, carry)
            y = _where_rows(is_valid, y, jnp.zeros_like(y))
        return new_carry, y

    carry, ys = jax.lax.scan(body, carry, (xs, valid, reset), reverse=reverse, unroll=unroll)
    if index is not None:
        ys = _take_time(ys, index)  # the reversal is its own inverse
    return carry, ys


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
