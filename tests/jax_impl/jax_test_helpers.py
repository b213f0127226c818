"""Small helpers for the jax_impl unit tests (no jax_impl import here).

``init_variables`` builds a module's variables from a numpy Generator with the shapes
``module.init`` would produce, found by ``jax.eval_shape`` (tracing only). It replaces
``module.init`` in the tests because ``jax.random`` compiles a fresh threefry kernel for every
parameter shape, which costs seconds per module on a small CPU box.

``japply(module)`` is ``jax.jit(module.apply)``, one per (equal) module for the whole session,
returning numpy arrays. Outside ``jit`` every ``lax.scan`` is traced and compiled again on each
call, so an eager ``apply`` costs about twice a jitted one and never gets cheaper; likewise
every eager ``jnp`` op on a new shape compiles a small program. So the tests keep their inputs
and results in numpy, jit the calls they compare, and call ``apply`` eagerly only for the error
checks (which raise before anything is compiled).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def japply(module):
    """``jax.jit(module.apply)`` (``deterministic`` static) with numpy results, one per module."""
    jitted = jax.jit(module.apply, static_argnames=("deterministic",))

    def call(*args, **kwargs):
        return to_numpy(jitted(*args, **kwargs))

    call.jitted = jitted
    return call


def init_variables(
    module, *args, rng: np.random.Generator, scale: float = 0.5, dtype=None, **kwargs
):
    """``{'params': ...}`` shaped like ``module.init(key, *args, **kwargs)``, uniform in ±scale."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))

    def fill(s):
        return jnp.asarray(rng.uniform(-scale, scale, s.shape), dtype or s.dtype)

    return jax.tree_util.tree_map(fill, shapes)


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def to_numpy(tree):
    return jax.tree_util.tree_map(np.asarray, tree)
