"""What every recurrent module does once its weights are declared, Linen and NNX alike.

``run_sequence`` checks the call's carry, lengths and resets against the module's sizes, casts
to the computation dtype, draws the dropout keep masks, and runs the stack on one device or over
a mesh. A module describes itself through ``StackConfig``; the math is in ``cells`` and the
time loop in ``scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

from .cells import CellParts, LSTMState, cast_weights, computation_dtype
from .checks import SequenceLayout, check_carry, check_reset, check_seq_lengths, check_x64
from .scan import RunOptions, SequenceMasks, run_stack_jit
from .sharding import BatchAxis, MeshLike, check_batch, resolve_mesh, run_stack_sharded

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """A module's sizes as the runner needs them.

    Arguments:
        cell_state: the carry is ``LSTMState(h, c)`` (else one array ``h``).
        num_layers, num_directions: the stack.
        hidden: features of ``c`` (and of h when there is no projection).
        output: features of h and of each direction's output.
        feature_rank: trailing feature axes of the input (1 dense, 3 convolutional).
        carry_layout: the carry's axes in words, for messages.
        dropout: inter-layer dropout rate.
        dtype: the computation dtype (None: Flax's promotion rule).
        options: ``RunOptions`` (the gradient path, unroll).
    """

    cell_state: bool
    num_layers: int
    num_directions: int
    hidden: int
    output: int
    feature_rank: int
    carry_layout: str
    dropout: float
    dtype: Any
    options: RunOptions

    def carry_shapes(self, batch_shape: tuple[int, ...]) -> Any:
        """The carry's shapes for ``batch_shape`` (``(B,)``, ``(B, H, W)``, or without B)."""
        stack = (self.num_layers * self.num_directions,) + tuple(batch_shape)
        if self.cell_state:
            return LSTMState(stack + (self.output,), stack + (self.hidden,))
        return stack + (self.output,)

    def zeros(self, batch_shape: tuple[int, ...], dtype) -> Any:
        """A zero carry."""
        return jax.tree_util.tree_map(
            lambda shape: jnp.zeros(shape, dtype), self.carry_shapes(batch_shape),
            is_leaf=lambda s: isinstance(s, tuple) and all(isinstance(n, int) for n in s),
        )


def _keep_masks(config: StackConfig, key, masks, shape, layout: SequenceLayout) -> list[Array]:
    """Every layer gap's full-batch keep mask ``(T, B, ...)``, drawn (or taken) before the batch
    is split, so a mesh run equals the one-device run with the same rng."""
    gaps = config.num_layers - 1
    if masks is None:
        keys = jax.random.split(key, gaps)
        return [jax.random.bernoulli(k, 1.0 - config.dropout, shape) for k in keys]
    if len(masks) != gaps:
        raise ValueError(
            f"dropout_masks has {len(masks)} masks, expected {gaps} "
            f"(one per gap between the {config.num_layers} layers)"
        )
    keeps = []
    for layer, mask in enumerate(masks):
        keep = layout.sequence_in(jnp.asarray(mask))
        if keep.shape != shape:
            expected = shape if layout.time_major else (shape[1], shape[0]) + shape[2:]
            raise ValueError(
                f"dropout_masks[{layer}] has shape {tuple(mask.shape)}, expected the layer "
                f"output's shape {tuple(expected)}"
            )
        keeps.append(keep)
    return keeps


def run_sequence(
    config: StackConfig,
    cell: CellParts,
    layer_weights: Sequence[Sequence[Any]],
    x: Array,
    carry: Any,
    layout: SequenceLayout,
    *,
    seq_lengths: Any = None,
    reset: Any = None,
    dropout_key: Optional[Array] = None,
    dropout_masks: Optional[Sequence[Array]] = None,
    mesh: Optional[MeshLike] = None,
    batch_axis: BatchAxis = "batch",
) -> tuple[Array, Any]:
    """Runs ``layer_weights`` over ``x`` with ``cell``; returns ``(y, final carry)`` in the
    input's layout.

    ``dropout_key``: a PRNG key when inter-layer dropout is on (training), else None. Without
    a key, ``dropout_masks`` (if given) are used as they are.
    """
    check_x64((x, layer_weights, carry), "the input, carry or parameters")
    dtype = computation_dtype(config.dtype, x, layer_weights)
    layer_weights = cast_weights(layer_weights, dtype)
    spatial = tuple(x.shape[x.ndim - config.feature_rank : -1])
    batch_shape = (() if layout.batch is None else (layout.batch,)) + spatial
    if carry is None:
        carry = config.zeros(batch_shape, dtype)
    carry = check_carry(carry, config.carry_shapes(batch_shape), config.carry_layout)
    lengths = None
    if seq_lengths is not None:
        lengths = check_seq_lengths(seq_lengths, layout.batch, layout.num_steps)
    if reset is not None:
        reset = layout.mask_in(check_reset(reset, *layout.mask_shape()))
    carry = jax.tree_util.tree_map(lambda a: a.astype(dtype), layout.carry_in(carry))
    xs = layout.sequence_in(x.astype(dtype))  # (T, B, ...)

    keep = None
    dropping = config.dropout > 0.0 and config.num_layers > 1
    if dropping and (dropout_key is not None or dropout_masks is not None):
        shape = tuple(xs.shape[:2]) + spatial + (config.num_directions * config.output,)
        keep = _keep_masks(config, dropout_key, dropout_masks, shape, layout)
    masks = SequenceMasks(lengths, reset, keep)
    options = dataclasses.replace(config.options, dropout=config.dropout)
    if mesh is None:
        ys, carry = run_stack_jit(cell, layer_weights, carry, xs, masks, options)
    else:
        mesh = resolve_mesh(mesh, batch_axis)
        check_batch(layout.batch, mesh, batch_axis)
        ys, carry = run_stack_sharded(
            cell, layer_weights, carry, xs, masks, options, mesh=mesh, batch_axis=batch_axis
        )
    return layout.sequence_out(ys), layout.carry_out(carry)
