"""``jax_impl.Stateful``: streaming chunk by chunk with the carry kept between calls.

* a ragged stream (random chunk lengths 1..20 over T=60) equals ``jax.jit(module.apply)`` run
  chunk by chunk with ``seq_lengths`` set to each chunk's full length, bit for bit, and one
  full call within 1e-6;
* compilations: at most one per distinct ``bucket_length``; a second pass over the same chunk
  lengths compiles nothing (and gives the same bits);
* ``reset(mask)`` zeros exactly the chosen rows (NaNs included); ``reset()`` then a new batch
  size works; a batch size change without reset is a ValueError naming both sizes;
* the ``carry`` getter hands out copies that stay valid although the step donates the carry;
  the setter copies, validates shapes and accepts None;
* unbatched streams, a ``ConvLSTM`` stream, chunks with their own ``reset``/``seq_lengths``;
* bad chunks, masks and modules are rejected with messages naming what was expected.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import LSTM, ConvLSTM, Stateful
from jax_impl.functional import bucket_length

from jax_test_helpers import init_variables, japply

F32_ATOL = 1e-6
BATCH, FEATURES, HIDDEN = 3, 3, 4


def _f32(a):
    return np.asarray(a, np.float32)


@pytest.fixture(scope="module")
def lstm():
    rng = np.random.default_rng(31)
    module = LSTM(hidden_size=HIDDEN, num_layers=2)
    variables = init_variables(module, np.zeros((BATCH, 4, FEATURES), np.float32), rng=rng)
    return module, variables


def _zeros_carry(module, batch_shape):
    h_shape, c_shape = module.carry_shapes(batch_shape)
    return np.zeros(h_shape, np.float32), np.zeros(c_shape, np.float32)


# ------------------------------------------------------------------------------- bucketing


def test_bucket_length_is_the_smallest_bucket_that_fits():
    expected = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8, 9: 12, 12: 12, 13: 16,
                17: 24, 20: 24, 25: 32, 33: 48, 60: 64}
    assert {n: bucket_length(n) for n in expected} == expected
    for n in range(1, 200):
        assert n <= bucket_length(n) < 2 * n or n <= 2


# ---------------------------------------------------------------------------- ragged stream


@pytest.fixture(scope="module")
def ragged(lstm):
    """Streams T=60 in random chunks of 1..20 twice (reset() between) and records it all."""
    module, variables = lstm
    steps = 60
    draw = np.random.default_rng(43)  # draws [11, 14, 9, 1, 12, 1, 6, 6]: buckets 1, 6, 12, 16
    lengths = []
    while sum(lengths) < steps:
        lengths.append(int(min(draw.integers(1, 21), steps - sum(lengths))))
    x = _f32(np.random.default_rng(32).normal(size=(BATCH, steps, FEATURES)))
    bounds = np.cumsum([0] + lengths)

    stream = Stateful(module, variables)
    assert stream.carry is None and stream.compilations == 0
    passes, compilations = [], []
    for _ in range(2):
        ys = [np.asarray(stream(x[:, a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        passes.append((np.concatenate(ys, axis=1), tuple(np.asarray(a) for a in stream.carry)))
        compilations.append(stream.compilations)
        stream.reset()

    apply = japply(module)
    carry = _zeros_carry(module, (BATCH,))
    ys = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        y, carry = apply(variables, x[:, a:b], carry, seq_lengths=np.full((BATCH,), b - a))
        ys.append(y)
    chunked_apply = (np.concatenate(ys, axis=1), carry)
    full = apply(variables, x)
    return dict(
        lengths=lengths, passes=passes, compilations=compilations,
        chunked_apply=chunked_apply, full=full,
    )


def test_ragged_stream_equals_jitted_apply_per_chunk_with_full_seq_lengths_bitwise(ragged):
    (y, (h, c)), (y_ref, (h_ref, c_ref)) = ragged["passes"][0], ragged["chunked_apply"]
    assert 1 in ragged["lengths"] and any(bucket_length(n) != n for n in ragged["lengths"])
    # bitwise: only the loop length differs (the padding is selected away, never computed
    # with); every step runs the same ops on the same (B, ...) shapes, so the same kernels
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(c, c_ref)


def test_ragged_stream_equals_one_full_call(ragged):
    (y, (h, c)), (y_ref, (h_ref, c_ref)) = ragged["passes"][0], ragged["full"]
    assert y.shape == (BATCH, 60, HIDDEN)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=F32_ATOL)


def test_stream_compiles_at_most_once_per_bucket_length(ragged):
    buckets = {bucket_length(n) for n in ragged["lengths"]}
    # the draw pads most chunks and puts several lengths in one bucket
    assert len(buckets) < len(set(ragged["lengths"]))
    assert 1 <= ragged["compilations"][0] <= len(buckets), (ragged["lengths"], buckets)


def test_second_pass_over_the_same_chunk_lengths_compiles_nothing(ragged):
    first, second = ragged["compilations"]
    assert second == first
    (y1, (h1, c1)), (y2, (h2, c2)) = ragged["passes"]
    np.testing.assert_array_equal(y2, y1)
    np.testing.assert_array_equal(h2, h1)
    np.testing.assert_array_equal(c2, c1)


# ------------------------------------------------------------------------------ the carry


def test_reset_mask_zeros_only_the_chosen_rows(lstm):
    module, variables = lstm
    rng = np.random.default_rng(33)
    stream = Stateful(module, variables)
    stream(_f32(rng.normal(size=(BATCH, 4, FEATURES))))
    h, c = (np.asarray(a) for a in stream.carry)
    assert np.all(h != 0) and np.all(c != 0)

    stream.reset(np.array([True, False, True]))
    h2, c2 = (np.asarray(a) for a in stream.carry)
    for new, old in ((h2, h), (c2, c)):
        np.testing.assert_array_equal(new[:, [0, 2]], 0.0)
        np.testing.assert_array_equal(new[:, 1], old[:, 1])

    # a NaN in a reset row does not survive the reset
    stream.carry = (np.where(np.arange(BATCH)[None, :, None] == 1, np.nan, h), c)
    stream.reset(np.array([False, True, False]))
    h3, _ = (np.asarray(a) for a in stream.carry)
    np.testing.assert_array_equal(h3[:, 1], 0.0)
    np.testing.assert_array_equal(h3[:, [0, 2]], h[:, [0, 2]])


def test_batch_size_change_without_reset_is_value_error_naming_both_sizes(lstm):
    module, variables = lstm
    stream = Stateful(module, variables, carry=_zeros_carry(module, (3,)))
    with pytest.raises(ValueError, match=r"input batch 2 differs from the carried state's batch 3"):
        stream(np.zeros((2, 4, FEATURES), np.float32))
    with pytest.raises(ValueError, match=r"none \(unbatched\).*batch 3"):
        stream(np.zeros((4, FEATURES), np.float32))


def test_reset_then_a_different_batch_size_works(lstm):
    module, variables = lstm
    rng = np.random.default_rng(34)
    stream = Stateful(module, variables, carry=_zeros_carry(module, (3,)))
    stream.reset()
    assert stream.carry is None
    x = _f32(rng.normal(size=(2, 4, FEATURES)))
    y = np.asarray(stream(x))
    y_ref, (h_ref, _) = japply(module)(variables, x)
    assert y.shape == (2, 4, HIDDEN) and stream.carry[0].shape == (2, 2, HIDDEN)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(stream.carry[0], h_ref, rtol=0, atol=F32_ATOL)


def test_carry_getter_and_setter_copies_survive_the_donated_step(lstm):
    module, variables = lstm
    rng = np.random.default_rng(35)
    given = tuple(jnp.asarray(a) for a in _zeros_carry(module, (BATCH,)))
    stream = Stateful(module, variables, carry=given)
    stream(_f32(rng.normal(size=(BATCH, 4, FEATURES))))
    # the arrays handed to the setter were copied, not donated
    assert not given[0].is_deleted() and not np.any(np.asarray(given[0]))

    read = stream.carry
    snapshot = tuple(np.array(a) for a in read)
    stream(_f32(rng.normal(size=(BATCH, 4, FEATURES))))
    stream(_f32(rng.normal(size=(BATCH, 4, FEATURES))))
    assert not read[0].is_deleted() and not read[1].is_deleted()
    np.testing.assert_array_equal(np.asarray(read[0]), snapshot[0])
    np.testing.assert_array_equal(np.asarray(read[1]), snapshot[1])
    assert not np.array_equal(np.asarray(stream.carry[0]), snapshot[0])  # the stream moved on
    assert stream.carry[0] is not stream.carry[0]


def test_carry_setter_validates_shapes_and_type(lstm):
    module, variables = lstm  # carry (2, B, 4), (2, B, 4)
    stream = Stateful(module, variables)
    h, c = _zeros_carry(module, (BATCH,))
    with pytest.raises(ValueError, match=r"carry h has shape \(3, 3, 4\), expected \(2, 3, 4\)"):
        stream.carry = (np.zeros((3, BATCH, HIDDEN), np.float32), c)
    with pytest.raises(ValueError, match=r"carry h has shape \(2, 3, 5\), expected \(2, 3, 4\)"):
        stream.carry = (np.zeros((2, BATCH, 5), np.float32), c)
    with pytest.raises(ValueError, match=r"carry c has shape \(2, 2, 4\), expected \(2, 3, 4\)"):
        stream.carry = (h, np.zeros((2, 2, HIDDEN), np.float32))
    with pytest.raises(TypeError, match=r"carry must be a pair \(h, c\), got one array of shape \(2, 3, 4\)"):
        stream.carry = h
    with pytest.raises(TypeError, match=r"carry h has dtype int32, expected a floating dtype"):
        stream.carry = (h.astype(np.int32), c)
    assert stream.carry is None  # nothing was stored by the failed assignments
    stream.carry = (h, c)
    assert stream.carry[0].shape == (2, BATCH, HIDDEN)
    stream.carry = None
    assert stream.carry is None


def test_reset_mask_is_validated(lstm):
    module, variables = lstm
    stream = Stateful(module, variables, carry=_zeros_carry(module, (BATCH,)))
    with pytest.raises(ValueError, match=r"reset mask has shape \(2,\), expected \(3,\)"):
        stream.reset(np.array([True, False]))
    with pytest.raises(TypeError, match=r"reset mask has dtype int64, expected bool"):
        stream.reset(np.array([1, 0, 1], np.int64))
    unbatched = Stateful(module, variables, carry=_zeros_carry(module, ()))
    with pytest.raises(ValueError, match=r"reset\(mask\) needs a batched stream"):
        unbatched.reset(np.array([True]))


# ------------------------------------------------------------------------- other streams


def test_unbatched_stream_equals_unbatched_full_call(lstm):
    module, variables = lstm
    rng = np.random.default_rng(36)
    x = _f32(rng.normal(size=(7, FEATURES)))
    stream = Stateful(module, variables)
    y = np.concatenate([np.asarray(stream(x[:4])), np.asarray(stream(x[4:]))])
    y_ref, (h_ref, c_ref) = japply(module)(variables, x)
    h, c = stream.carry
    assert h.shape == (2, HIDDEN)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(h, h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(c, c_ref, rtol=0, atol=F32_ATOL)
    with pytest.raises(ValueError, match=r"input batch 3 differs .* batch none \(unbatched\)"):
        stream(x[None].repeat(3, axis=0))


def test_stream_chunk_with_its_own_reset_and_seq_lengths_equals_apply(lstm):
    module, variables = lstm
    rng = np.random.default_rng(37)
    x = _f32(rng.normal(size=(BATCH, 5, FEATURES)))  # bucket 6: reset is padded too
    reset = np.zeros((BATCH, 5), bool)
    reset[0, 2] = reset[1, 0] = True
    lengths = np.array([5, 3, 4])
    carry = tuple(_f32(rng.normal(size=s)) for s in module.carry_shapes((BATCH,)))
    stream = Stateful(module, variables, carry=carry)
    y = np.asarray(stream(x, seq_lengths=lengths, reset=reset))
    y_ref, (h_ref, c_ref) = japply(module)(variables, x, carry, seq_lengths=lengths, reset=reset)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(stream.carry[0], h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(stream.carry[1], c_ref, rtol=0, atol=F32_ATOL)


def test_convlstm_stream_equals_full_call():
    rng = np.random.default_rng(38)
    module = ConvLSTM(hidden_channels=2, kernel_size=3, num_layers=2, time_major=True)
    x = _f32(rng.normal(size=(7, 2, 3, 4, 2)))  # (T, B, H, W, C)
    variables = init_variables(module, x, rng=rng)
    stream = Stateful(module, variables)
    y = np.concatenate([np.asarray(stream(x[:3])), np.asarray(stream(x[3:]))], axis=0)
    y_ref, (h_ref, c_ref) = japply(module)(variables, x)
    assert stream.carry[0].shape == (2, 2, 3, 4, 2)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(stream.carry[0], h_ref, rtol=0, atol=F32_ATOL)
    np.testing.assert_allclose(stream.carry[1], c_ref, rtol=0, atol=F32_ATOL)


def test_stateful_rejects_bad_modules_and_chunks(lstm):
    module, variables = lstm
    with pytest.raises(TypeError, match=r"jax_impl LSTM, GRU, RNN or ConvLSTM, got Dense"):
        import flax.linen as nn

        Stateful(nn.Dense(3), {})
    stream = Stateful(module, variables)
    with pytest.raises(ValueError, match=r"chunk has 0 time steps, expected at least 1"):
        stream(np.zeros((BATCH, 0, FEATURES), np.float32))
    with pytest.raises(ValueError, match=r"chunk has rank 4 .* expected 2 \(unbatched\) or 3"):
        stream(np.zeros((1, BATCH, 4, FEATURES), np.float32))
    assert stream.carry is None
