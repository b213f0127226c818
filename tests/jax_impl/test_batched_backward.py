"""The batched backward pass (``scan._scan_parts``'s custom VJP) against JAX's own autodiff.

Every gradient — parameters, input, initial carry — of the default modules equals the one of
the same module with ``backward="autodiff"`` to float64 rounding, over the options that
change the backward loop: packed lengths (a 0 and a full row), resets, the reverse direction,
projection, no bias, two layers with dropout, a cotangent on the final carry, ConvLSTM with an
even dilated kernel. Forward values are the same ops (equal to rounding: XLA may fuse the
two programs differently). A
deliberately wrong backward (the reset rule dropped) is caught, so the comparison can fail.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import LSTM, ConvLSTM, scan

from jax_test_helpers import init_variables

RTOL_F64 = 1e-12


def _loss(module, x, carry, lengths, reset, masks):
    """A loss that weighs every output and both parts of the final carry differently."""

    def loss(variables, x, carry):
        y, (h, c) = module.apply(variables, x, carry, seq_lengths=lengths, reset=reset,
                                 deterministic=masks is None, dropout_masks=masks)
        weights = jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape)
        return jnp.sum(y * weights) + jnp.sum(h ** 2) - 0.5 * jnp.sum(c)

    return loss


def _grads(module, variables, x, carry, lengths=None, reset=None, masks=None):
    loss = _loss(module, x, carry, lengths, reset, masks)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(variables, x, carry)


def _case(module, x_shape, rng, *, lengths=False, reset=False, dropout_masks=False):
    x = jnp.asarray(rng.normal(size=x_shape))
    batch, steps = x_shape[:2]
    variables = init_variables(module, x, rng=rng, dtype=jnp.float64)
    batch_shape = (batch,) + x_shape[2:-1]  # (B,) or (B, H, W)
    carry = tuple(jnp.asarray(rng.normal(size=s)) for s in module.carry_shapes(batch_shape))
    options = {}
    if lengths:
        options["lengths"] = jnp.asarray(np.r_[steps, 0, rng.integers(1, steps, batch - 2)])
    if reset:
        options["reset"] = jnp.asarray(rng.random((batch, steps)) < 0.25)
    if dropout_masks:
        y_shape = jax.eval_shape(lambda: module.apply(variables, x))[0].shape
        options["masks"] = [jnp.asarray(rng.random(y_shape) < 0.7)
                            for _ in range(module.num_layers - 1)]
    return variables, x, carry, options


def _assert_same_gradients(batched, autodiff, rtol=RTOL_F64):
    (value_b, grads_b), (value_a, grads_a) = batched, autodiff
    np.testing.assert_allclose(value_b, value_a, rtol=1e-14)  # the same forward ops
    paths_a = jax.tree_util.tree_leaves_with_path(grads_a)
    for (path, b), (_, a) in zip(jax.tree_util.tree_leaves_with_path(grads_b), paths_a):
        scale = max(float(jnp.max(jnp.abs(a))), 1.0)
        err = float(jnp.max(jnp.abs(b - a))) / scale
        assert err <= rtol, f"{jax.tree_util.keystr(path)}: {err:.2e} relative"


LSTM_CASES = {
    "plain": (dict(), dict()),
    "lengths+reset": (dict(), dict(lengths=True, reset=True)),
    "bidirectional+lengths+reset": (dict(bidirectional=True), dict(lengths=True, reset=True)),
    "proj+bidirectional+lengths": (dict(proj_size=3, bidirectional=True), dict(lengths=True)),
    "no bias": (dict(use_bias=False), dict(reset=True)),
    "2 layers+dropout+proj": (dict(num_layers=2, dropout=0.4, proj_size=2),
                              dict(dropout_masks=True, lengths=True)),
    "unroll 3": (dict(unroll=3), dict(lengths=True)),
}


@pytest.mark.parametrize("name", list(LSTM_CASES))
def test_lstm_gradients_equal_autodiff(name, x64):
    module_options, case_options = LSTM_CASES[name]
    rng = np.random.default_rng(sorted(LSTM_CASES).index(name))
    module = LSTM(hidden_size=5, **module_options)
    variables, x, carry, options = _case(module, (4, 7, 3), rng, **case_options)
    autodiff = dataclasses.replace(module, backward="autodiff")
    _assert_same_gradients(
        _grads(module, variables, x, carry, **options),
        _grads(autodiff, variables, x, carry, **options),
    )


@pytest.mark.parametrize("reverse_options", [dict(), dict(lengths=True, reset=True)])
def test_convlstm_gradients_equal_autodiff(reverse_options, x64):
    rng = np.random.default_rng(7)
    module = ConvLSTM(hidden_channels=3, kernel_size=(2, 3), dilation=(1, 2), num_layers=2)
    variables, x, carry, options = _case(module, (3, 4, 5, 6, 2), rng, **reverse_options)
    autodiff = dataclasses.replace(module, backward="autodiff")
    _assert_same_gradients(
        _grads(module, variables, x, carry, **options),
        _grads(autodiff, variables, x, carry, **options),
    )


def test_a_wrong_backward_is_caught(x64, monkeypatch):
    """Drop the reset rule from the batched backward: the comparison must fail."""
    rng = np.random.default_rng(3)
    module = LSTM(hidden_size=5)
    variables, x, carry, options = _case(module, (4, 7, 3), rng, reset=True)
    autodiff = _grads(dataclasses.replace(module, backward="autodiff"),
                      variables, x, carry, **options)
    original = scan._scan_parts_bwd

    def without_reset(cell, reverse, unroll, saved, cotangents):
        weights, xs, valid, _, residuals = saved
        return original(cell, reverse, unroll, (weights, xs, valid, None, residuals), cotangents)

    monkeypatch.setattr(scan._scan_parts, "bwd", without_reset)
    wrong = _grads(module, variables, x, carry, **options)
    with pytest.raises(AssertionError, match="relative"):
        _assert_same_gradients(wrong, autodiff)


def test_forward_mode_needs_the_autodiff_path():
    """``jax.jvp`` through a module: refused by the custom VJP, fine with it switched off."""
    rng = np.random.default_rng(4)
    module = LSTM(hidden_size=3)
    x = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    variables = init_variables(module, x, rng=rng)

    def output(module):
        return lambda x: module.apply(variables, x)[0]

    _, tangent = jax.jvp(output(dataclasses.replace(module, backward="autodiff")),
                         (x,), (jnp.ones_like(x),))
    assert tangent.shape == x.shape[:2] + (3,) and bool(jnp.all(jnp.isfinite(tangent)))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(output(module), (x,), (jnp.ones_like(x),))


@pytest.mark.parametrize(
    "kernel_size, dilation, channels, features, batch",
    [
        ((3, 3), (1, 1), 3, 64, 5),  # few input channels: the col2im input gradient
        ((3, 3), (1, 1), 16, 8, 5),  # many: the flipped-kernel convolution
        ((2, 4), (2, 1), 2, 40, 3),  # even kernels, dilated, asymmetric 'same' padding
        ((2, 3), (1, 2), 6, 4, 7),
    ],
)
def test_conv_gradients_equal_xla(kernel_size, dilation, channels, features, batch, x64,
                                  monkeypatch):
    """The ConvLSTM convolution's own VJP (conv._conv_same) against XLA's, float64, with the
    im2col chunk budget set so small that the kernel gradient runs in several chunks."""
    from jax_impl import conv

    monkeypatch.setattr(conv, "_IM2COL_CHUNK_BYTES", 1)  # one image per chunk
    rng = np.random.default_rng(sum(kernel_size) + channels)
    x = jnp.asarray(rng.normal(size=(batch, 6, 7, channels)))
    kernel = jnp.asarray(rng.normal(size=kernel_size + (channels, features)))
    g = jnp.asarray(rng.normal(size=(batch, 6, 7, features)))
    padding = tuple(conv.same_padding(kernel_size, dilation))

    def ours(x, kernel):
        return conv._conv_same(x, kernel, dilation, padding, None)

    def xla(x, kernel):
        return conv._lax_conv(x, kernel, dilation, padding, None)

    ours_out, ours_vjp = jax.vjp(ours, x, kernel)
    xla_out, xla_vjp = jax.vjp(xla, x, kernel)
    np.testing.assert_array_equal(ours_out, xla_out)
    for mine, reference in zip(ours_vjp(g), xla_vjp(g)):
        np.testing.assert_allclose(mine, reference, rtol=1e-12, atol=1e-12)
