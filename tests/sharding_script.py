"""Sharded-vs-one-device checks, run by ``tests/test_sharding.py`` in a process of its own.

The forced host device count must be set before JAX creates its CPU backend, which the rest of
the suite has done long before; so this script sets it and prints one JSON object of results
(``{"check name": {...}}``) on its last line for the test to assert on.

What is compared, and why (each check's ``"per_device"``, ``"full"`` and ``"float64"``):

* ``per_device``: the mesh run against the one-device program run on each device's rows
  separately, concatenated. That is the same program on the same shapes, so it must match bit
  for bit.
* ``full``: the mesh run against the one-device run on the whole batch. Each device multiplies
  a quarter of the batch, and XLA:CPU picks its kernels and blockings by shape (and CPU), so
  the rounding may differ: float32 rounding only (e.g. 6e-8 on an AVX2 EPYC), not bits.
* ``float64`` (LSTM forward and gradients): the ``full`` comparison in float64
  (``jax.enable_x64`` scoped to that run), where rounding is ~1e-16, so a bound of 1e-14
  relative to the largest value still catches any real difference.

Run by hand: ``python tests/sharding_script.py [devices]`` (default 4).
"""

from __future__ import annotations

import os
import sys

# Run as a file, this directory would lead sys.path, and tests/jax_impl/ would shadow jax_impl:
# import the checkout this script sits in first, and this directory (for ``hlo``) last.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [
    p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE
] + [_HERE]

DEVICES = int(sys.argv[1]) if len(sys.argv) > 1 else 4
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import jax_impl  # noqa: E402

from hlo import collectives, loop_collectives  # noqa: E402


def _normal(rng: np.random.Generator, shape) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


def _variables(model, x: jax.Array, rng: np.random.Generator) -> Any:
    """Random variables of ``model``'s structure; ``model.init`` would compile a random
    program per parameter shape, the bulk of this script's time on a small machine."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.uniform(-0.4, 0.4, s.shape).astype(s.dtype)), shapes
    )


def _compare(reference, mesh) -> dict:
    """Bitwise equality, the largest abs difference and the reference's largest abs value
    over two pytrees of arrays."""
    pairs = [
        (np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(mesh))
    ]
    return {
        "bitwise": all(np.array_equal(a, b) for a, b in pairs),
        "max_abs": max(float(np.max(np.abs(a - b))) for a, b in pairs),
        "scale": max(float(np.max(np.abs(a))) for a, _ in pairs),
        "dtypes": sorted({str(a.dtype) for a, _ in pairs} | {str(b.dtype) for _, b in pairs}),
        "dtypes_equal": all(a.dtype == b.dtype for a, b in pairs),
    }


def _rows(tree: Any, axes: Any, k: int, parts: int) -> Any:
    """Part ``k`` of ``parts`` equal row blocks of every array of ``tree`` (``axes``: the batch
    axis of each, a tree prefix; None leaves a subtree whole, as a replicated argument)."""

    def cut(axis, subtree):
        if axis is None:
            return subtree
        return jax.tree_util.tree_map(
            lambda a: np.split(np.asarray(a), parts, axis=axis)[k], subtree
        )

    return jax.tree_util.tree_map(cut, axes, tree, is_leaf=lambda a: a is None)


def _per_device(f, args: tuple, arg_axes: tuple, out_axes: Any, parts: int) -> Any:
    """``jax.jit(f)`` on one device, run on each of ``parts`` row blocks separately (what each
    device of the mesh holds: the same program on the same shapes), results concatenated."""
    f = jax.jit(f)
    outs = [f(*_rows(args, arg_axes, k, parts)) for k in range(parts)]
    def join(axis, *subtrees):  # out_axes is a tree prefix: one axis for a whole subtree
        return jax.tree_util.tree_map(
            lambda *leaves: np.concatenate([np.asarray(a) for a in leaves], axis=axis), *subtrees
        )

    return jax.tree_util.tree_map(join, out_axes, *outs)


def _batch_spec(array: jax.Array) -> Any:
    """The mesh axis named by ``array``'s NamedSharding at each dimension (None elsewhere)."""
    sharding = array.sharding
    if not isinstance(sharding, NamedSharding):
        return f"not a NamedSharding: {type(sharding).__name__}"
    return list(sharding.spec) + [None] * (array.ndim - len(sharding.spec))


def _sharded_and_plain(f, args: tuple, mesh) -> tuple[Any, Any, str]:
    """``(one-device result, mesh result, compiled HLO text of the mesh program)``."""
    plain = jax.jit(f)(*args)
    compiled = jax.jit(functools.partial(f, mesh=mesh)).lower(*args).compile()
    return plain, compiled(*args), compiled.as_text()


def _hlo(text: str) -> dict:
    found, loops = loop_collectives(text)
    return {"while_loops": loops, "in_loops": found, "anywhere": collectives(text)}


def _to(tree: Any, dtype) -> Any:
    """The floating arrays of ``tree`` as ``dtype`` (ints and bools kept)."""
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def check_lstm(mesh: Mesh) -> dict:
    """2 layers, bidirectional, proj_size, seq_lengths, reset, a random carry, and inter-layer
    dropout. float32 with given keep masks (the per-device runs take their rows of them);
    float64 with the dropout rng (the masks are drawn for the whole batch before the split,
    so the same rng must give the same masks on the mesh)."""
    rng = np.random.default_rng(0)
    batch, steps = 2 * DEVICES, 6
    lstm = jax_impl.LSTM(8, num_layers=2, bidirectional=True, proj_size=5, dropout=0.25)
    x = _normal(rng, (batch, steps, 3))
    variables = _variables(lstm, x, rng)
    carry = tuple(_normal(rng, s) for s in lstm.carry_shapes((batch,)))
    lengths = jnp.asarray(rng.integers(0, steps + 1, batch), jnp.int32)
    reset = jnp.asarray(rng.random((batch, steps)) < 0.2)
    keep = jnp.asarray(rng.random((batch, steps, 2 * 5)) > 0.25)  # layer 0's output (B, T, D*P)

    def with_masks(variables, x, carry, lengths, reset, keep, mesh=None):
        return lstm.apply(
            variables, x, carry, seq_lengths=lengths, reset=reset, deterministic=False,
            dropout_masks=[keep], mesh=mesh,
        )

    args = (variables, x, carry, lengths, reset, keep)
    plain, sharded, text = _sharded_and_plain(with_masks, args, mesh)
    out_axes = (0, 1)  # y (B, T, F); h, c (L*D, B, H)
    parts = _per_device(with_masks, args, (None, 0, 1, 0, 0, 0), out_axes, DEVICES)
    result = {"per_device": _compare(parts, sharded), "full": _compare(plain, sharded)}
    result["hlo"] = _hlo(text)
    result["output_spec"] = _batch_spec(sharded[0])
    result["carry_specs"] = [_batch_spec(a) for a in sharded[1]]

    def with_rng(variables, x, carry, lengths, reset, key, mesh=None):
        return lstm.apply(
            variables, x, carry, seq_lengths=lengths, reset=reset, deterministic=False,
            rngs={"dropout": key}, mesh=mesh,
        )

    with jax.enable_x64(True):
        # unsafe_rbg: compiles in a fraction of threefry's time on CPU; the default threefry
        # key gives the same masks on the mesh as well (checked by hand)
        args = (*_to((variables, x, carry), jnp.float64), lengths, reset,
                jax.random.key(7, impl="unsafe_rbg"))
        plain, sharded, text = _sharded_and_plain(with_rng, args, mesh)
        result["float64"] = _compare(plain, sharded)
        result["hlo_rng"] = _hlo(text)
        # the dropout really acted: the traced program draws random bits (compiles nothing)
        jaxpr = str(jax.make_jaxpr(with_rng)(*args))
    result["draws_dropout"] = "random_bits" in jaxpr or "rng_bit_generator" in jaxpr
    return result


def check_convlstm(mesh: Mesh) -> dict:
    """Time-major, seq_lengths, reset; on a mesh with a second (replica) axis. One layer: the
    stacking is the LSTM's (one driver), and each layer costs the test a compile."""
    rng = np.random.default_rng(1)
    batch, steps = DEVICES, 5
    model = jax_impl.ConvLSTM(4, kernel_size=3, time_major=True)
    x = _normal(rng, (steps, batch, 6, 6, 2))
    variables = _variables(model, x, rng)
    carry = tuple(_normal(rng, s) for s in model.carry_shapes((batch, 6, 6)))
    lengths = jnp.asarray(rng.integers(0, steps + 1, batch), jnp.int32)
    reset = jnp.asarray(rng.random((steps, batch)) < 0.2)

    def run(variables, x, carry, lengths, reset, mesh=None):
        return model.apply(variables, x, carry, seq_lengths=lengths, reset=reset, mesh=mesh)

    # batch split over "batch" (half the devices), replicated over "replica"
    grid = Mesh(np.array(jax.devices()).reshape(DEVICES // 2, 2), ("batch", "replica"))
    args = (variables, x, carry, lengths, reset)
    plain, sharded, text = _sharded_and_plain(run, args, grid)
    out_axes = (1, 1)  # y (T, B, H, W, C); h, c (L, B, H, W, C)
    parts = _per_device(run, args, (None, 1, 1, 0, 1), out_axes, DEVICES // 2)
    result = {"per_device": _compare(parts, sharded), "full": _compare(plain, sharded)}
    result["hlo"] = _hlo(text)
    result["output_spec"] = _batch_spec(sharded[0])
    result["carry_specs"] = [_batch_spec(a) for a in sharded[1]]
    return result  # float64: the LSTM's checks cover the driver both share


def check_stateful(mesh: Mesh) -> dict:
    """A ragged stream (chunks of 5, 6 and 2 steps, a row reset, lengths) on the mesh, against
    one stream per device's rows (bitwise) and one stream over the whole batch (rounding)."""
    rng = np.random.default_rng(2)
    batch = 2 * DEVICES
    lstm = jax_impl.LSTM(8)
    x = _normal(rng, (batch, 13, 3))
    variables = _variables(lstm, x, rng)
    plain, sharded = jax_impl.Stateful(lstm, variables), jax_impl.Stateful(lstm, variables, mesh=mesh)
    rows = np.split(np.arange(batch), DEVICES)
    quarters = [jax_impl.Stateful(lstm, variables) for _ in rows]
    for stream in quarters[1:]:  # the same program on the same shapes: compiled once for all
        stream.step = quarters[0].step
    chunks, start, per_device, full, carry_specs, output_specs = [5, 6, 2], 0, [], [], [], []
    mask = np.arange(batch) % 3 == 0
    lengths = rng.integers(0, 3, batch).astype(np.int32)
    for k, n in enumerate(chunks):
        chunk = x[:, start : start + n]
        options = {"seq_lengths": lengths} if k == 2 else {}
        y_plain, y_sharded = plain(chunk, **options), sharded(chunk, **options)
        y_parts = [
            stream(np.asarray(chunk)[r], **{name: a[r] for name, a in options.items()})
            for stream, r in zip(quarters, rows)
        ]
        parts = (
            np.concatenate([np.asarray(y) for y in y_parts]),
            tuple(np.concatenate([np.asarray(s.carry[i]) for s in quarters], axis=1)
                  for i in range(2)),
        )  # fmt: skip
        per_device.append(_compare(parts, (y_sharded, sharded.carry)))
        full.append(_compare((y_plain, plain.carry), (y_sharded, sharded.carry)))
        carry_specs.append([_batch_spec(a) for a in sharded.carry])
        output_specs.append(_batch_spec(y_sharded))
        if k == 0:
            plain.reset(mask), sharded.reset(mask)
            for stream, r in zip(quarters, rows):
                stream.reset(mask[r])
            carry_specs.append([_batch_spec(a) for a in sharded.carry])  # after reset(mask)
        start += n

    def merged(diffs: list[dict]) -> dict:
        return {
            "bitwise": all(d["bitwise"] for d in diffs),
            "max_abs": max(d["max_abs"] for d in diffs),
            "dtypes_equal": all(d["dtypes_equal"] for d in diffs),
        }

    return {
        "per_device": merged(per_device),
        "full": merged(full),
        "carry_specs": carry_specs,
        "output_specs": output_specs,
        "compilations": sharded.compilations,
    }


def check_backward(mesh: Mesh) -> dict:
    """Gradients through the split program. The input gradient's rows never mix: bitwise
    against one device per row block. The weight gradients are summed over devices (an
    all-reduce whose order XLA chooses), so against the one-device run: rounding only; and
    summed once, after the time loop."""
    rng = np.random.default_rng(3)
    lstm = jax_impl.LSTM(8)
    x = _normal(rng, (2 * DEVICES, 6, 3))
    variables = _variables(lstm, x, rng)

    def loss(variables, x, mesh=None):
        y, (h, c) = lstm.apply(variables, x, mesh=mesh)
        return jnp.sum(y**2) + jnp.sum(h * c)

    grad = jax.grad(loss, argnums=(0, 1))
    plain, sharded, text = _sharded_and_plain(grad, (variables, x), mesh)
    x_parts = _per_device(lambda v, x: grad(v, x)[1], (variables, x), (None, 0), 0, DEVICES)
    result = {
        "per_device": _compare(x_parts, sharded[1]),  # the input gradient
        "full": _compare(plain, sharded),
        "hlo": _hlo(text),
    }
    with jax.enable_x64(True):
        args = _to((variables, x), jnp.float64)
        f64 = jax.jit(grad, static_argnames="mesh")
        result["float64"] = _compare(f64(*args), f64(*args, mesh=mesh))
    return result


def check_errors(mesh: Mesh) -> dict:
    """The messages of the ValueErrors for a batch the mesh cannot split, and no batch at all."""
    lstm = jax_impl.LSTM(4)
    odd = jnp.ones((DEVICES + 1, 3, 2))
    variables = _variables(lstm, odd, np.random.default_rng(3))
    messages = {}
    cases = {
        "apply_batch": lambda: lstm.apply(variables, odd, mesh=mesh),
        "apply_unbatched": lambda: lstm.apply(variables, odd[0], mesh=mesh),
        "stateful_batch": lambda: jax_impl.Stateful(lstm, variables, mesh=mesh)(odd),
        "stateful_unbatched": lambda: jax_impl.Stateful(lstm, variables, mesh=mesh)(odd[0]),
        "bad_axis": lambda: lstm.apply(variables, odd, mesh=mesh, batch_axis="rows"),
    }
    for name, call in cases.items():
        try:
            call()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages


def check_detector(mesh: Mesh) -> dict:
    """The HLO parser must see a collective placed inside a loop (else its silence means little)."""

    def body(h, x):
        return h + jax.lax.psum(x, "batch"), h

    def f(xs):
        return jax.lax.scan(body, jnp.zeros(xs.shape[1:], xs.dtype), xs)[0]

    sharded = jax.shard_map(
        f, mesh=mesh, in_specs=PartitionSpec(None, "batch"), out_specs=PartitionSpec("batch")
    )
    text = jax.jit(sharded).lower(jnp.ones((4, 2 * DEVICES))).compile().as_text()
    return _hlo(text)


def main() -> None:
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    results = {"devices": len(jax.devices())}
    checks = (check_lstm, check_convlstm, check_stateful, check_backward, check_errors,
              check_detector)
    for check in checks:
        results[check.__name__.removeprefix("check_")] = check(mesh)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
