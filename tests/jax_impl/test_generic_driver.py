"""A new cell type is its update function and its parameter table, nothing in the driver.

The toy cell below exists only here: a leaky tanh RNN whose update reads the previous h (so the
batched backward's direct path through the update is exercised, which the LSTM's is not). It
runs through the same drivers as the LSTM and GRU — layers, both directions, packed lengths,
resets, dropout keep masks — and its batched backward pass equals JAX's own autodiff in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.functional import (
    CellKind,
    DenseWeights,
    RunOptions,
    SequenceMasks,
    dense_param_shapes,
    dense_parts,
    run_stack,
)


def leaky_update(gates, h, rest=()):
    """The toy cell: h' = (tanh(W_i x + b_i + W_h h + b_h) + h) / 2."""
    return 0.5 * (jnp.tanh(gates) + h), rest


TOY = CellKind("leaky", 1, leaky_update)
LAYERS, DIRECTIONS, B, T, F, H = 2, 2, 3, 7, 4, 5


def _weights(rng):
    layers = []
    for layer in range(LAYERS):
        in_features = F if layer == 0 else DIRECTIONS * H
        shapes = dense_param_shapes(TOY, in_features, H)  # the kind's parameter table
        layers.append([DenseWeights(**{k: jnp.asarray(rng.normal(size=s) * 0.5)
                                       for k, s in shapes.items()})
                       for _ in range(DIRECTIONS)])
    return layers


def _reference(layers, xs, h0, lengths, reset):
    """A plain Python loop over steps: torch's packed semantics, resets, both directions."""
    xs, h0 = np.asarray(xs), np.asarray(h0)
    finals = []
    for layer, directions in enumerate(layers):
        outputs = []
        for d, w in enumerate(directions):
            w = {k: np.asarray(v) for k, v in w._asdict().items() if v is not None}
            h = h0[layer * DIRECTIONS + d].copy()
            ys = np.zeros(xs.shape[:2] + (H,))
            for b in range(B):
                n = lengths[b]
                steps = range(n) if d == 0 else range(n - 1, -1, -1)
                hb = h[b]
                for t in steps:
                    # forward: zero before a marked step; reverse: before the step before it
                    if (d == 0 and reset[t, b]) or (d == 1 and t + 1 < n and reset[t + 1, b]):
                        hb = np.zeros_like(hb)
                    gates = xs[t, b] @ w["ih_kernel"] + w["ih_bias"] + hb @ w["hh_kernel"] + w["hh_bias"]
                    hb = 0.5 * (np.tanh(gates) + hb)
                    ys[t, b] = hb
                h[b] = hb
            finals.append(h)
            outputs.append(ys)
        xs = np.concatenate(outputs, axis=-1)
    return xs, np.stack(finals)


@pytest.fixture
def toy_inputs(x64):
    rng = np.random.default_rng(0)
    layers = _weights(rng)
    xs = jnp.asarray(rng.normal(size=(T, B, F)))
    h0 = jnp.asarray(rng.normal(size=(LAYERS * DIRECTIONS, B, H)))
    lengths = np.array([7, 4, 1])
    reset = np.zeros((T, B), bool)
    reset[3, 0] = reset[2, 1] = True
    return layers, xs, h0, lengths, reset


def test_toy_cell_runs_through_the_driver_like_a_reference_loop(toy_inputs):
    layers, xs, h0, lengths, reset = toy_inputs
    masks = SequenceMasks(jnp.asarray(lengths), jnp.asarray(reset))
    ys, h = jax.jit(run_stack, static_argnums=(0, 5))(dense_parts(TOY), layers, h0, xs, masks,
                                                      RunOptions())
    ref_ys, ref_h = _reference(layers, xs, h0, lengths, reset)
    np.testing.assert_allclose(ys, ref_ys, rtol=0, atol=1e-13)
    np.testing.assert_allclose(h, ref_h, rtol=0, atol=1e-13)


@pytest.mark.parametrize("with_dropout", [False, True])
def test_toy_cell_batched_backward_equals_jax_autodiff(toy_inputs, with_dropout):
    layers, xs, h0, lengths, reset = toy_inputs
    keep = None
    if with_dropout:
        keep = [jax.random.bernoulli(jax.random.key(1), 0.7, (T, B, DIRECTIONS * H))]
    masks = SequenceMasks(jnp.asarray(lengths), jnp.asarray(reset), keep)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(T, B, DIRECTIONS * H)))

    def loss(backward):
        options = RunOptions(backward, dropout=0.3 if with_dropout else 0.0)

        def f(layers, h0, xs):
            ys, h = run_stack(dense_parts(TOY), layers, h0, xs, masks, options)
            return jnp.sum(ys * weights) + jnp.sum(h ** 2)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(layers, h0, xs)

    batched, autodiff = loss("batched"), loss("autodiff")
    for got, ref in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(autodiff)):
        scale = float(np.max(np.abs(ref))) or 1.0
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * scale)


def test_a_toy_backward_that_ignores_the_direct_path_is_caught(toy_inputs):
    """If the driver dropped the update's own dependence on h (as an LSTM-only driver could),
    the batched gradients would differ from autodiff: the test above can fail."""
    layers, xs, h0, lengths, reset = toy_inputs
    wrong = CellKind("leaky_wrong_vjp", 1, jax.custom_vjp(leaky_update))
    wrong.update.defvjp(
        lambda g, h, r: (leaky_update(g, h, r), (g, h)),
        lambda saved, ct: (ct[0] * 0.5 * (1 - jnp.tanh(saved[0]) ** 2), jnp.zeros_like(saved[1]), ()),
    )

    def grads(kind, backward):
        f = lambda h0: jnp.sum(run_stack(dense_parts(kind), layers, h0, xs,
                                         options=RunOptions(backward))[0])
        return jax.grad(f)(h0)

    assert not np.allclose(grads(wrong, "batched"), grads(TOY, "autodiff"), atol=1e-6)
