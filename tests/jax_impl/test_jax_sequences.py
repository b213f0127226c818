"""Sequences over time: chunking with the carry, packed ``seq_lengths`` and ``reset`` masks.

* chunked == full, bit for bit, under random partitions (chunk length 1 included) with the
  same jitted function for every chunk (``LSTM`` with 2 layers and a projection, ``ConvLSTM``);
* ``seq_lengths`` == each row run alone on its valid prefix (forward and reverse directions,
  final carry at the last valid step / at step 0, zeros past the length, length 0 keeps the
  initial carry), batch-first and time-major, ``LSTM`` and ``ConvLSTM``; clipped under ``jit``;
* ``reset`` == the sequence split at the resets, each later segment from zeros (uni- and
  bidirectional, ``(B, T)`` and ``(T, B)`` masks, ``ConvLSTM``); a reset at step 0 ignores a
  given carry; resets combined with lengths against the numpy float64 reference;
* reset flags in a row's padding (past its length) must not matter.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jax_impl import LSTM, ConvLSTM

from jax_np_reference import layer_params, np_lstm_cell, np_stack
from jax_test_helpers import init_variables, japply

F64_ATOL = 1e-12
F32_ATOL = 1e-6


def _f32(a):
    return np.asarray(a, np.float32)


def _random_carry(rng, module, batch_shape):
    h_shape, c_shape = module.carry_shapes(batch_shape)
    return _f32(rng.normal(size=h_shape)), _f32(rng.normal(size=c_shape))


def _segments(reset_row):
    """Start/stop pairs of the segments a (T,) reset row cuts a sequence into."""
    starts = [0] + [t for t in range(1, len(reset_row)) if reset_row[t]]
    return list(zip(starts, starts[1:] + [len(reset_row)]))


# --------------------------------------------------------------------------- chunked == full

CHUNK_STEPS = 6


@functools.cache
def _chunk_setup(kind):
    rng = np.random.default_rng(7)
    if kind == "lstm":
        module = LSTM(hidden_size=5, num_layers=2, proj_size=3)
        x = _f32(rng.normal(size=(2, CHUNK_STEPS, 3)))
        carry = _random_carry(rng, module, (2,))
    else:
        module = ConvLSTM(hidden_channels=3, kernel_size=(2, 3), num_layers=2)
        x = _f32(rng.normal(size=(2, CHUNK_STEPS, 3, 4, 2)))
        carry = _random_carry(rng, module, (2, 3, 4))
    variables = init_variables(module, x, rng=rng)
    full = japply(module)(variables, x, carry)
    return module, variables, x, carry, full


@pytest.mark.parametrize("kind", ["lstm", "convlstm"])
@settings(
    max_examples=6,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@example(cuts=set(range(1, CHUNK_STEPS)))  # every chunk of length 1
@example(cuts=set())  # one chunk
@given(cuts=st.sets(st.integers(1, CHUNK_STEPS - 1)))
def test_chunked_run_with_carry_is_bitwise_equal_to_full_run(kind, cuts):
    module, variables, x, carry, (y_full, (h_full, c_full)) = _chunk_setup(kind)
    bounds = [0, *sorted(cuts), CHUNK_STEPS]
    apply = japply(module)
    ys = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        y, carry = apply(variables, x[:, start:stop], carry)
        ys.append(y)
    # bitwise: chunking changes only the loop length; each step runs the same ops on the same
    # (B, ...) shapes in both runs (the forward pass has no matmul over T*B)
    np.testing.assert_array_equal(np.concatenate(ys, axis=1), y_full)
    np.testing.assert_array_equal(carry[0], h_full)
    np.testing.assert_array_equal(carry[1], c_full)


# ----------------------------------------------------------------------------- seq_lengths

LSTM_STEPS = 6


@pytest.fixture(scope="module")
def bi_lstm():
    """A 2-layer bidirectional LSTM shared by the lengths and reset tests (shared compiles)."""
    rng = np.random.default_rng(11)
    module = LSTM(hidden_size=4, num_layers=2, bidirectional=True)
    x = _f32(rng.normal(size=(4, LSTM_STEPS, 3)))
    variables = init_variables(module, x, rng=rng)
    carry = _random_carry(rng, module, (4,))
    return module, variables, x, carry


@pytest.mark.parametrize("time_major", [False, True], ids=["batch-first", "time-major"])
def test_lstm_seq_lengths_equal_each_row_run_alone_on_its_prefix(bi_lstm, time_major):
    module, variables, x, (h0, c0) = bi_lstm
    lengths = np.array([LSTM_STEPS, 3, 1, 0])
    runner = LSTM(hidden_size=4, num_layers=2, bidirectional=True, time_major=time_major)
    x_in = np.swapaxes(x, 0, 1) if time_major else x

    y, (h_n, c_n) = japply(runner)(variables, x_in, (h0, c0), seq_lengths=np.asarray(lengths))
    if time_major:
        y = np.swapaxes(y, 0, 1)

    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(y[b, n:], 0.0, err_msg=f"row {b}: output past length {n}")
        if n == 0:  # the initial carry comes back untouched
            np.testing.assert_array_equal(h_n[:, b], h0[:, b])
            np.testing.assert_array_equal(c_n[:, b], c0[:, b])
            continue
        y_b, (h_b, c_b) = japply(module)(variables, x[b, :n], (h0[:, b], c0[:, b]))
        # forward half and reverse half of the last layer's output
        np.testing.assert_allclose(y[b, :n, :4], y_b[:, :4], rtol=0, atol=F32_ATOL)
        np.testing.assert_allclose(y[b, :n, 4:], y_b[:, 4:], rtol=0, atol=F32_ATOL)
        # every layer-direction's final state: forward at step n-1, reverse at step 0
        np.testing.assert_allclose(h_n[:, b], h_b, rtol=0, atol=F32_ATOL, err_msg=f"row {b}")
        np.testing.assert_allclose(c_n[:, b], c_b, rtol=0, atol=F32_ATOL, err_msg=f"row {b}")


def test_lstm_unbatched_scalar_seq_length_equals_the_prefix_run(bi_lstm):
    module, variables, x, (h0, c0) = bi_lstm
    y, (h, c) = japply(module)(variables, x[1], (h0[:, 1], c0[:, 1]), seq_lengths=np.asarray(3))
    y_ref, (h_ref, c_ref) = japply(module)(variables, x[1, :3], (h0[:, 1], c0[:, 1]))
    np.testing.assert_allclose(y[:3], y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_array_equal(y[3:], 0.0)
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=F32_ATOL)


def test_seq_lengths_are_clipped_to_0_and_T_under_jit(bi_lstm):
    module, variables, x, carry = bi_lstm
    apply = japply(module)  # traced lengths: not checkable, clipped
    y_out, carry_out = apply(variables, x, carry, seq_lengths=np.array([LSTM_STEPS + 5, -3, 2, 0]))
    y_in, carry_in = apply(variables, x, carry, seq_lengths=np.array([LSTM_STEPS, 0, 2, 0]))
    np.testing.assert_array_equal(y_out, y_in)
    np.testing.assert_array_equal(carry_out[0], carry_in[0])
    np.testing.assert_array_equal(carry_out[1], carry_in[1])


@pytest.fixture(scope="module")
def conv_lstm():
    rng = np.random.default_rng(12)
    module = ConvLSTM(hidden_channels=3, kernel_size=3, num_layers=2)
    x = _f32(rng.normal(size=(3, 5, 4, 4, 2)))
    variables = init_variables(module, x, rng=rng)
    carry = _random_carry(rng, module, (3, 4, 4))
    return module, variables, x, carry


def test_convlstm_seq_lengths_equal_each_row_run_alone_on_its_prefix(conv_lstm):
    module, variables, x, (h0, c0) = conv_lstm
    lengths = np.array([5, 2, 0])
    y, (h_n, c_n) = japply(module)(variables, x, (h0, c0), seq_lengths=np.asarray(lengths))
    for b, n in enumerate(lengths):
        np.testing.assert_array_equal(y[b, n:], 0.0, err_msg=f"row {b}: output past length {n}")
        if n == 0:
            np.testing.assert_array_equal(h_n[:, b], h0[:, b])
            np.testing.assert_array_equal(c_n[:, b], c0[:, b])
            continue
        y_b, (h_b, c_b) = japply(module)(variables, x[b, :n], (h0[:, b], c0[:, b]))
        np.testing.assert_allclose(y[b, :n], y_b, rtol=0, atol=F32_ATOL)
        np.testing.assert_allclose(h_n[:, b], h_b, rtol=0, atol=F32_ATOL)
        np.testing.assert_allclose(c_n[:, b], c_b, rtol=0, atol=F32_ATOL)


# ----------------------------------------------------------------------------------- reset

# (B=4, T=6) resets whose segments have lengths 1, 3 and 6 only (few compilations)
RESET = np.array(
    [
        [0, 0, 0, 1, 0, 0],  # segments 3 + 3
        [0, 0, 0, 1, 1, 1],  # 3 + 1 + 1 + 1
        [0, 0, 0, 0, 0, 0],  # 6, from the given carry
        [1, 0, 0, 0, 0, 0],  # 6, from zeros: a reset at step 0 ignores the given carry
    ],
    bool,
)


def _split_reference(module, variables, x, h0, c0, reset):
    """Per row: run each segment alone (unbatched); the first from the given carry, the
    others from zeros (a segment starting at 0 too). Returns y (B, T, ...), h_n, c_n.

    Bidirectional only from a zero carry: a reverse direction's given carry would enter the
    last segment, not the first."""
    bidirectional = getattr(module, "bidirectional", False)
    assert not bidirectional or not (np.any(h0) or np.any(c0))
    apply = japply(module)
    ys, hs, cs = [], [], []
    for b in range(x.shape[0]):
        pieces, first_h, first_c, last_h, last_c = [], None, None, None, None
        for start, stop in _segments(reset[b]):
            fresh = start > 0 or reset[b, 0]
            carry = (
                (np.zeros_like(h0[:, b]), np.zeros_like(c0[:, b]))
                if fresh
                else (h0[:, b], c0[:, b])
            )
            y, (h, c) = apply(variables, x[b, start:stop], carry)
            pieces.append(y)
            if first_h is None:
                first_h, first_c = h, c
            last_h, last_c = h, c
        ys.append(np.concatenate(pieces, axis=0))
        if bidirectional:
            # forward directions end in the last segment, reverse ones at step 0 (first)
            d = np.arange(h0.shape[0]) % 2 == 1
            hs.append(np.where(d[:, None], first_h, last_h))
            cs.append(np.where(d[:, None], first_c, last_c))
        else:
            hs.append(last_h)
            cs.append(last_c)
    return np.stack(ys), np.stack(hs, axis=1), np.stack(cs, axis=1)


@pytest.fixture(scope="module")
def uni_lstm():
    rng = np.random.default_rng(13)
    module = LSTM(hidden_size=4, num_layers=2, proj_size=2)
    x = _f32(rng.normal(size=(4, LSTM_STEPS, 3)))
    variables = init_variables(module, x, rng=rng)
    carry = _random_carry(rng, module, (4,))
    return module, variables, x, carry


@pytest.mark.parametrize("time_major", [False, True], ids=["B-T-mask", "T-B-mask-time-major"])
def test_lstm_reset_equals_splitting_the_sequence_and_restarting_from_zeros(uni_lstm, time_major):
    module, variables, x, (h0, c0) = uni_lstm
    runner = LSTM(hidden_size=4, num_layers=2, proj_size=2, time_major=time_major)
    x_in, reset_in = (np.swapaxes(x, 0, 1), RESET.T) if time_major else (x, RESET)

    y, (h_n, c_n) = japply(runner)(variables, x_in, (h0, c0), reset=np.asarray(reset_in))
    if time_major:
        y = np.swapaxes(y, 0, 1)

    y_ref, h_ref, c_ref = _split_reference(module, variables, x, h0, c0, RESET)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_n, h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_n, c_ref, rtol=0, atol=F32_ATOL)


def test_reset_at_step_zero_ignores_the_given_carry(uni_lstm):
    module, variables, x, (h0, c0) = uni_lstm
    apply = japply(module)
    zeros = (np.zeros_like(h0), np.zeros_like(c0))
    at_zero = np.zeros_like(RESET)
    at_zero[:, 0] = True
    y, (h, c) = apply(variables, x, (h0, c0), reset=np.asarray(at_zero))
    y_ref, (h_ref, c_ref) = apply(variables, x, zeros, reset=np.asarray(np.zeros_like(RESET)))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)
    # and without the reset the given carry does matter
    y_carry, _ = apply(variables, x, (h0, c0), reset=np.asarray(np.zeros_like(RESET)))
    assert not np.allclose(y_carry[:, 0], y_ref[:, 0])


def test_bidirectional_reset_makes_segments_independent_in_both_directions(bi_lstm):
    module, variables, x, (h0, c0) = bi_lstm
    zeros = (np.zeros_like(h0), np.zeros_like(c0))
    y, (h_n, c_n) = japply(module)(variables, x, zeros, reset=np.asarray(RESET))
    y_ref, h_ref, c_ref = _split_reference(module, variables, x, *zeros, RESET)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_n, h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_n, c_ref, rtol=0, atol=F32_ATOL)


def test_convlstm_reset_equals_splitting_the_sequence(conv_lstm):
    module, variables, x, (h0, c0) = conv_lstm
    reset = np.array([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], bool)  # 2+3, 5, 5
    y, (h_n, c_n) = japply(module)(variables, x, (h0, c0), reset=np.asarray(reset))
    y_ref, h_ref, c_ref = _split_reference(module, variables, x, h0, c0, reset)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h_n, h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c_n, c_ref, rtol=0, atol=F32_ATOL)


def test_reset_with_seq_lengths_matches_numpy_reference_float64(x64):
    """Bidirectional, 2 layers, resets inside the valid steps only, lengths 0..T."""
    rng = np.random.default_rng(14)
    batch, steps = 4, 6
    module = LSTM(hidden_size=3, num_layers=2, bidirectional=True, param_dtype=jnp.float64)
    x = rng.normal(size=(batch, steps, 2))
    variables = init_variables(module, x, rng=rng)
    h0 = rng.normal(size=(4, batch, 3))
    c0 = rng.normal(size=(4, batch, 3))
    lengths = np.array([6, 4, 2, 0])
    reset = np.array(
        [[0, 0, 1, 0, 1, 0], [0, 1, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool
    )
    assert not np.any(reset & (np.arange(steps)[None] >= lengths[:, None]))

    y, (h_n, c_n) = japply(module)(
        variables, x, (h0, c0),
        seq_lengths=np.asarray(lengths), reset=np.asarray(reset),
    )

    layers = layer_params(variables["params"], 2, True)
    ref_y, ref_h, ref_c = np_stack(
        np_lstm_cell, layers, np.swapaxes(x, 0, 1), h0, c0, lengths, reset.T
    )
    np.testing.assert_allclose(np.asarray(y), np.swapaxes(ref_y, 0, 1), rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(np.asarray(h_n), ref_h, rtol=0, atol=F64_ATOL)
    np.testing.assert_allclose(np.asarray(c_n), ref_c, rtol=0, atol=F64_ATOL)


# reset flags in the padding of a row (t >= its length) are not steps of that row
def test_forward_reset_flag_past_the_length_does_not_zero_the_final_carry(uni_lstm):
    module, variables, x, carry = uni_lstm
    lengths = np.asarray([3, 6, 2, 0])
    clean = np.zeros_like(RESET)
    clean[0, 1] = True  # a reset inside row 0's valid steps
    padded = clean.copy()
    padded[0, 4] = True  # row 0 has length 3: step 4 is padding
    padded[2, 2] = True  # row 2 has length 2: step 2 is padding
    padded[3, 0] = True  # row 3 has length 0: everything is padding

    apply = japply(module)
    y, (h, c) = apply(variables, x, carry, seq_lengths=lengths, reset=np.asarray(padded))
    y_ref, (h_ref, c_ref) = apply(variables, x, carry, seq_lengths=lengths, reset=np.asarray(clean))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)


def test_reverse_reset_flag_right_after_the_length_does_not_zero_the_initial_carry(bi_lstm):
    module, variables, x, carry = bi_lstm
    lengths = np.asarray([3, 6, 2, 4])
    clean = np.zeros_like(RESET)
    padded = clean.copy()
    padded[0, 3] = True  # row 0 (length 3): a flag at t == len, in the padding

    apply = japply(module)
    y, (h, c) = apply(variables, x, carry, seq_lengths=lengths, reset=np.asarray(padded))
    y_ref, (h_ref, c_ref) = apply(variables, x, carry, seq_lengths=lengths, reset=np.asarray(clean))
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)
