"""Data parallelism over the batch: one axis of a ``jax.sharding.Mesh`` splits the rows.

An LSTM's batch rows never interact, so every device runs the whole time loop on its own rows
with a replicated copy of the weights: ``run_stack`` inside ``jax.shard_map``, with inputs,
carry, lengths, resets and outputs split along the batch and no collective anywhere in the
forward pass (the backward pass sums the weight gradients once, after the loop).

The batch must divide evenly among the devices of the batch axis: an uneven batch is a
``ValueError`` naming both numbers (pad the batch yourself, with ``seq_lengths`` 0 for the
padded rows, if you need another size). Unbatched input cannot be split: also a ``ValueError``.

Example:
    >>> import functools
    >>> from jax.sharding import Mesh
    >>> from jax_impl import LSTM
    >>> mesh = Mesh(np.array(jax.devices()), ("batch",))
    >>> lstm = LSTM(hidden_size=8)
    >>> x = jnp.ones((2 * len(jax.devices()), 5, 4))
    >>> variables = lstm.init(jax.random.key(0), x)
    >>> y, (h, c) = lstm.apply(variables, x, mesh=mesh)           # y split along the batch
    >>> apply = jax.jit(functools.partial(lstm.apply, mesh=mesh))  # the mesh is static
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .cells import CellParts
from .scan import RunOptions, SequenceMasks, Step, run_stack

Array = jax.Array
BatchAxis = Union[str, tuple[str, ...]]
MeshLike = Union[Mesh, NamedSharding]

try:  # jax >= 0.6
    _shard_map = jax.shard_map
except AttributeError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

__all__ = [
    "resolve_mesh", "batch_devices", "check_batch", "batch_spec", "batch_sharding",
    "shard_batch", "replicate", "run_stack_sharded", "ShardedModule", "with_mesh",
]


# ------------------------------------------------------------------------------ the mesh


def resolve_mesh(mesh: MeshLike, batch_axis: BatchAxis = "batch") -> Mesh:
    """The ``Mesh`` to split the batch over, checked to have ``batch_axis``.

    Arguments:
        mesh: a ``jax.sharding.Mesh``, or a ``NamedSharding`` (its mesh is used).
        batch_axis: the mesh axis name (or a tuple of names) the batch is split over; other
            axes of the mesh hold replicas.

    Returns:
        The mesh.

    Example:
        >>> mesh = resolve_mesh(Mesh(np.array(jax.devices()), ("batch",)))
        >>> mesh.axis_names
        ('batch',)
    """
    if isinstance(mesh, NamedSharding):
        mesh = mesh.mesh
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or NamedSharding, got {type(mesh).__name__}"
        )
    for name in _axis_names(batch_axis):
        if name not in mesh.axis_names:
            raise ValueError(
                f"batch_axis {name!r} is not an axis of the mesh (axes {mesh.axis_names})"
            )
    return mesh


def _axis_names(batch_axis: BatchAxis) -> tuple[str, ...]:
    names = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"batch_axis must be a mesh axis name or a tuple of them, got {batch_axis!r}")
    return names


def batch_devices(mesh: Mesh, batch_axis: BatchAxis = "batch") -> int:
    """How many ways the batch is split: the size of the batch axis (product if several)."""
    return math.prod(mesh.shape[name] for name in _axis_names(batch_axis))


def check_batch(batch: Optional[int], mesh: Mesh, batch_axis: BatchAxis = "batch") -> None:
    """Raises ValueError unless a batch of ``batch`` rows (None: unbatched) splits evenly.

    Example:
        >>> mesh = Mesh(np.array(jax.devices()), ("batch",))
        >>> check_batch(6 * len(jax.devices()), mesh)   # 5 rows on 2 devices: ValueError
    """
    devices = batch_devices(mesh, batch_axis)
    if batch is None:
        raise ValueError(
            f"a mesh needs batched input to split along batch axis {batch_axis!r}, got unbatched "
            f"input; add a batch axis of size divisible by {devices}"
        )
    if batch % devices:
        raise ValueError(
            f"batch {batch} is not divisible by the {devices} devices of mesh axis "
            f"{batch_axis!r}; use a batch that is a multiple of {devices} (pad rows with "
            f"seq_lengths 0)"
        )


def batch_spec(ndim: int, batch_dim: int, batch_axis: BatchAxis = "batch") -> PartitionSpec:
    """``PartitionSpec`` splitting dimension ``batch_dim`` of a rank-``ndim`` array, rest whole.

    Trailing Nones are left out, as jit writes its outputs' specs: an equal but differently
    spelled spec would miss jit's dispatch cache (a carry placed by hand, then one from a step).
    """
    if not 0 <= batch_dim < ndim:
        raise ValueError(f"batch_dim must lie in [0, {ndim}) for a rank-{ndim} array, got {batch_dim}")
    return PartitionSpec(*([None] * batch_dim), batch_axis)


@functools.lru_cache(maxsize=256)  # one object per layout: cheap per-chunk placement checks
def batch_sharding(
    mesh: Mesh, ndim: int, batch_dim: int = 0, batch_axis: BatchAxis = "batch"
) -> NamedSharding:
    """The ``NamedSharding`` of a rank-``ndim`` array split along ``batch_dim``.

    Example:
        >>> mesh = Mesh(np.array(jax.devices()), ("batch",))
        >>> batch_sharding(mesh, 3, batch_dim=1).spec   # a carry (L*D, B, H)
        P(None, 'batch')
    """
    return NamedSharding(mesh, batch_spec(ndim, batch_dim, batch_axis))


def shard_batch(x: Any, mesh: MeshLike, batch_dim: int = 0, batch_axis: BatchAxis = "batch") -> Any:
    """Places every array of ``x`` (a pytree) on ``mesh``, split along ``batch_dim``.

    Arguments:
        x: arrays sharing a batch dimension at ``batch_dim``.
        mesh: the mesh; batch_axis: its axis that splits the batch.

    Returns:
        The same pytree of sharded ``jax.Array``s.

    Example:
        >>> mesh = Mesh(np.array(jax.devices()), ("batch",))
        >>> x = shard_batch(np.ones((8, 100, 16), np.float32), mesh)     # (B, T, F)
        >>> x.sharding.spec
        P('batch',)
    """
    mesh = resolve_mesh(mesh, batch_axis)
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, batch_sharding(mesh, jnp.ndim(a), batch_dim, batch_axis)), x
    )


def replicate(tree: Any, mesh: MeshLike) -> Any:
    """A copy of every array of ``tree`` on every device of ``mesh`` (parameters).

    Example:
        >>> mesh = Mesh(np.array(jax.devices()), ("batch",))
        >>> params = replicate({"w": jnp.ones(3)}, mesh)
    """
    mesh = mesh.mesh if isinstance(mesh, NamedSharding) else mesh
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or NamedSharding, got {type(mesh).__name__}"
        )
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ------------------------------------------------------------------------------ the driver


def run_stack_sharded(
    cell: Union[CellParts, Step],
    layer_weights: Sequence[Sequence[Any]],
    carry: Any,
    xs: Array,
    masks: SequenceMasks = SequenceMasks(),
    options: RunOptions = RunOptions(),
    *,
    mesh: Mesh,
    batch_axis: BatchAxis = "batch",
) -> tuple[Array, Any]:
    """``scan.run_stack`` with the batch split over ``mesh``: each device runs its own rows.

    Arguments:
        cell, layer_weights, carry, xs, masks, options: as for ``run_stack`` (time-major:
            ``xs`` ``(T, B, ...)``, carry leaves ``(L*D, B, ...)``, reset ``(T, B)``); the
            weights are replicated, everything else is split along B. Dropout keep masks are
            drawn for the full batch outside, so the run equals the one-device run with the
            same rng.
        mesh, batch_axis: the mesh and its axis that splits B (B divisible by its size; the
            caller checks, so the message names the user's shapes).

    Returns:
        ``(ys, final_carry)`` as ``run_stack`` returns them, split along B.
    """
    batch_axis = batch_axis if isinstance(batch_axis, str) else tuple(batch_axis)  # hashable
    masks = masks._replace(keep=None if masks.keep is None else list(masks.keep))
    return _sharded_jit(
        cell, layer_weights, carry, xs, masks, options, mesh=mesh, batch_axis=batch_axis
    )


def _sharded(cell, layer_weights, carry, xs, masks, options, *, mesh, batch_axis):
    """``run_stack`` under ``shard_map``: the body of ``run_stack_sharded``."""
    batched = batch_spec(2, 1, batch_axis)  # P(None, axis): dimension 1 is B for all of them

    def local(layer_weights, carry, xs, masks):
        # Mark the replicated weights as per-device once, before the loop: left to the loop,
        # every step would convert them, and the backward pass would all-reduce the weight
        # gradients at every step instead of once after it.
        layer_weights = _per_device(layer_weights, batch_axis)
        return run_stack(cell, layer_weights, carry, xs, masks, options)

    # A spec is a tree prefix: one PartitionSpec covers a whole (possibly empty) subtree.
    mask_specs = SequenceMasks(PartitionSpec(batch_axis), batched, batched)
    sharded = _shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), batched, batched, mask_specs),
        out_specs=(batched, batched),
    )
    return sharded(layer_weights, carry, xs, masks)


def _per_device(tree: Any, batch_axis: BatchAxis) -> Any:
    """``tree`` typed as varying over ``batch_axis`` inside shard_map (a no-op on values)."""
    axes = _axis_names(batch_axis)
    if hasattr(jax.lax, "pcast"):  # jax >= 0.8
        return jax.lax.pcast(tree, axes, to="varying")
    if hasattr(jax.lax, "pvary"):  # pragma: no cover - jax 0.6-0.7
        return jax.lax.pvary(tree, axes)
    return tree  # pragma: no cover - older shard_map: no varying types, nothing to do


# Compiled once per step function, mesh, options and shapes, like ``scan.run_stack_jit``: an
# eager ``apply(..., mesh=)`` would otherwise trace and compile the split program every call.
# Under an outer jit it is simply inlined.
_sharded_jit = jax.jit(_sharded, static_argnums=(0, 5), static_argnames=("mesh", "batch_axis"))


# ------------------------------------------------------------------------------ a module view


@dataclasses.dataclass(frozen=True)
class ShardedModule:
    """``module`` whose ``apply`` always runs over ``mesh``: for code that only calls ``apply``.

    Hashable (a static argument of ``jax.jit``) when the module is; every other attribute is
    the module's. ``jax_impl.Stateful`` unwraps it and keeps its carry on the mesh.

    Example:
        >>> from jax_impl import LSTM
        >>> lstm, x = LSTM(hidden_size=8), jnp.ones((2 * len(jax.devices()), 5, 4))
        >>> variables = lstm.init(jax.random.key(0), x)
        >>> port = with_mesh(lstm, Mesh(np.array(jax.devices()), ("batch",)))
        >>> y, carry = port.apply(variables, x)         # == lstm.apply(variables, x, mesh=mesh)
    """

    module: Any
    mesh: Mesh
    batch_axis: BatchAxis = "batch"

    def apply(self, variables: Any, *args, **kwargs):
        return self.module.apply(
            variables, *args, mesh=self.mesh, batch_axis=self.batch_axis, **kwargs
        )

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("module", "mesh", "batch_axis"):
            raise AttributeError(name)  # no recursion while (un)pickling or copying
        return getattr(self.module, name)


def with_mesh(module: Any, mesh: MeshLike, batch_axis: BatchAxis = "batch") -> ShardedModule:
    """``module`` with its ``apply`` split along the batch over ``mesh`` (see ``ShardedModule``).

    Example:
        >>> from jax_impl import LSTM
        >>> lstm, x = LSTM(hidden_size=8), jnp.ones((2 * len(jax.devices()), 5, 4))
        >>> variables = lstm.init(jax.random.key(0), x)
        >>> y, carry = with_mesh(lstm, Mesh(np.array(jax.devices()), ("batch",))).apply(variables, x)
    """
    return ShardedModule(module, resolve_mesh(mesh, batch_axis), batch_axis)
