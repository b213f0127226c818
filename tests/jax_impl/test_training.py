"""jax_impl.training: the TBPTT step (stop_gradient, donation, remat) and torch-style clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_impl
from jax_impl import (
    LSTM,
    ConvLSTM,
    clip_by_global_norm_torch,
    make_tbptt_step,
    mse_loss,
    remat_apply,
)

B, T, F, H = 2, 6, 3, 4


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def x64():
    """float64 for one test only (never switched on globally)."""
    with jax.enable_x64(True):
        yield


def _random_variables(module, x, rng, scale=0.3):
    """Random weights of the right shapes without compiling ``init`` (shapes by tracing only)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def _setup(rng, dtype=jnp.float32):
    lstm = LSTM(H, param_dtype=dtype)
    x = jnp.asarray(rng.normal(size=(B, T, F)), dtype)
    y = jnp.asarray(rng.normal(size=(B, T, H)), dtype)
    return lstm, _random_variables(lstm, x, rng), x, y


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_step_is_value_and_grad_then_optax(rng, x64):
    lstm, variables, x, y = _setup(rng, jnp.float64)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables["params"])
    carry = tuple(jnp.asarray(rng.normal(size=s.shape)) for s in lstm.initialize_carry((B,), jnp.float64))

    def loss(params):
        out, new_carry = lstm.apply({"params": params}, x, carry)
        return mse_loss(out, y), new_carry

    @jax.jit
    def reference(params):
        (loss_value, new_carry), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, _ = tx.update(grads, opt_state, params)
        return loss_value, new_carry, optax.apply_updates(params, updates)

    want_loss, want_carry, want_params = reference(variables["params"])

    step = make_tbptt_step(lstm, tx)
    new_vars, _, new_carry, got_loss = step(variables, opt_state, tuple(jnp.copy(a) for a in carry), x, y)
    assert abs(float(got_loss) - float(want_loss)) <= 1e-14
    assert _max_diff(new_vars["params"], want_params) <= 1e-14
    assert _max_diff(new_carry, want_carry) <= 1e-14


def test_carry_is_cut_from_the_graph(rng):
    """stop_gradient at the chunk boundary: the loss does not differentiate into the old carry."""
    lstm, variables, x, y = _setup(rng)
    tx = optax.sgd(0.1)
    step = make_tbptt_step(lstm, tx, jit=False)
    carry = lstm.initialize_carry((B,))
    opt_state = tx.init(variables["params"])
    grad = jax.jit(jax.grad(lambda c: step(variables, opt_state, c, x, y)[3]))(carry)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grad)


def test_carry_is_donated_and_chunks_continue_the_stream(rng):
    lstm, variables, x, y = _setup(rng)
    tx = optax.sgd(0.0)  # weights fixed: the carries must be the stream's
    step = make_tbptt_step(lstm, tx)
    opt_state, carry = tx.init(variables["params"]), lstm.initialize_carry((B,))
    stream = jax_impl.Stateful(lstm, variables)
    for chunk in (x[:, :3], x[:, 3:]):
        given = carry
        variables, opt_state, carry, _ = step(variables, opt_state, carry, chunk, y[:, :3])
        assert given[0].is_deleted() and given[1].is_deleted()
        stream(chunk)
    np.testing.assert_allclose(np.asarray(carry[0]), np.asarray(stream.carry[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(carry[1]), np.asarray(stream.carry[1]), atol=1e-6)


@pytest.mark.parametrize("kind", ["lstm", "convlstm"])
def test_remat_changes_memory_not_values(rng, kind):
    if kind == "lstm":
        module = LSTM(H, bidirectional=True)
        x = jnp.asarray(rng.normal(size=(B, 16, F)), jnp.float32)
        batch_shape, out_features = (B,), 2 * H
    else:
        module = ConvLSTM(2, 3, time_major=True)
        x = jnp.asarray(rng.normal(size=(16, B, 4, 4, 1)), jnp.float32)
        batch_shape, out_features = (B, 4, 4), 2
    variables = _random_variables(module, x, rng)
    y = jnp.asarray(rng.normal(size=x.shape[:-1] + (out_features,)), jnp.float32)
    tx = optax.adam(1e-2)
    opt_state = tx.init(variables["params"])
    results, temp = [], []
    for remat in (False, True):
        step = make_tbptt_step(module, tx, remat=remat)
        carry = module.initialize_carry(batch_shape)
        compiled = step.lower(variables, opt_state, carry, x, y).compile()
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
        results.append(compiled(variables, opt_state, carry, x, y))
    # the same loss, new carry and new weights: remat recomputes, it does not change the math
    assert abs(float(results[0][3]) - float(results[1][3])) <= 1e-6
    assert _max_diff(results[0][2], results[1][2]) <= 1e-6
    assert _max_diff(results[0][0], results[1][0]) <= 1e-6
    assert temp[1] < temp[0], f"remat temp {temp[1]} bytes, plain {temp[0]}"


@pytest.mark.parametrize("norm_scale", [0.5, 20.0])  # below and above max_norm
def test_clip_is_torchs_formula(rng, norm_scale, x64):
    grads = {"a": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=(5,)))}
    total = float(np.sqrt(sum(np.sum(np.asarray(g) ** 2) for g in grads.values())))
    grads = jax.tree.map(lambda g: g * (norm_scale / total), grads)  # global norm = norm_scale
    clipped, _ = clip_by_global_norm_torch(1.0).update(grads, optax.EmptyState())
    coef = min(1.0 / (norm_scale + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_
    for key in grads:
        np.testing.assert_allclose(np.asarray(clipped[key]), np.asarray(grads[key]) * coef, rtol=1e-15)
    if norm_scale > 1.0:  # optax's own formula differs by 1e-6/norm relative
        optax_clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
        assert not np.allclose(np.asarray(optax_clipped["a"]), np.asarray(clipped["a"]), rtol=1e-9, atol=0)


def test_bad_arguments(rng):
    lstm, variables, x, y = _setup(rng)
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_tbptt_step(lstm, "adam")
    with pytest.raises(TypeError, match="jax_impl LSTM, GRU, RNN or ConvLSTM"):
        make_tbptt_step(jax_impl.LSTMCell(H), optax.sgd(0.1), remat=True)
    with pytest.raises(TypeError, match="jax_impl LSTM, GRU, RNN or ConvLSTM"):
        remat_apply(jax_impl.LSTMCell(H), variables, x)
    with pytest.raises(ValueError, match="carry h has shape"):
        remat_apply(lstm, variables, x, lstm.initialize_carry((B + 1,)))
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_global_norm_torch(0.0)
