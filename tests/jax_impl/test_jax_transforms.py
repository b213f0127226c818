"""JAX transformations through the modules: ``jit``, ``grad`` and ``vmap``.

* ``jax.jit(apply)`` equals the eager call (lengths, resets, carry, bidirectional, proj);
* gradients (params, input and initial carry) are finite and reach every parameter, through
  2 layers, inter-layer dropout, packed lengths (a length-0 row) and resets;
* a float64 central finite-difference check of the gradient along random directions
  (bidirectional projected ``LSTM`` with lengths; ``ConvLSTM`` with an even kernel);
* ``vmap`` over an extra leading axis of unbatched inputs (with carry and lengths) equals the
  batched call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import LSTM, ConvLSTM

from jax_test_helpers import init_variables, japply, to_numpy

F32_ATOL = 1e-6


def _f32(a):
    return np.asarray(a, np.float32)


@pytest.fixture(scope="module")
def lstm_case():
    """One bidirectional projected layer (2 scans), lengths with a 0, resets."""
    rng = np.random.default_rng(21)
    module = LSTM(hidden_size=4, bidirectional=True, proj_size=3)
    x = _f32(rng.normal(size=(3, 5, 2)))
    variables = init_variables(module, x, rng=rng)
    h_shape, c_shape = module.carry_shapes((3,))
    carry = (_f32(rng.normal(size=h_shape)), _f32(rng.normal(size=c_shape)))
    lengths = np.asarray([5, 3, 0])
    reset = np.asarray(np.array([[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], bool))
    return module, variables, x, carry, lengths, reset


def test_jit_equals_eager_call(lstm_case):
    module, variables, x, carry, lengths, reset = lstm_case
    eager = module.apply(variables, x, carry, seq_lengths=lengths, reset=reset)
    jitted = jax.jit(module.apply)(variables, x, carry, seq_lengths=lengths, reset=reset)
    for a, b in zip(jax.tree_util.tree_leaves(jitted), jax.tree_util.tree_leaves(eager)):
        np.testing.assert_allclose(a, b, rtol=0, atol=F32_ATOL)


def test_grad_is_finite_and_reaches_every_parameter(lstm_case):
    _, _, x, _, lengths, reset = lstm_case
    rng = np.random.default_rng(25)
    module = LSTM(hidden_size=4, num_layers=2, proj_size=3, dropout=0.5)
    variables = init_variables(module, x, rng=rng)
    carry = tuple(_f32(rng.normal(size=s)) for s in module.carry_shapes((3,)))

    def loss(variables, x, carry):
        y, (h, c) = module.apply(
            variables, x, carry, seq_lengths=lengths, reset=reset, deterministic=False,
            rngs={"dropout": jax.random.key(0)},
        )
        return jnp.sum(y**2) + jnp.sum(h) + jnp.sum(jnp.sin(c))

    grads = to_numpy(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(variables, x, carry))
    g_vars, g_x, g_carry = grads
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(g)), f"non-finite gradient at {jax.tree_util.keystr(path)}"
    for path, g in jax.tree_util.tree_leaves_with_path(g_vars):
        assert np.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"
    # the length-0 row's input never enters the output: its gradient is exactly zero
    np.testing.assert_array_equal(g_x[2], 0.0)
    assert np.any(g_x[0] != 0) and np.any(g_carry[0][:, 0] != 0)


def _directional_check(loss, args, rng, directions=3, eps=1e-6, rtol=1e-6):
    """grad(loss)·v against (loss(a + eps v) - loss(a - eps v)) / (2 eps), float64."""
    args = to_numpy(args)  # perturb in numpy: no eager jax op, no extra compilation
    value_fn = jax.jit(loss)
    grads = to_numpy(jax.jit(jax.grad(loss))(args))
    for _ in range(directions):
        v = jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape), args)
        plus = jax.tree_util.tree_map(lambda a, d: a + eps * d, args, v)
        minus = jax.tree_util.tree_map(lambda a, d: a - eps * d, args, v)
        numeric = (float(value_fn(plus)) - float(value_fn(minus))) / (2 * eps)
        analytic = sum(
            float(np.vdot(g, d))
            for g, d in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(v))
        )
        assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-9), (analytic, numeric)


def test_lstm_grad_matches_finite_differences_float64(x64):
    rng = np.random.default_rng(22)
    module = LSTM(hidden_size=3, bidirectional=True, proj_size=2, param_dtype=jnp.float64)
    x = rng.normal(size=(2, 3, 2))
    variables = init_variables(module, x, rng=rng)
    h_shape, c_shape = module.carry_shapes((2,))
    carry = (rng.normal(size=h_shape), rng.normal(size=c_shape))
    lengths = np.asarray([3, 2])
    w = rng.normal(size=(2, 3, 4))  # (B, T, 2 directions * proj 2)

    def loss(args):
        variables, x, carry = args
        y, (h, c) = module.apply(variables, x, carry, seq_lengths=lengths)
        return jnp.sum(w * y) + jnp.sum(h**2) + jnp.sum(jnp.tanh(c))

    _directional_check(loss, (variables, x, carry), rng)


def test_convlstm_grad_matches_finite_differences_float64(x64):
    rng = np.random.default_rng(23)
    module = ConvLSTM(hidden_channels=2, kernel_size=2, param_dtype=jnp.float64)
    x = rng.normal(size=(1, 3, 3, 3, 2))
    variables = init_variables(module, x, rng=rng)
    w = rng.normal(size=(1, 3, 3, 3, 2))

    def loss(args):
        variables, x = args
        y, (h, c) = module.apply(variables, x)
        return jnp.sum(w * y) + jnp.sum(c**2)

    _directional_check(loss, (variables, x), rng)


def test_vmap_over_unbatched_lstm_equals_batched_call(lstm_case):
    module, variables, x, (h0, c0), lengths, _ = lstm_case

    def one(x_row, h_row, c_row, n):
        return module.apply(variables, x_row, (h_row, c_row), seq_lengths=n)

    y_v, (h_v, c_v) = jax.jit(jax.vmap(one, in_axes=(0, 1, 1, 0), out_axes=(0, 1)))(
        x, h0, c0, lengths
    )
    y_b, (h_b, c_b) = japply(module)(variables, x, (h0, c0), seq_lengths=lengths)
    np.testing.assert_allclose(y_v, y_b, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_v, h_b, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_v, c_b, rtol=0, atol=F32_ATOL)


def test_vmap_over_unbatched_convlstm_equals_batched_call():
    rng = np.random.default_rng(24)
    module = ConvLSTM(hidden_channels=2, kernel_size=3, num_layers=2)
    x = _f32(rng.normal(size=(2, 4, 3, 3, 2)))
    variables = init_variables(module, x, rng=rng)
    y_v, (h_v, c_v) = jax.jit(
        jax.vmap(lambda x_row: module.apply(variables, x_row), out_axes=(0, 1))
    )(x)
    y_b, (h_b, c_b) = japply(module)(variables, x)
    assert y_v.shape == (2, 4, 3, 3, 2) and h_v.shape == (2, 2, 3, 3, 2)
    np.testing.assert_allclose(y_v, y_b, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_v, h_b, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_v, c_b, rtol=0, atol=F32_ATOL)
