"""Bad input: a ValueError or TypeError whose message names the argument, the expected value
and the value received (DESIGN.md, "Errors"); checks run at trace time, so ``jax.jit`` raises
the same message.

Covers: feature size different from the parameters', input rank, integer input, carry not a
pair / wrong layers, batch or features / integer carry, seq_lengths shape, range and dtype,
reset shape and dtype, and the constructors of ``LSTM`` and ``ConvLSTM``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jax_impl import LSTM, ConvLSTM

from jax_test_helpers import init_variables

B, T, F, H = 3, 5, 2, 4


@pytest.fixture(scope="module")
def lstm():
    """2 layers, bidirectional: carry (4, B, H); params for F=2 input features."""
    module = LSTM(hidden_size=H, num_layers=2, bidirectional=True)
    x = np.zeros((B, T, F), np.float32)
    return module, init_variables(module, x, rng=np.random.default_rng(41)), x


@pytest.fixture(scope="module")
def conv():
    """1 layer, 4 hidden channels on 2-channel 5x6 frames: carry (1, B, 5, 6, 4)."""
    module = ConvLSTM(hidden_channels=4, kernel_size=3)
    x = np.zeros((B, T, 5, 6, 2), np.float32)
    return module, init_variables(module, x, rng=np.random.default_rng(42)), x


def _carry(*shapes, dtype=np.float32):
    return tuple(np.zeros(s, dtype) for s in shapes)


# ---------------------------------------------------------------------------------- input


def test_lstm_feature_size_different_from_the_parameters_is_value_error(lstm):
    module, variables, _ = lstm
    with pytest.raises(
        ValueError, match=r"parameter layer_0/ih_kernel has shape \(2, 16\), expected \(3, 16\)"
    ):
        module.apply(variables, np.zeros((B, T, 3), np.float32))


def test_convlstm_channel_count_different_from_the_parameters_is_value_error(conv):
    module, variables, _ = conv
    with pytest.raises(
        ValueError,
        match=r"parameter layer_0/ih_kernel has shape \(3, 3, 2, 16\), expected \(3, 3, 5, 16\)",
    ):
        module.apply(variables, np.zeros((B, T, 5, 6, 5), np.float32))


@pytest.mark.parametrize("shape", [(T,), (1, B, T, F)], ids=["rank1", "rank4"])
def test_lstm_input_rank_other_than_2_or_3_is_value_error(lstm, shape):
    module, variables, _ = lstm
    with pytest.raises(
        ValueError,
        match=rf"LSTM input has rank {len(shape)} \(shape {re_tuple(shape)}\), expected 2 "
        r"\(unbatched\) or 3 \(batched\)",
    ):
        module.apply(variables, np.zeros(shape, np.float32))


@pytest.mark.parametrize("shape", [(T, 5, 6), (1, B, T, 5, 6, 2)], ids=["rank3", "rank6"])
def test_convlstm_input_rank_other_than_4_or_5_is_value_error(conv, shape):
    module, variables, _ = conv
    with pytest.raises(
        ValueError, match=rf"ConvLSTM input has rank {len(shape)} .*expected 4 \(unbatched\) or 5"
    ):
        module.apply(variables, np.zeros(shape, np.float32))


def test_integer_input_is_type_error(lstm, conv):
    module, variables, x = lstm
    with pytest.raises(TypeError, match=r"LSTM input has dtype int32, expected a floating dtype"):
        module.apply(variables, x.astype(np.int32))
    module, variables, x = conv
    with pytest.raises(TypeError, match=r"ConvLSTM input has dtype int32, expected a floating"):
        module.apply(variables, x.astype(np.int32))
    with pytest.raises(TypeError, match=r"input must be an array, got list"):
        module.apply(variables, x.tolist())


# ---------------------------------------------------------------------------------- carry


def test_carry_that_is_not_a_pair_is_type_error(lstm):
    module, variables, x = lstm
    h, c = _carry((4, B, H), (4, B, H))
    with pytest.raises(TypeError, match=r"carry must be a pair \(h, c\), got one array of shape \(4, 3, 4\) \(a GRU/RNN carry\?\)"):
        module.apply(variables, x, h)
    with pytest.raises(TypeError, match=r"carry must be a pair \(h, c\), got tuple"):
        module.apply(variables, x, (h, c, c))
    with pytest.raises(TypeError, match=r"carry c must be an array, got float"):
        module.apply(variables, x, (h, 0.0))


CARRY_CASES = [
    # (h shape, c shape, message): expected carry (4, 3, 4) for both
    ((2, B, H), (4, B, H), r"carry h has shape \(2, 3, 4\), expected \(4, 3, 4\)"),  # layers
    ((4, 2, H), (4, 2, H), r"carry h has shape \(4, 2, 4\), expected \(4, 3, 4\)"),  # batch
    ((4, B, 5), (4, B, H), r"carry h has shape \(4, 3, 5\), expected \(4, 3, 4\)"),  # features
    ((4, B, H), (4, B, 3), r"carry c has shape \(4, 3, 3\), expected \(4, 3, 4\)"),  # c features
    ((B, H), (B, H), r"carry h has shape \(3, 4\), expected \(4, 3, 4\)"),  # no layer axis
]


@pytest.mark.parametrize(
    "h_shape,c_shape,message", CARRY_CASES,
    ids=["layers", "batch", "h-features", "c-features", "missing-axis"],
)
def test_lstm_carry_of_wrong_shape_is_value_error(lstm, h_shape, c_shape, message):
    module, variables, x = lstm
    with pytest.raises(ValueError, match=message + r" \(layers \* directions, batch, features\)"):
        module.apply(variables, x, _carry(h_shape, c_shape))


def test_lstm_unbatched_input_with_batched_carry_is_value_error(lstm):
    module, variables, x = lstm
    with pytest.raises(ValueError, match=r"carry h has shape \(4, 3, 4\), expected \(4, 4\)"):
        module.apply(variables, x[0], _carry((4, B, H), (4, B, H)))


def test_convlstm_carry_of_wrong_shape_is_value_error(conv):
    module, variables, x = conv
    with pytest.raises(
        ValueError,
        match=r"carry h has shape \(1, 3, 6, 5, 4\), expected \(1, 3, 5, 6, 4\) "
        r"\(layers, batch, H, W, channels\)",
    ):
        module.apply(variables, x, _carry((1, B, 6, 5, 4), (1, B, 5, 6, 4)))
    with pytest.raises(ValueError, match=r"carry c has shape \(2, 3, 5, 6, 4\), expected \(1, "):
        module.apply(variables, x, _carry((1, B, 5, 6, 4), (2, B, 5, 6, 4)))


def test_integer_carry_is_type_error(lstm):
    module, variables, x = lstm
    with pytest.raises(TypeError, match=r"carry h has dtype int32, expected a floating dtype"):
        module.apply(variables, x, _carry((4, B, H), (4, B, H), dtype=np.int32))


# ---------------------------------------------------------------------------- seq_lengths


SEQ_LENGTH_CASES = [
    (ValueError, np.array([5, 5]), r"seq_lengths has shape \(2,\), expected \(3,\)"),
    (ValueError, np.array([[5, 5, 5]]), r"seq_lengths has shape \(1, 3\), expected \(3,\)"),
    (ValueError, np.array([5, -1, 2]), r"seq_lengths must lie in \[0, 5\].*got min -1 max 5"),
    (ValueError, np.array([5, 6, 2]), r"seq_lengths must lie in \[0, 5\].*got min 2 max 6"),
    (TypeError, np.array([5.0, 1.0, 2.0], np.float32),
     r"seq_lengths has dtype float32, expected an integer dtype"),
    (TypeError, np.array([True, True, False]), r"seq_lengths has dtype bool, expected an integer"),
]


@pytest.mark.parametrize(
    "error,lengths,message", SEQ_LENGTH_CASES,
    ids=["short", "rank2", "negative", "above-T", "float", "bool"],
)
def test_bad_seq_lengths_are_rejected(lstm, error, lengths, message):
    module, variables, x = lstm
    with pytest.raises(error, match=message):
        module.apply(variables, x, seq_lengths=lengths)


def test_unbatched_input_needs_a_scalar_seq_length(conv):
    module, variables, x = conv
    with pytest.raises(
        ValueError, match=r"seq_lengths has shape \(1,\), expected \(\) \(unbatched input\)"
    ):
        module.apply(variables, x[0], seq_lengths=np.array([3]))


# ---------------------------------------------------------------------------------- reset


RESET_CASES = [
    (False, ValueError, np.zeros((T, B), bool),
     r"reset has shape \(5, 3\), expected \(3, 5\) \(\(B, T\)\)"),
    (True, ValueError, np.zeros((B, T), bool),
     r"reset has shape \(3, 5\), expected \(5, 3\) \(\(T, B\) with time_major\)"),
    (False, ValueError, np.zeros((B,), bool), r"reset has shape \(3,\), expected \(3, 5\)"),
    (False, TypeError, np.zeros((B, T), np.int32), r"reset has dtype int32, expected bool"),
    (False, TypeError, np.zeros((B, T), np.float32), r"reset has dtype float32, expected bool"),
]


@pytest.mark.parametrize(
    "time_major,error,reset,message", RESET_CASES,
    ids=["T-B-for-batch-first", "B-T-for-time-major", "1d", "int", "float"],
)
def test_bad_reset_masks_are_rejected(lstm, time_major, error, reset, message):
    _, variables, x = lstm
    module = LSTM(hidden_size=H, num_layers=2, bidirectional=True, time_major=time_major)
    x = np.swapaxes(x, 0, 1) if time_major else x
    with pytest.raises(error, match=message):
        module.apply(variables, x, reset=reset)


def test_convlstm_bad_reset_is_rejected(conv):
    module, variables, x = conv
    with pytest.raises(ValueError, match=r"reset has shape \(5,\), expected \(3, 5\)"):
        module.apply(variables, x, reset=np.zeros((T,), bool))
    with pytest.raises(
        ValueError, match=r"reset has shape \(3, 5\), expected \(5,\) \(\(T,\) for unbatched"
    ):
        module.apply(variables, x[0], reset=np.zeros((B, T), bool))


# ---------------------------------------------------------------------------- constructors


CONSTRUCTOR_CASES = [
    (lambda: LSTM(hidden_size=0), ValueError, r"hidden_size must be >= 1, got 0"),
    (lambda: LSTM(hidden_size=4, num_layers=0), ValueError, r"num_layers must be >= 1, got 0"),
    (lambda: LSTM(hidden_size=4, proj_size=4), ValueError,
     r"proj_size must be smaller than hidden_size \(4\), got 4"),
    (lambda: LSTM(hidden_size=4, proj_size=7), ValueError,
     r"proj_size must be smaller than hidden_size \(4\), got 7"),
    (lambda: LSTM(hidden_size=4, proj_size=-1), ValueError, r"proj_size must be >= 0, got -1"),
    (lambda: LSTM(hidden_size=4, dropout=1.0), ValueError,
     r"dropout must lie in \[0, 1\), got 1.0"),
    (lambda: LSTM(hidden_size=4, dropout=-0.1), ValueError,
     r"dropout must lie in \[0, 1\), got -0.1"),
    (lambda: LSTM(hidden_size=4, dropout="0.1"), TypeError, r"dropout must be a number, got str"),
    (lambda: LSTM(hidden_size=4.0), TypeError, r"hidden_size must be an int, got float"),
    (lambda: ConvLSTM(hidden_channels=0), ValueError, r"hidden_channels must be >= 1, got 0"),
    (lambda: ConvLSTM(hidden_channels=4, num_layers=0), ValueError,
     r"num_layers must be >= 1, got 0"),
    (lambda: ConvLSTM(hidden_channels=4, kernel_size=0), ValueError,
     r"kernel_size must be >= 1, got 0"),
    (lambda: ConvLSTM(hidden_channels=4, kernel_size=(3, 0)), ValueError,
     r"kernel_size must be >= 1, got \(3, 0\)"),
    (lambda: ConvLSTM(hidden_channels=4, dilation=0), ValueError, r"dilation must be >= 1, got 0"),
    (lambda: ConvLSTM(hidden_channels=4, dilation=(1, 2, 3)), TypeError,
     r"dilation must be an int or a pair of ints, got \(1, 2, 3\)"),
    (lambda: ConvLSTM(hidden_channels=4, kernel_size=2.5), TypeError,
     r"kernel_size must be an int or a pair of ints"),
]


@pytest.mark.parametrize(
    "make,error,message", CONSTRUCTOR_CASES,
    ids=[
        "lstm-hidden0", "lstm-layers0", "proj-eq-hidden", "proj-gt-hidden", "proj-negative",
        "dropout-1", "dropout-negative", "dropout-str", "hidden-float", "conv-hidden0",
        "conv-layers0",
        "conv-kernel0", "conv-kernel-pair-0", "conv-dilation0", "conv-dilation-triple",
        "conv-kernel-float",
    ],
)
def test_constructors_validate_their_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ------------------------------------------------------------------- checks at trace time


def test_bad_carry_raises_the_same_message_under_jit(lstm):
    module, variables, x = lstm
    bad = _carry((2, B, H), (4, B, H))
    message = r"carry h has shape \(2, 3, 4\), expected \(4, 3, 4\)"
    with pytest.raises(ValueError, match=message):
        module.apply(variables, x, bad)
    with pytest.raises(ValueError, match=message):
        jax.jit(module.apply)(variables, x, bad)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.apply, variables, x, bad)


def test_bad_seq_lengths_shape_and_reset_raise_under_jit(lstm):
    module, variables, x = lstm
    with pytest.raises(ValueError, match=r"seq_lengths has shape \(2,\), expected \(3,\)"):
        jax.jit(module.apply)(variables, x, seq_lengths=np.array([5, 5]))
    with pytest.raises(TypeError, match=r"reset has dtype int32, expected bool"):
        jax.jit(module.apply)(variables, x, reset=np.zeros((B, T), np.int32))


def re_tuple(shape):
    """A shape tuple as a regex: (1, 3, 5, 2) -> \\(1, 3, 5, 2\\)."""
    return "\\(" + ", ".join(map(str, shape)) + (",\\)" if len(shape) == 1 else "\\)")
