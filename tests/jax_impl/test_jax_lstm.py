"""``jax_impl.LSTM`` as a whole: torch.nn.LSTM's semantics.

* against the step-by-step numpy float64 reference (1e-12): 1-3 layers, bidirectional,
  proj_size, no bias, time_major, a given initial carry; unbatched ``(T, F)`` input;
* an unbatched call equals a batch of one; ``carry=None`` equals zeros;
* a bidirectional layer equals a forward run plus a run on the time-reversed input;
* ``initialize_carry`` shapes and zeros (``LSTM`` and ``ConvLSTM``);
* inter-layer dropout: ignored when deterministic, only between layers, reproducible per key,
  ``dropout_masks`` injection equals scaling the layer output by ``mask / (1 - p)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import LSTM, ConvLSTM

from jax_np_reference import layer_params, np_lstm_cell, np_stack
from jax_test_helpers import init_variables, japply

F64_ATOL = 1e-12
F32_ATOL = 1e-6

REFERENCE_CASES = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=3, proj_size=3, time_major=True),
    dict(num_layers=2, bidirectional=True, proj_size=2, use_bias=False, time_major=True),
]


def _case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _carry(rng, module, batch_shape, dtype=np.float64):
    h_shape, c_shape = module.carry_shapes(batch_shape)
    return rng.normal(size=h_shape).astype(dtype), rng.normal(size=c_shape).astype(dtype)


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=[_case_id(c) for c in REFERENCE_CASES])
def test_lstm_matches_numpy_reference_float64(x64, rng, case):
    batch, steps, features, hidden = 3, 5, 4, 6
    module = LSTM(hidden_size=hidden, param_dtype=jnp.float64, **case)
    time_major = case.get("time_major", False)
    x_tm = rng.normal(size=(steps, batch, features))  # reference layout
    x = x_tm if time_major else np.swapaxes(x_tm, 0, 1)
    variables = init_variables(module, x, rng=rng)
    h0, c0 = _carry(rng, module, (batch,))

    y, (h_n, c_n) = japply(module)(variables, x, (h0, c0))

    layers = layer_params(variables["params"], module.num_layers, module.bidirectional)
    ref_y, ref_h, ref_c = np_stack(np_lstm_cell, layers, x_tm, h0, c0)
    if not time_major:
        ref_y = np.swapaxes(ref_y, 0, 1)
    assert y.dtype == jnp.float64
    assert y.shape == ref_y.shape == x.shape[:2] + (module.num_directions * module.output_size,)
    assert h_n.shape == h0.shape and c_n.shape == c0.shape
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(np.asarray(h_n), ref_h, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(np.asarray(c_n), ref_c, rtol=0, atol=F64_ATOL)


def test_unbatched_lstm_matches_numpy_reference_and_a_batch_of_one_float64(x64, rng):
    """``(T, F)`` is unbatched whatever time_major says; carry ``(L*D, H_out)``."""
    steps, features, hidden = 4, 3, 5
    module = LSTM(
        hidden_size=hidden, num_layers=2, bidirectional=True, proj_size=2, time_major=True,
        param_dtype=jnp.float64,
    )
    x = rng.normal(size=(steps, features))
    variables = init_variables(module, x, rng=rng)
    h0, c0 = _carry(rng, module, ())

    y, (h_n, c_n) = japply(module)(variables, x, (h0, c0))
    y_1, (h_1, c_1) = japply(module)(variables, x[:, None], (h0[:, None], c0[:, None]))

    layers = layer_params(variables["params"], 2, True)
    ref_y, ref_h, ref_c = np_stack(np_lstm_cell, layers, x[:, None], h0[:, None], c0[:, None])
    assert y.shape == (steps, 4) and h_n.shape == (4, 2) and c_n.shape == (4, 5)
    np.testing.assert_allclose(y, ref_y[:, 0], rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(h_n, ref_h[:, 0], rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(c_n, ref_c[:, 0], rtol=0, atol=F64_ATOL)
    # the same call as a batch of one (time-major (T, 1, F))
    np.testing.assert_allclose(y, y_1[:, 0], rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(h_n, h_1[:, 0], rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(c_n, c_1[:, 0], rtol=0, atol=F64_ATOL)


@pytest.mark.parametrize("proj_size", [0, 3], ids=["no-proj", "proj"])
def test_bidirectional_equals_forward_plus_reversed_input_run(rng, proj_size):
    batch, steps, features, hidden = 2, 7, 3, 5
    bi = LSTM(hidden_size=hidden, bidirectional=True, proj_size=proj_size)
    uni = LSTM(hidden_size=hidden, proj_size=proj_size)
    x = rng.normal(size=(batch, steps, features)).astype(np.float32)
    variables = init_variables(bi, x, rng=rng)
    h0, c0 = _carry(rng, bi, (batch,), np.float32)

    y, (h_n, c_n) = japply(bi)(variables, x, (h0, c0))

    params = variables["params"]
    y_f, (h_f, c_f) = japply(uni)({"params": {"layer_0": params["layer_0"]}}, x, (h0[:1], c0[:1]))
    y_r, (h_r, c_r) = japply(uni)(
        {"params": {"layer_0": params["layer_0_reverse"]}}, x[:, ::-1], (h0[1:], c0[1:])
    )
    h_out = proj_size or hidden
    assert y.shape == (batch, steps, 2 * h_out)
    np.testing.assert_allclose(y[..., :h_out], y_f, rtol=0, atol=F32_ATOL)  # forward first
    np.testing.assert_allclose(y[..., h_out:], y_r[:, ::-1], rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_n, np.concatenate([h_f, h_r]), rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_n, np.concatenate([c_f, c_r]), rtol=0, atol=F32_ATOL)


# ------------------------------------------------------------------------ initialize_carry

CARRY_CASES = [
    (dict(hidden_size=5), (3,), (1, 3, 5), (1, 3, 5)),
    (dict(hidden_size=5, num_layers=3), (2,), (3, 2, 5), (3, 2, 5)),
    (dict(hidden_size=5, num_layers=2, bidirectional=True, proj_size=2), (4,), (4, 4, 2),
     (4, 4, 5)),
    (dict(hidden_size=5, num_layers=2, bidirectional=True), (), (4, 5), (4, 5)),
]


@pytest.mark.parametrize("kwargs,batch_shape,h_shape,c_shape", CARRY_CASES)
def test_lstm_initialize_carry_shapes_and_zeros(kwargs, batch_shape, h_shape, c_shape):
    h, c = LSTM(**kwargs).initialize_carry(batch_shape)
    assert h.shape == h_shape and c.shape == c_shape
    assert h.dtype == c.dtype == jnp.float32
    assert not np.any(np.asarray(h)) and not np.any(np.asarray(c))


def test_lstm_initialize_carry_dtype_follows_param_dtype_or_argument():
    h, c = LSTM(hidden_size=3, param_dtype=jnp.bfloat16).initialize_carry((2,))
    assert h.dtype == c.dtype == jnp.bfloat16
    h, c = LSTM(hidden_size=3).initialize_carry((2,), jnp.bfloat16)
    assert h.dtype == c.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "num_layers,batch_shape", [(1, (2, 6, 7)), (3, (2, 6, 7)), (2, (6, 7))],
    ids=["1-layer", "3-layers", "unbatched"],
)
def test_convlstm_initialize_carry_shapes_and_zeros(num_layers, batch_shape):
    h, c = ConvLSTM(hidden_channels=4, kernel_size=3, num_layers=num_layers).initialize_carry(
        batch_shape
    )
    assert h.shape == c.shape == (num_layers,) + batch_shape + (4,)
    assert not np.any(np.asarray(h)) and not np.any(np.asarray(c))


# ---------------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_setup():
    rng = np.random.default_rng(1234)
    module = LSTM(hidden_size=4, num_layers=2, dropout=0.5)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    variables = init_variables(module, x, rng=rng)
    return module, variables, x


def test_carry_none_equals_an_explicit_zero_carry(dropout_setup):
    module, variables, x = dropout_setup
    y0, (h0, c0) = japply(module)(variables, x)
    y1, (h1, c1) = japply(module)(variables, x, module.initialize_carry((2,)))
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(h0, h1)
    np.testing.assert_array_equal(c0, c1)


def test_deterministic_true_ignores_dropout_even_with_a_dropout_rng(dropout_setup):
    module, variables, x = dropout_setup
    y_ref, (h_ref, _) = japply(module)(variables, x)
    y, (h, _) = japply(module)(
        variables, x, deterministic=True, rngs={"dropout": jax.random.key(0)}
    )
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)


def test_dropout_applies_between_layers_and_is_reproducible_per_key(dropout_setup):
    module, variables, x = dropout_setup
    y_det, (h_det, c_det) = japply(module)(variables, x)
    apply = japply(module)
    y1, (h1, c1) = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    y1b, _ = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    y2, _ = apply(variables, x, deterministic=False, rngs={"dropout": jax.random.key(1)})

    assert not np.allclose(y1, y_det), "dropout between 2 layers changed nothing"
    # layer 0 runs before any dropout: its final state is untouched; layer 1's is not
    np.testing.assert_array_equal(h1[0], h_det[0])
    np.testing.assert_array_equal(c1[0], c_det[0])
    assert not np.allclose(h1[1], h_det[1])
    np.testing.assert_array_equal(y1, y1b)
    assert not np.allclose(y1, y2)


def test_dropout_never_changes_a_single_layer_lstm(rng):
    module = LSTM(hidden_size=4, num_layers=1, dropout=0.5)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    variables = init_variables(module, x, rng=rng)
    y_det, (h_det, c_det) = japply(module)(variables, x)
    y, (h, c) = japply(module)(
        variables, x, deterministic=False, rngs={"dropout": jax.random.key(0)}
    )
    np.testing.assert_array_equal(y, y_det)
    np.testing.assert_array_equal(h, h_det)
    np.testing.assert_array_equal(c, c_det)


@pytest.mark.parametrize(
    "mask_kind,time_major", [("ones", False), ("random", True)],
    ids=["all-ones-batch-first", "random-time-major"],
)
def test_dropout_masks_equal_scaling_the_first_layer_output(rng, mask_kind, time_major):
    """2-layer bidirectional LSTM == layer 0, times ``mask / (1 - p)``, into layer 1."""
    p = 0.25
    batch, steps, features, hidden = 2, 5, 3, 4
    two = LSTM(
        hidden_size=hidden, num_layers=2, bidirectional=True, dropout=p, time_major=time_major
    )
    one = LSTM(hidden_size=hidden, bidirectional=True, time_major=time_major)
    x = rng.normal(size=(batch, steps, features)).astype(np.float32)
    if time_major:
        x = np.swapaxes(x, 0, 1)
    variables = init_variables(two, x, rng=rng)
    mask_shape = x.shape[:2] + (2 * hidden,)
    if mask_kind == "ones":
        mask = np.ones(mask_shape, np.float32)
    else:
        mask = (rng.uniform(size=mask_shape) > p).astype(np.float32)
        assert 0 < mask.sum() < mask.size

    y, (h_n, c_n) = japply(two)(variables, x, deterministic=False, dropout_masks=[mask])

    params = variables["params"]
    first = {"params": {"layer_0": params["layer_0"], "layer_0_reverse": params["layer_0_reverse"]}}
    second = {
        "params": {"layer_0": params["layer_1"], "layer_0_reverse": params["layer_1_reverse"]}
    }
    y0, (h0, c0) = japply(one)(first, x)
    y_ref, (h1, c1) = japply(one)(second, y0 * (mask / np.float32(1.0 - p)))
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_n, np.concatenate([h0, h1]), rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_n, np.concatenate([c0, c1]), rtol=0, atol=F32_ATOL)
    if mask_kind == "ones":  # and it is not the unscaled deterministic path
        y_det, _ = japply(two)(variables, x)
        assert not np.allclose(y, y_det)


def test_dropout_mask_of_wrong_shape_is_a_value_error(dropout_setup):
    module, variables, x = dropout_setup  # layer output (2, 6, 4)
    with pytest.raises(ValueError, match=r"dropout_masks\[0\] has shape \(2, 5, 4\).*\(2, 6, 4\)"):
        module.apply(
            variables, x, deterministic=False, dropout_masks=[np.ones((2, 5, 4), np.float32)]
        )


def test_too_few_dropout_masks_is_a_value_error(rng):
    module = LSTM(hidden_size=4, num_layers=3, dropout=0.5)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    variables = init_variables(module, x, rng=rng)
    with pytest.raises(ValueError, match=r"dropout_masks has 1 masks, expected 2"):
        module.apply(
            variables, x, deterministic=False, dropout_masks=[np.ones((2, 6, 4), np.float32)]
        )
