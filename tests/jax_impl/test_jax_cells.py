"""The cell math and the Flax cells.

* ``lstm_step`` / ``convlstm_step`` against the independent numpy float64 reference in
  ``jax_np_reference`` (gate order i, f, g, o; torch's two biases; projection; torch's 'same'
  padding for odd and even kernels, non-square kernels and dilation) to 1e-12;
* the numpy reference's own padding rule, pinned by a hand-computed case;
* ``LSTMCell`` / ``ConvLSTMCell`` driven by ``flax.linen.RNN`` and by ``jax.lax.scan`` give the
  full modules' results with the same parameters; ``initialize_carry`` shapes; their
  parameter trees are interchangeable with one layer of the module.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import LSTM, ConvLSTM, ConvLSTMCell, LSTMCell
from jax_impl.functional import ConvWeights, DenseWeights, convlstm_step, lstm_step

from jax_np_reference import np_conv_same, np_convlstm_cell, np_lstm_cell, torch_same_pads
from jax_test_helpers import init_variables, japply, shapes_of

F64_ATOL = 1e-12
F32_ATOL = 1e-6


# ------------------------------------------------------------------------- pure cell math


@pytest.mark.parametrize(
    "use_bias,proj_size,batch_shape",
    [(True, 0, (3,)), (False, 0, (3,)), (True, 3, (2, 3)), (False, 3, (3,))],
    ids=["bias", "no-bias", "bias-proj-two-batch-axes", "no-bias-proj"],
)
def test_lstm_step_matches_numpy_float64(x64, rng, use_bias, proj_size, batch_shape):
    features, hidden = 5, 6
    h_out = proj_size or hidden
    p = {
        "ih_kernel": rng.normal(0, 0.5, (features, 4 * hidden)),
        "hh_kernel": rng.normal(0, 0.5, (h_out, 4 * hidden)),
        "ih_bias": rng.normal(0, 0.5, (4 * hidden,)) if use_bias else None,
        "hh_bias": rng.normal(0, 0.5, (4 * hidden,)) if use_bias else None,
        "proj_kernel": rng.normal(0, 0.5, (hidden, proj_size)) if proj_size else None,
    }
    x = rng.normal(size=batch_shape + (features,))
    h = rng.normal(size=batch_shape + (h_out,))
    c = rng.normal(size=batch_shape + (hidden,))
    weights = DenseWeights(**{k: None if v is None else jnp.asarray(v) for k, v in p.items()})

    (h1, c1), y = jax.jit(lstm_step)(weights, (h, c), x)

    ref_h, ref_c = np_lstm_cell(p, x, h, c)
    assert h1.dtype == c1.dtype == jnp.float64
    assert h1.shape == batch_shape + (h_out,) and c1.shape == batch_shape + (hidden,)
    np.testing.assert_allclose(np.asarray(h1), ref_h, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(np.asarray(c1), ref_c, rtol=0, atol=F64_ATOL)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(h1))


def test_lstm_step_gate_order_is_i_f_g_o(x64):
    """Pin each gate by hand: only one gate's pre-activation is non-zero at a time."""
    hidden = 1
    zeros = np.zeros((1, 4 * hidden))
    c0 = np.array([[2.0]])
    big = 50.0  # σ(big) == 1 in float64 to ~1e-22

    def run(gates):
        weights = DenseWeights(
            ih_kernel=jnp.zeros((1, 4)),
            hh_kernel=jnp.zeros((1, 4)),
            ih_bias=jnp.asarray(gates),
            hh_bias=jnp.zeros((4,)),
        )
        (h, c), _ = lstm_step(weights, (jnp.zeros((1, 1)), jnp.asarray(c0)), jnp.zeros((1, 1)))
        return float(h[0, 0]), float(c[0, 0])

    # all pre-activations 0: c = 0.5*2 + 0.5*tanh(0) = 1
    assert run(zeros[0]) == pytest.approx((0.5 * np.tanh(1.0), 1.0), abs=1e-15)
    # forget gate (2nd) open: c = 1*2 + 0.5*0 = 2
    assert run(np.array([0.0, big, 0.0, 0.0]))[1] == pytest.approx(2.0, abs=1e-12)
    # input (1st) open and candidate (3rd) large: c = 0.5*2 + 1*tanh(big) = 2
    assert run(np.array([big, 0.0, big, 0.0]))[1] == pytest.approx(2.0, abs=1e-12)
    # output (4th) open: h = tanh(c) with c = 1
    assert run(np.array([0.0, 0.0, 0.0, big]))[0] == pytest.approx(np.tanh(1.0), abs=1e-12)


def test_reference_conv_pads_like_torch_same_for_an_even_kernel():
    """Hand case: k=2, d=1 -> pads (0, 1): out[y] = x[y]*K0 + x[y+1]*K1 (1-D along H)."""
    assert torch_same_pads(2, 1) == (0, 1)
    assert torch_same_pads(4, 1) == (1, 2)
    assert torch_same_pads(3, 2) == (2, 2)
    assert torch_same_pads(2, 3) == (1, 2)
    x = np.zeros((1, 4, 1, 1))
    x[0, 2, 0, 0] = 1.0  # a delta at row 2
    kernel = np.array([10.0, 1.0]).reshape(2, 1, 1, 1)
    out = np_conv_same(x, kernel)[0, :, 0, 0]
    np.testing.assert_array_equal(out, [0.0, 1.0, 10.0, 0.0])


CONV_CASES = [
    # (kernel_size, dilation, use_bias)
    ((3, 3), (1, 1), True),
    ((2, 2), (1, 1), True),
    ((4, 3), (1, 2), False),
    ((2, 3), (3, 1), True),
    ((1, 1), (1, 1), True),
    ((5, 2), (2, 2), True),  # dilated extent 9 > height 5: padding larger than the image
]


@pytest.mark.parametrize(
    "kernel_size,dilation,use_bias",
    CONV_CASES,
    ids=[f"k{k[0]}x{k[1]}-d{d[0]}x{d[1]}-{'bias' if b else 'nobias'}" for k, d, b in CONV_CASES],
)
def test_convlstm_step_matches_numpy_float64(x64, rng, kernel_size, dilation, use_bias):
    batch, height, width, cin, hidden = 2, 5, 6, 2, 3
    kh, kw = kernel_size
    p = {
        "ih_kernel": rng.normal(0, 0.3, (kh, kw, cin, 4 * hidden)),
        "hh_kernel": rng.normal(0, 0.3, (kh, kw, hidden, 4 * hidden)),
        "ih_bias": rng.normal(0, 0.3, (4 * hidden,)) if use_bias else None,
        "hh_bias": rng.normal(0, 0.3, (4 * hidden,)) if use_bias else None,
    }
    x = rng.normal(size=(batch, height, width, cin))
    h = rng.normal(size=(batch, height, width, hidden))
    c = rng.normal(size=(batch, height, width, hidden))
    weights = ConvWeights(**{k: None if v is None else jnp.asarray(v) for k, v in p.items()})

    step = jax.jit(convlstm_step, static_argnames="dilation")
    (h1, c1), y = step(weights, (h, c), x, dilation=dilation)

    ref_h, ref_c = np_convlstm_cell(p, x, h, c, dilation)
    assert h1.dtype == jnp.float64 and h1.shape == (batch, height, width, hidden)
    np.testing.assert_allclose(np.asarray(h1), ref_h, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(np.asarray(c1), ref_c, rtol=0, atol=F64_ATOL)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(h1))


# ------------------------------------------------------------------------------ Flax cells


def test_lstm_cell_initialize_carry_shapes_and_zeros():
    cell = LSTMCell(hidden_size=5, proj_size=3)
    h, c = cell.initialize_carry(jax.random.key(0), (4, 7))
    assert h.shape == (4, 3) and c.shape == (4, 5)
    assert not np.any(np.asarray(h)) and not np.any(np.asarray(c))
    h, c = cell.initialize_carry(jax.random.key(0), (7,))
    assert h.shape == (3,) and c.shape == (5,)
    h, c = LSTMCell(hidden_size=5).initialize_carry(jax.random.key(0), (2, 6, 7))
    assert h.shape == c.shape == (2, 6, 5)
    assert cell.num_feature_axes == 1


def test_convlstm_cell_initialize_carry_shapes_and_zeros():
    cell = ConvLSTMCell(hidden_channels=6, kernel_size=3)
    h, c = cell.initialize_carry(jax.random.key(0), (2, 8, 9, 3))
    assert h.shape == c.shape == (2, 8, 9, 6)
    assert not np.any(np.asarray(h)) and not np.any(np.asarray(c))
    h, c = cell.initialize_carry(jax.random.key(0), (8, 9, 3))
    assert h.shape == c.shape == (8, 9, 6)
    assert cell.num_feature_axes == 3


@pytest.mark.parametrize("proj_size", [0, 2], ids=["no-proj", "proj"])
def test_lstm_cell_under_flax_rnn_and_lax_scan_matches_lstm_module(rng, proj_size):
    batch, steps, features, hidden = 3, 5, 4, 6
    h_out = proj_size or hidden
    x = rng.normal(size=(batch, steps, features)).astype(np.float32)
    h0 = rng.normal(size=(batch, h_out)).astype(np.float32)
    c0 = rng.normal(size=(batch, hidden)).astype(np.float32)

    module = LSTM(hidden_size=hidden, proj_size=proj_size)
    variables = init_variables(module, x, rng=rng)
    y_ref, (h_ref, c_ref) = japply(module)(variables, x, (h0[None], c0[None]))

    cell = LSTMCell(hidden_size=hidden, proj_size=proj_size)
    layer = variables["params"]["layer_0"]
    rnn = nn.RNN(cell, return_carry=True)
    # the RNN-created parameter tree has the module layer's names and shapes
    rnn_params = jax.eval_shape(rnn.init, jax.random.key(2), x)["params"]["cell"]
    assert shapes_of(rnn_params) == shapes_of(layer)

    rnn_apply = jax.jit(rnn.apply)
    (h_rnn, c_rnn), y_rnn = rnn_apply({"params": {"cell": layer}}, x, initial_carry=(h0, c0))
    np.testing.assert_allclose(y_rnn, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_rnn, h_ref[0], rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_rnn, c_ref[0], rtol=0, atol=F32_ATOL)

    def body(carry, x_t):
        return cell.apply({"params": layer}, carry, x_t)

    scan = jax.jit(lambda carry, xs: jax.lax.scan(body, carry, xs))
    (h_scan, c_scan), y_scan = scan((h0, c0), np.swapaxes(x, 0, 1))
    np.testing.assert_allclose(np.swapaxes(y_scan, 0, 1), y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_scan, h_ref[0], rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_scan, c_ref[0], rtol=0, atol=F32_ATOL)

    # from initialize_carry (zeros) as well
    carry0 = cell.initialize_carry(jax.random.key(3), x[:, 0].shape)
    (h_z, _), y_z = scan(carry0, np.swapaxes(x, 0, 1))
    y_mod, (h_mod, _) = japply(module)(variables, x, module.initialize_carry((batch,)))
    np.testing.assert_allclose(np.swapaxes(y_z, 0, 1), y_mod, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_z, h_mod[0], rtol=0, atol=F32_ATOL)


def test_convlstm_cell_under_flax_rnn_and_lax_scan_matches_convlstm_module(rng):
    batch, steps, height, width, cin, hidden = 2, 4, 5, 4, 2, 3
    x = rng.normal(size=(batch, steps, height, width, cin)).astype(np.float32)
    h0 = rng.normal(size=(batch, height, width, hidden)).astype(np.float32)
    c0 = rng.normal(size=(batch, height, width, hidden)).astype(np.float32)

    module = ConvLSTM(hidden_channels=hidden, kernel_size=(2, 3), dilation=(1, 2))
    variables = init_variables(module, x, rng=rng)
    y_ref, (h_ref, c_ref) = japply(module)(variables, x, (h0[None], c0[None]))

    cell = ConvLSTMCell(hidden_channels=hidden, kernel_size=(2, 3), dilation=(1, 2))
    layer = variables["params"]["layer_0"]
    rnn = nn.RNN(cell, return_carry=True)
    rnn_params = jax.eval_shape(rnn.init, jax.random.key(2), x)["params"]["cell"]
    assert shapes_of(rnn_params) == shapes_of(layer)

    rnn_apply = jax.jit(rnn.apply)
    (h_rnn, c_rnn), y_rnn = rnn_apply({"params": {"cell": layer}}, x, initial_carry=(h0, c0))
    np.testing.assert_allclose(y_rnn, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_rnn, h_ref[0], rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_rnn, c_ref[0], rtol=0, atol=F32_ATOL)

    def body(carry, x_t):
        return cell.apply({"params": layer}, carry, x_t)

    scan = jax.jit(lambda carry, xs: jax.lax.scan(body, carry, xs))
    (h_scan, c_scan), y_scan = scan((h0, c0), np.swapaxes(x, 0, 1))
    np.testing.assert_allclose(np.swapaxes(y_scan, 0, 1), y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_scan, h_ref[0], rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_scan, c_ref[0], rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize(
    "make",
    [
        lambda: LSTMCell(hidden_size=0),
        lambda: LSTMCell(hidden_size=4, proj_size=4),
        lambda: ConvLSTMCell(hidden_channels=4, kernel_size=0),
        lambda: ConvLSTMCell(hidden_channels=4, kernel_size=3, dilation=0),
    ],
    ids=["lstmcell-hidden0", "lstmcell-proj-eq-hidden", "convcell-kernel0", "convcell-dilation0"],
)
def test_cell_constructors_validate_their_arguments(make):
    with pytest.raises(ValueError, match=r"must be|smaller"):
        make()
