"""``Stateful``: a stream that carries its carry from chunk to chunk under one jitted step.

Chunks of any length reuse a handful of compilations: the time axis is padded up to a bucket
length (1, 2, 3, 4, 6, 8, 12, 16, ...) and the padding masked out with ``seq_lengths``, so the
outputs and the final carry are exactly those of the unpadded chunk. A bucket met for the first
time runs in a larger one already compiled, so a ragged last chunk compiles nothing.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .checks import SequenceLayout, check_carry, check_reset, check_seq_lengths, check_x64
from .sharding import (
    BatchAxis,
    MeshLike,
    ShardedModule,
    batch_sharding,
    check_batch,
    replicate,
    resolve_mesh,
)

Array = jax.Array


def bucket_length(num_steps: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 1.5 * 2^k) >= ``num_steps``."""
    if num_steps <= 2:
        return max(num_steps, 1)
    power = 1 << (num_steps - 1).bit_length()  # smallest 2^k >= num_steps
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters >= num_steps else power


def stream_step(
    module: nn.Module,
    variables: Any,
    carry: Any,
    x: Array,
    seq_lengths: Optional[Array] = None,
    reset: Optional[Array] = None,
    *,
    mesh: Optional[MeshLike] = None,
    batch_axis: BatchAxis = "batch",
) -> tuple[Array, Any]:
    """The pure step of a stream: ``module.apply`` from a carry cut from the graph.

    ``stop_gradient`` on the incoming carry is truncated BPTT's boundary: gradients flow
    through this chunk only. ``mesh``, ``batch_axis``: run split along the batch (see
    ``LSTM.__call__``); bind them with ``functools.partial`` before ``jax.jit`` (static).
    """
    carry = jax.lax.stop_gradient(carry)
    if mesh is None:
        return module.apply(variables, x, carry, seq_lengths=seq_lengths, reset=reset)
    return module.apply(
        variables, x, carry, seq_lengths=seq_lengths, reset=reset, mesh=mesh,
        batch_axis=batch_axis,
    )


class Stateful:
    """Streams a sequence through ``module`` chunk by chunk, carrying its carry along.

    Arguments:
        module: a ``jax_impl`` sequence module: ``LSTM``, ``GRU``, ``RNN`` or ``ConvLSTM``.
        variables: its variables (``{'params': ...}``); omitted for a ``jax_impl.nnx`` module
            (``nnx.split`` takes its state when the stream is made; dropout stays off).
        carry: the initial carry (``LSTMState(h, c)``, or ``h`` for a GRU / RNN); None starts
            from zeros at the first chunk.
        mesh: a ``jax.sharding.Mesh`` (or ``NamedSharding``) to stream data-parallel: the
            variables are replicated on it, every chunk (and its seq_lengths and reset) is
            split along the batch over the ``batch_axis`` devices, and the carry stays split
            between chunks (``carry`` returns arrays with a ``NamedSharding`` over
            ``batch_axis``); no collective runs in the time loop. The stream must be batched,
            with a batch divisible by the size of ``batch_axis``, else ValueError. A
            ``jax_impl.sharding.ShardedModule`` (``with_mesh(module, mesh)``) as ``module``
            brings its own mesh.
        batch_axis: the mesh axis name (or tuple of names) that splits the batch.

    The step is ``jax.jit(stream_step)`` with the carry donated: its buffers are reused in
    place. ``carry`` hands out copies, so a carry you read stays valid. ``compilations``
    counts the programs the step has compiled.

    Example:
        >>> from jax_impl import LSTM
        >>> lstm = LSTM(hidden_size=64)
        >>> variables = lstm.init(jax.random.key(0), jnp.ones((8, 16, 32)))
        >>> stream = Stateful(lstm, variables)
        >>> y1 = stream(jnp.ones((8, 16, 32)))        # (8, 16, 64)
        >>> y2 = stream(jnp.ones((8, 5, 32)))         # continues; no new compile per length
        >>> stream.reset(jnp.array([True] + [False] * 7))   # row 0 starts a new sequence
        >>> h, c = stream.carry
        >>> stream.compilations
        1
    """

    def __init__(
        self,
        module: nn.Module,
        variables: Any = None,
        carry: Any = None,
        *,
        mesh: Optional[MeshLike] = None,
        batch_axis: BatchAxis = "batch",
    ):
        if isinstance(module, ShardedModule) and mesh is None:
            module, mesh, batch_axis = module.module, module.mesh, module.batch_axis
        if _is_nnx_module(module):  # its own variables: nnx.split, and Linen's apply
            from .nnx import LinenView  # noqa: PLC0415 - flax.nnx only when it is in use

            module = LinenView(module)
            variables = module.state if variables is None else variables
        elif variables is None:
            raise TypeError("Stateful needs the variables of a Linen module: "
                            "Stateful(module, variables)")
        if not all(hasattr(module, a) for a in ("time_major", "carry_shapes", "feature_rank")):
            raise TypeError(
                f"Stateful needs a jax_impl LSTM, GRU, RNN or ConvLSTM, got "
                f"{type(module).__name__}"
            )
        check_x64(variables, "Stateful's variables")
        self.module = module
        self.variables = variables
        self._feature_rank = module.feature_rank
        self._carry: Any = None
        self._traces = 0
        self.mesh = None if mesh is None else resolve_mesh(mesh, batch_axis)
        self.batch_axis = batch_axis
        self._lengths: dict[tuple[int, int], Array] = {}  # see _full_lengths
        self._padded: set[int] = set()  # time lengths run so far (compiled programs)
        self._requests: dict[int, int] = {}  # bucket -> chunks that asked for it
        step = functools.partial(stream_step, module)
        if self.mesh is not None:
            self.variables = replicate(variables, self.mesh)
            step = functools.partial(step, mesh=self.mesh, batch_axis=batch_axis)

        def counted(*args):
            self._traces += 1  # runs once per trace, and jit compiles each trace once
            return step(*args)

        self.step = jax.jit(counted, donate_argnums=(1,))
        if carry is not None:
            self.carry = carry

    # -- state ------------------------------------------------------------------------

    @property
    def carry(self) -> Any:
        """A copy of the carried state (None before the first chunk or after ``reset()``)."""
        if self._carry is None:
            return None
        return jax.tree_util.tree_map(jnp.copy, self._carry)

    @carry.setter
    def carry(self, carry: Any) -> None:
        if carry is None:
            self._carry = None
            return
        check_x64(carry, "the carry")
        leaves = jax.tree_util.tree_leaves(carry)
        if not leaves or not all(hasattr(a, "shape") for a in leaves):
            raise TypeError(f"carry must be arrays in the module's layout or None, got {carry!r}")
        batch_shape = tuple(leaves[0].shape[1:-1])  # (L*D, *batch_shape, features)
        carry = check_carry(carry, self.module.carry_shapes(batch_shape),
                            "the module's carry layout")
        # copies: the step donates the carry, which must not delete the caller's arrays
        self._carry = self._place_carry(
            jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), carry)
        )

    @property
    def compilations(self) -> int:
        """How many programs the step has compiled (one per bucket and variant)."""
        return self._traces

    def reset(self, mask=None) -> None:
        """Zeros the carry: all of it (``mask=None``), or the rows where a bool ``(B,)`` mask is true."""
        if mask is None or self._carry is None:
            if mask is not None:
                _check_mask(mask, None)
            self._carry = None
            return
        if not self._batched_carry():
            raise ValueError("reset(mask) needs a batched stream; this stream is unbatched")
        mask = _check_mask(mask, self._carry_leaf().shape[1])
        # where, not multiply: a NaN in a reset row must not survive the reset
        self._carry = jax.tree_util.tree_map(
            lambda a: jnp.where(mask.reshape((1, -1) + (1,) * (a.ndim - 2)), jnp.zeros_like(a), a),
            self._carry,
        )

    def _carry_leaf(self) -> Array:
        return jax.tree_util.tree_leaves(self._carry)[0]

    def _batched_carry(self) -> bool:
        return self._carry_leaf().ndim == 2 + self._feature_rank

    # -- the mesh ---------------------------------------------------------------------

    def _place_carry(self, carry: Any) -> Any:
        """The carry split along its batch dimension (1) over the mesh; unchanged without one."""
        if self.mesh is None:
            return carry
        h = jax.tree_util.tree_leaves(carry)[0]
        check_batch(h.shape[1] if h.ndim == 2 + self._feature_rank else None, self.mesh,
                    self.batch_axis)
        return jax.tree_util.tree_map(
            lambda a: jax.device_put(a, batch_sharding(self.mesh, a.ndim, 1, self.batch_axis)),
            carry,
        )

    def _place_batch(self, value, batch_dim: int):
        """A chunk-sized array split along ``batch_dim`` over the mesh; as is without one."""
        if self.mesh is None or value is None:
            return value
        sharding = batch_sharding(self.mesh, np.ndim(value), batch_dim, self.batch_axis)
        if isinstance(value, jax.Array) and value.sharding.is_equivalent_to(sharding, value.ndim):
            return value  # already split (an input pipeline's chunk): no dispatch per chunk
        # straight from numpy to its shards: no stop on the default device first
        return jax.device_put(value, sharding)

    def _full_lengths(self, batch: Optional[int], num_steps: int) -> Array:
        """The lengths of a chunk with no seq_lengths (``(B,)``, or ``()`` unbatched), on the
        device (split over the mesh) once per size: no transfer per chunk."""
        key = (batch, num_steps)
        if key not in self._lengths:
            value = np.full(() if batch is None else (batch,), num_steps, np.int32)
            self._lengths[key] = (
                jnp.asarray(value) if self.mesh is None else self._place_batch(value, 0)
            )
        return self._lengths[key]

    # -- streaming --------------------------------------------------------------------

    def _padded_length(self, num_steps: int) -> int:
        """The time length a chunk runs at: its bucket, or a larger one already compiled.

        A bucket seen for the first time borrows the smallest compiled bucket that fits (the
        padding is masked, so the result is the same), so a ragged last chunk compiles nothing;
        a bucket asked for again gets its own program.
        """
        tight = bucket_length(num_steps)
        self._requests[tight] = self._requests.get(tight, 0) + 1
        if tight not in self._padded and self._requests[tight] == 1:
            larger = [b for b in self._padded if b > tight]
            if larger:
                return min(larger)
        self._padded.add(tight)
        return tight

    def __call__(self, x: Array, *, seq_lengths=None, reset=None) -> Array:
        """Runs one chunk and keeps the final carry for the next.

        Arguments:
            x: a chunk in the module's layout (any number of steps >= 1).
            seq_lengths: optional ``(B,)`` valid steps per row of this chunk.
            reset: optional bool mask in the input's layout: zero the carry before marked steps.

        Returns:
            The chunk's output, in the input's layout.
        """
        if not isinstance(x, jax.Array):  # jnp.asarray costs ~70 us even on a jax.Array
            x = jnp.asarray(x)
        if x.ndim not in (1 + self._feature_rank, 2 + self._feature_rank):
            raise ValueError(
                f"chunk has rank {x.ndim} (shape {tuple(x.shape)}), expected "
                f"{1 + self._feature_rank} (unbatched) or {2 + self._feature_rank} (batched)"
            )
        layout = SequenceLayout(x, self.module.time_major, self._feature_rank)
        batched, batch, num_steps = layout.batched, layout.batch, layout.num_steps
        time_axis = layout.time_axis
        if num_steps < 1:
            raise ValueError(f"chunk has {num_steps} time steps, expected at least 1")

        if self._carry is None:
            if self.mesh is not None:
                check_batch(batch, self.mesh, self.batch_axis)  # before a placement fails on it
            spatial = tuple(x.shape[-1 - self._feature_rank + 1 : -1])
            batch_shape = ((batch,) if batched else ()) + spatial
            out = jax.eval_shape(self.module.apply, self.variables, x)
            dtype = jax.tree_util.tree_leaves(out[1])[0].dtype
            self._carry = self._place_carry(self.module.initialize_carry(batch_shape, dtype))
        elif self._batched_carry() != batched or (
            batched and self._carry_leaf().shape[1] != batch
        ):
            carried = self._carry_leaf().shape[1] if self._batched_carry() else "none (unbatched)"
            raise ValueError(
                f"input batch {batch if batched else 'none (unbatched)'} differs from the carried "
                f"state's batch {carried}; call reset() first"
            )

        # Always the masked program, padded or not: XLA fuses the masked and the plain scan
        # differently (last-ulp differences), and one stream must not mix the two.
        padded = self._padded_length(num_steps)
        if seq_lengths is None:
            lengths = self._full_lengths(batch if batched else None, num_steps)
        else:
            lengths = check_seq_lengths(seq_lengths, batch, num_steps)
            lengths = self._place_batch(lengths.reshape((batch,) if batched else ()), 0)
        if reset is not None:
            # checked before padding, so the message gives the chunk's shapes, not the bucket's
            reset = check_reset(reset, *layout.mask_shape())
        if padded != num_steps:  # each eager pad or slice is a dispatch: only when needed
            widths = [(0, 0)] * x.ndim
            widths[time_axis] = (0, padded - num_steps)
            x = jnp.pad(x, widths)
            if reset is not None:
                reset = jnp.pad(reset, widths[: reset.ndim])
        if self.mesh is not None:
            x = self._place_batch(x, 1 - time_axis)
            reset = self._place_batch(reset, 1 - time_axis)
        y, self._carry = self.step(self.variables, self._carry, x, lengths, reset)
        if padded != num_steps:
            y = jax.lax.slice_in_dim(y, 0, num_steps, axis=time_axis)
        return y

def _is_nnx_module(module: Any) -> bool:
    nnx = sys.modules.get("flax.nnx")  # imported wherever an NNX module exists
    return nnx is not None and isinstance(module, nnx.Module)


def _check_mask(mask, batch: Optional[int]) -> Array:
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"reset mask has dtype {mask.dtype}, expected bool")
    if batch is not None and mask.shape != (batch,):
        raise ValueError(f"reset mask has shape {mask.shape}, expected ({batch},) (carried batch)")
    return jnp.asarray(mask)
