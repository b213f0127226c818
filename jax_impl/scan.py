"""The scan driver: layers, directions, sequence lengths and resets, apart from the cells.

Everything here is time-major: ``xs`` is ``(T, B, ...)`` with features last, and works for any
cell type: a ``cells.CellParts`` (``dense_parts("gru")``, ``conv_parts()``, ...) carrying any
pytree (``LSTMState(h, c)``, or ``h`` alone). ``RunOptions`` says how to run and differentiate;
``SequenceMasks`` carries the per-run arrays (lengths, resets, dropout keep masks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from .cells import CellParts

Array = jax.Array
Step = Callable[[Any, Any, Array], tuple[Any, Array]]


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a stack runs: hashable, a static argument of ``jax.jit``.

    Arguments:
        backward: the gradient path. ``"batched"`` (default): a custom VJP whose backward loop
            carries only the recurrent terms and computes the weight and input gradients of all
            steps as one matmul (or convolution) each after the loop; reverse mode only.
            ``"autodiff"``: JAX's own differentiation of the scan (forward mode too: ``jax.jvp``,
            ``jax.jacfwd``). ``"remat"``: JAX's own, recomputing each step in the backward
            pass (``jax.checkpoint``) instead of storing its intermediates: less memory.
        unroll: time steps per scan iteration (speed only, same result).
        dropout: the inter-layer dropout rate the keep masks were drawn with.
    """

    backward: str = "batched"
    unroll: int = 1
    dropout: float = 0.0


class SequenceMasks(NamedTuple):
    """The per-run arrays of a stack, time-major; each None when unused.

    Arguments:
        lengths: ``(B,)`` ints in [0, T]: torch's packed-sequence semantics.
        reset: ``(T, B)`` bools: zero the carry before each marked step.
        keep: inter-layer dropout, one keep mask per gap between layers, each shaped like that
            layer's output ``(T, B, ...)``; applied as torch's F.dropout, ``y * (keep / (1 - p))``.
    """

    lengths: Optional[Array] = None
    reset: Optional[Array] = None
    keep: Optional[Sequence[Array]] = None


def _where_rows(mask: Array, new, old):
    """Per batch row: ``new`` where ``mask`` (B,) is true, else ``old``; pytrees of (B, ...)."""

    def pick(n, o):
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


def _zeros_like(tree):
    return jax.tree_util.tree_map(jnp.zeros_like, tree)


def _reversal_index(lengths: Array, num_steps: int) -> Array:
    """``(T, B)`` time index that reverses each row's valid prefix and keeps the padding."""
    t = jnp.arange(num_steps)[:, None]  # (T, 1)
    return jnp.where(t < lengths[None, :], lengths[None, :] - 1 - t, t)


def _take_time(xs: Array, index: Array) -> Array:
    """``xs[index[t, b], b]`` for (T, B, ...) ``xs`` and (T, B) ``index``."""
    index = index.reshape(index.shape + (1,) * (xs.ndim - 2))
    return jnp.take_along_axis(xs, index, axis=0)


def _plain_step(cell: Union[CellParts, Step], backward: str) -> Step:
    if backward == "remat":
        return jax.checkpoint(cell)
    return cell


def scan_direction(
    cell: Union[CellParts, Step],
    weights: Any,
    carry: Any,
    xs: Array,
    *,
    lengths: Optional[Array] = None,
    reset: Optional[Array] = None,
    reverse: bool = False,
    options: RunOptions = RunOptions(),
) -> tuple[Any, Array]:
    """Runs one layer in one direction over time, torch's packed-sequence semantics.

    Arguments:
        cell: a ``CellParts``, or (with ``backward="autodiff"`` or ``"remat"``) any step
            function ``step(weights, carry, x) -> (carry, y)``.
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
        options: ``RunOptions`` (the gradient path, unroll).

    Returns:
        ``(final_carry, ys)`` with ``ys`` ``(T, B, ...)`` in the original time order.

    Example:
        >>> from jax_impl.functional import DenseWeights, dense_parts
        >>> w = DenseWeights(jnp.ones((3, 8)), jnp.ones((8, 8)))
        >>> h, ys = scan_direction(dense_parts("rnn_tanh"), w, jnp.zeros((2, 8)), jnp.ones((5, 2, 3)))
        >>> ys.shape
        (5, 2, 8)
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

    if options.backward == "batched":
        if not isinstance(cell, CellParts):
            raise TypeError(
                f'backward="batched" needs a CellParts (dense_parts, conv_parts), got '
                f'{type(cell).__name__}; use backward="autodiff" for another step function'
            )
        carry = cell.kind.join(*cell.kind.split(carry))  # one pytree type in and out
        carry, ys = _scan_parts(cell, weights, carry, xs, valid, reset, reverse, options.unroll)
    else:
        step = _plain_step(cell, options.backward)
        carry, ys = _scan_plain(step, weights, carry, xs, valid, reset, reverse, options.unroll)
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
            carry = _where_rows(is_reset, _zeros_like(carry), carry)
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
def _scan_parts(cell: CellParts, weights, carry, xs, valid, reset, reverse: bool, unroll: int):
    """``_scan_plain`` for ``CellParts``, with a backward pass that batches the linear maps.

    Why: differentiated as it stands, a scan accumulates every weight gradient inside the
    backward loop, one small matmul per step and weight, on one core. Here the backward loop
    carries only what is recurrent (the hidden map's transpose and the update's derivative);
    the gradients of the weights and of ``xs`` are one large matmul (or convolution) each over
    all T*B rows, after the loop (benchmarks/README.md has the figures).
    """
    return _scan_plain(cell, weights, carry, xs, valid, reset, reverse, unroll)


def _scan_parts_fwd(cell, weights, carry, xs, valid, reset, reverse, unroll):
    def advance(weights, carry, x):
        new_carry, pre, h_full = cell.step_with_parts(weights, carry, x)
        h = cell.kind.split(new_carry)[0]
        # ``carry`` is what entered the step (after any reset): the hidden map's input.
        saved_h_full = h_full if cell.output_map is not None else None
        return new_carry, h, (pre, carry, saved_h_full)

    final, (ys, residuals) = jax.lax.scan(
        _sequence_body(advance, weights), carry, (xs, valid, reset), reverse=reverse, unroll=unroll
    )
    return (final, ys), (weights, xs, valid, reset, residuals)


def _combine_transpose(kind, pre):
    """The transpose of ``kind.combine`` (linear) at the shapes of ``pre``: ``d_pre -> (d_from_
    input, d_from_hidden)``."""
    # The VJP at zeros: ``combine`` is linear, so its VJP does not depend on the point; zeros
    # keep the arrays' full type (inside shard_map, their varying mesh axes), which
    # ``jax.linear_transpose`` of bare shapes would drop.
    zeros = jnp.zeros_like(jax.tree_util.tree_leaves(pre)[0])
    return jax.vjp(kind.combine, zeros, zeros)[1]


def _scan_parts_bwd(cell, reverse, unroll, saved, cotangents):
    weights, xs, valid, reset, (pre, carry_in, h_full) = saved
    kind = cell.kind
    d_final, d_ys = cotangents

    def body(d_carry, inputs):  # d_carry: with respect to the carry after this step
        d_y, pre_t, carry_prev, h_step, is_valid, is_reset = inputs
        d_h, d_rest = kind.split(d_carry)
        d_out = d_h + d_y  # the step's h went to the next step and to the output
        d_full = d_out
        if cell.output_map is not None:
            _, output_vjp = jax.vjp(lambda h: cell.output_map(weights, h), h_step)
            (d_full,) = output_vjp(d_out)
        h_prev, rest_prev = kind.split(carry_prev)
        _, update_vjp = jax.vjp(kind.update, pre_t, h_prev, rest_prev)
        d_pre, d_h_prev, d_rest_prev = update_vjp((d_full, d_rest))
        _, d_from_hidden = _combine_transpose(kind, pre_t)(d_pre)
        _, hidden_vjp = jax.vjp(lambda h: cell.hidden_map(weights, h), h_prev)
        d_h_prev = d_h_prev + hidden_vjp(d_from_hidden)[0]
        d_prev = kind.join(d_h_prev, d_rest_prev)
        if is_valid is not None:  # a step past the row's length left the carry as it was
            d_pre = _where_rows(is_valid, d_pre, _zeros_like(d_pre))
            d_out = _where_rows(is_valid, d_out, jnp.zeros_like(d_out))
            d_prev = _where_rows(is_valid, d_prev, d_carry)
        if is_reset is not None:  # the carry was zeroed before this step
            d_prev = _where_rows(is_reset, _zeros_like(d_prev), d_prev)
        return d_prev, (d_pre, d_out if h_step is not None else None)

    d_carry, (d_pre, d_outs) = jax.lax.scan(
        body,
        d_final,
        (d_ys, pre, carry_in, h_full, valid, reset),
        reverse=not reverse,
        unroll=unroll,
    )

    def over_time(a):  # (T, B, ...) -> (T*B, ...): every step as one batch
        return a.reshape((-1,) + a.shape[2:])

    d_pre = jax.tree_util.tree_map(over_time, d_pre)
    d_from_input, d_from_hidden = _combine_transpose(kind, d_pre)(d_pre)
    _, input_vjp = jax.vjp(cell.input_map, weights, over_time(xs))
    d_weights, d_xs = input_vjp(d_from_input)
    h_in = over_time(kind.split(carry_in)[0])
    _, hidden_vjp = jax.vjp(lambda w: cell.hidden_map(w, h_in), weights)
    parts = [d_weights, hidden_vjp(d_from_hidden)[0]]
    if h_full is not None:
        _, output_vjp = jax.vjp(lambda w: cell.output_map(w, over_time(h_full)), weights)
        parts.append(output_vjp(over_time(d_outs))[0])
    d_weights = jax.tree_util.tree_map(lambda *a: sum(a[1:], a[0]), *parts)
    return d_weights, d_carry, d_xs.reshape(xs.shape), None, None


_scan_parts.defvjp(_scan_parts_fwd, _scan_parts_bwd)


def _layer(carry: Any, k: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[k], carry)


def run_stack(
    cell: Union[CellParts, Step],
    layer_weights: Sequence[Sequence[Any]],
    carry: Any,
    xs: Array,
    masks: SequenceMasks = SequenceMasks(),
    options: RunOptions = RunOptions(),
) -> tuple[Array, Any]:
    """Runs a stack of layers, each with one or two directions, torch.nn.LSTM's way.

    Arguments:
        cell: the cell (see ``scan_direction``).
        layer_weights: ``[layer][direction]`` weights; direction 0 forward, 1 reverse.
        carry: a pytree of arrays stacked ``(layers * directions, B, ...)``, index
            ``layer * D + d`` (``LSTMState(h, c)``, or ``h``).
        xs: ``(T, B, ...)``.
        masks: ``SequenceMasks``: lengths and reset as in ``scan_direction``, dropout keep
            masks between layers.
        options: ``RunOptions``.

    Returns:
        ``(ys, final_carry)``: the last layer's outputs with directions concatenated on the
        feature axis (forward first), and the final carry in the layout of ``carry``.

    Example:
        >>> from jax_impl.functional import DenseWeights, dense_parts
        >>> w = DenseWeights(jnp.ones((3, 12)), jnp.ones((4, 12)))
        >>> ys, h = run_stack(dense_parts("gru"), [[w]], jnp.zeros((1, 2, 4)), jnp.ones((5, 2, 3)))
        >>> ys.shape, h.shape
        ((5, 2, 4), (1, 2, 4))
    """
    lengths, reset, keep = masks
    num_directions = len(layer_weights[0])
    finals = []
    for layer, directions in enumerate(layer_weights):
        outputs = []
        for d, weights in enumerate(directions):
            final, ys = scan_direction(
                cell, weights, _layer(carry, layer * num_directions + d), xs,
                lengths=lengths, reset=reset, reverse=d == 1, options=options,
            )
            finals.append(final)
            outputs.append(ys)
        xs = outputs[0] if num_directions == 1 else jnp.concatenate(outputs, axis=-1)
        if keep is not None and layer + 1 < len(layer_weights):
            scale = jnp.asarray(1.0 - options.dropout, xs.dtype)
            xs = xs * (keep[layer].astype(xs.dtype) / scale)
    return xs, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *finals)


# Compiled once per cell, options and shapes: an eager ``apply`` would otherwise retrace and
# recompile every scan on every call. Under an outer jit it is simply inlined.
run_stack_jit = jax.jit(run_stack, static_argnums=(0, 5))
