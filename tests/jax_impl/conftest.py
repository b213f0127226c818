"""Fixtures shared by the jax_impl unit tests.

* ``x64``: float64 scoped to one test with ``jax.enable_x64(True)`` (never flipped globally);
  an autouse guard fails any test that leaves x64 switched on behind it.
* ``rng``: a seeded numpy Generator, so every test is reproducible.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def x64():
    """Runs the test body with 64-bit types enabled, for this test only."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def _x64_does_not_leak():
    yield
    assert jnp.asarray(1.0).dtype == jnp.float32, "a test left jax_enable_x64 switched on"


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy Generator seeded from the test's name (stable across runs and orderings)."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.name)) % (2**32)
    return np.random.default_rng(seed)
