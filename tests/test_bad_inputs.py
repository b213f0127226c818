"""The bad-input catalogue: every kind of wrong input is a ValueError or TypeError whose message
names what was expected and what came (DESIGN.md, "Errors"), across jax_impl, torch_impl,
parity and parity.checkpoint.

Also here: the JAX checks run at trace time (the same error under ``jax.jit``, nothing of them
in the compiled program), and non-finite input propagates on the JAX side exactly as in torch.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as flax_nn

import jax_impl
import torch_impl
from parity import compare, compare_training, stream_to_jax, stream_to_torch, to_jax, to_torch
from parity.checkpoint import load_stream, save_stream
from parity.convert import spec_for_torch, state_to_jax
from parity.tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

# ------------------------------------------------------------------------------ fixtures
# Built once and shared: none of the failing calls below changes them. Weights come from
# to_jax: a JAX init compiles (or dispatches op by op), which takes seconds here.


@functools.cache
def jax_lstm() -> tuple[jax_impl.LSTM, Any]:
    """LSTM(8) on (B=2, T=5, F=3) batch-major input."""
    torch.manual_seed(0)
    module, variables = to_jax(torch.nn.LSTM(3, 8, batch_first=True))
    assert module == jax_impl.LSTM(8, time_major=False, param_dtype=jnp.float32)
    return module, variables


@functools.cache
def jax_gru() -> tuple[jax_impl.GRU, Any]:
    """GRU(8) on (B=2, T=5, F=3) batch-major input; its carry is one array (1, 2, 8)."""
    torch.manual_seed(0)
    return to_jax(torch.nn.GRU(3, 8, batch_first=True))


def apply_gru(carry=None):
    module, variables = jax_gru()
    return module.apply(variables, x_jax(), carry)


def gru_checkpoint(tmp_path):
    stream = torch_impl.StatefulGRU(3, 8)
    stream(torch.randn(2, 4, 3))
    return save_stream(stream, tmp_path / "gru.safetensors", position=4)


@functools.cache
def jax_convlstm() -> tuple[jax_impl.ConvLSTM, Any]:
    """ConvLSTM(4, 3) on (B=2, T=3, 5, 5, C=2)."""
    torch.manual_seed(0)
    return to_jax(torch_impl.ConvLSTM2d(2, 4, 3, batch_first=True))


@functools.cache
def jax_stream() -> jax_impl.Stateful:
    """A stream that has consumed one (2, 4, 3) chunk: carried batch 2."""
    stream = jax_impl.Stateful(*jax_lstm())
    stream(jnp.ones((2, 4, 3)))
    return stream


@functools.cache
def torch_stream() -> torch_impl.StatefulLSTM:
    """StatefulLSTM(3, 8) that has consumed one (2, 4, 3) chunk: carried batch 2."""
    stream = torch_impl.StatefulLSTM(3, 8)
    stream(torch.randn(2, 4, 3))
    return stream


def x_jax() -> jax.Array:
    return jnp.ones((2, 5, 3))


def apply_lstm(x=None, carry=None, **kwargs):
    module, variables = jax_lstm()
    return module.apply(variables, x_jax() if x is None else x, carry, **kwargs)


def zeros_carry(h_shape, c_shape=None, dtype=jnp.float32):
    return jnp.zeros(h_shape, dtype), jnp.zeros(c_shape or h_shape, jnp.float32)


def nan_lstm(value: float) -> torch.nn.LSTM:
    lstm = torch.nn.LSTM(3, 4)
    with torch.no_grad():
        lstm.weight_hh_l0[2, 1] = value
    return lstm


def variables_with(update: Callable[[dict], None]) -> dict:
    """jax_lstm's variables, copied and changed by ``update(layer_0 params)``."""
    params = {k: dict(v) for k, v in jax_lstm()[1]["params"].items()}
    update(params["layer_0"])
    return {"params": params}


def saved_checkpoint(tmp_path, damage: Callable[[bytes], bytes] = lambda b: b):
    path = save_stream(torch_impl.StatefulLSTM(3, 8), tmp_path / "s.safetensors", position=3)
    path.write_bytes(damage(path.read_bytes()))
    return path


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def float64_outside_x64():
    """to_jax of float64 weights with x64 off, even if a caller left it on."""
    with jax.enable_x64(False):
        return to_jax(torch.nn.LSTM(3, 4).double())


def float64_checkpoint_outside_x64(tmp_path):
    stream = torch_impl.StatefulLSTM(3, 4, dtype=torch.float64)
    path = save_stream(stream, tmp_path / "f64.safetensors")
    with jax.enable_x64(False):
        return load_stream(path, "jax")


def convlstm_channels_first():
    model = jax_impl.ConvLSTM(16, 3)
    variables = model.init(jax.random.key(0), jnp.ones((2, 4, 8, 8, 3)))
    return model.apply(variables, jnp.ones((2, 4, 3, 8, 8)))  # torch's (B, T, C, H, W)


def _float64_lstm():
    with jax.enable_x64(True):
        lstm = jax_impl.LSTM(4, param_dtype=jnp.float64)
        return lstm, lstm.init(jax.random.key(0), jnp.ones((2, 3, 3), jnp.float64))


def float64_apply_outside_x64():
    lstm, variables = _float64_lstm()
    with jax.enable_x64(False):
        return lstm.apply(variables, jnp.ones((2, 3, 3)))


def float64_stateful_outside_x64():
    lstm, variables = _float64_lstm()
    with jax.enable_x64(False):
        return jax_impl.Stateful(lstm, variables)


# ------------------------------------------------------------------------------ catalogue
# (id, call(tmp_path), error type, regex naming the expected and the received value)

CATALOGUE: list[tuple[str, Callable[[Any], Any], type, str]] = [
    # --- jax_impl.LSTM / ConvLSTM: input
    ("jax-input-rank", lambda _: apply_lstm(jnp.ones((2, 5, 3, 1))), ValueError,
     r"LSTM input has rank 4 \(shape \(2, 5, 3, 1\)\), expected 2 \(unbatched\) or 3 \(batched\)"),
    ("jax-input-int-dtype", lambda _: apply_lstm(jnp.ones((2, 5, 3), jnp.int32)), TypeError,
     r"LSTM input has dtype int32, expected a floating dtype"),
    ("jax-input-not-an-array", lambda _: apply_lstm([[1.0, 2.0, 3.0]]), TypeError,
     r"LSTM input must be an array, got list"),
    ("jax-input-features", lambda _: apply_lstm(jnp.ones((2, 5, 4))), ValueError,
     r"parameter layer_0/ih_kernel has shape \(3, 32\), expected \(4, 32\) for this input"),
    ("jax-convlstm-input-rank",
     lambda _: jax_convlstm()[0].apply(jax_convlstm()[1], jnp.ones((2, 3, 5))), ValueError,
     r"ConvLSTM input has rank 3 \(shape \(2, 3, 5\)\), expected 4 \(unbatched\) or 5 \(batched\)"),
    # --- carry layout
    ("jax-carry-batch", lambda _: apply_lstm(carry=zeros_carry((1, 3, 8))), ValueError,
     r"carry h has shape \(1, 3, 8\), expected \(1, 2, 8\) \(layers \* directions, batch, features\)"),
    ("jax-carry-not-a-pair", lambda _: apply_lstm(carry=jnp.zeros((1, 2, 8))), TypeError,
     r"carry must be a pair \(h, c\), got one array of shape \(1, 2, 8\) \(a GRU/RNN carry\?\)"),
    ("jax-carry-int-dtype", lambda _: apply_lstm(carry=zeros_carry((1, 2, 8), dtype=jnp.int32)),
     TypeError, r"carry h has dtype int32, expected a floating dtype"),
    ("jax-convlstm-carry-spatial",
     lambda _: jax_convlstm()[0].apply(jax_convlstm()[1], jnp.ones((2, 3, 5, 5, 2)),
                                       zeros_carry((1, 2, 5, 6, 4))), ValueError,
     r"carry h has shape \(1, 2, 5, 6, 4\), expected \(1, 2, 5, 5, 4\) \(layers, batch, H, W, channels\)"),
    # --- GRU / RNN: the carry is one array h
    ("jax-gru-carry-pair", lambda _: apply_gru(zeros_carry((1, 2, 8))), TypeError,
     r"carry must be one array h of shape \(1, 2, 8\), got a tuple of 2 \(an LSTM's \(h, c\)\?\)"),
    ("jax-gru-carry-lstm-state",
     lambda _: apply_gru(jax_impl.LSTMState(*zeros_carry((1, 2, 8)))), TypeError,
     r"carry must be one array h of shape \(1, 2, 8\), got a LSTMState of 2 \(an LSTM's \(h, c\)\?\)"),
    ("jax-gru-carry-hidden-size", lambda _: apply_gru(jnp.zeros((1, 2, 9))), ValueError,
     r"carry h has shape \(1, 2, 9\), expected \(1, 2, 8\) \(layers \* directions, batch, features\)"),
    ("jax-gru-carry-layers", lambda _: apply_gru(jnp.zeros((2, 2, 8))), ValueError,
     r"carry h has shape \(2, 2, 8\), expected \(1, 2, 8\) \(layers \* directions, batch, features\)"),
    ("jax-rnn-nonlinearity", lambda _: jax_impl.RNN(8, nonlinearity="sigmoid"), ValueError,
     r"nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    ("jax-rnn-cell-nonlinearity", lambda _: jax_impl.RNNCell(8, nonlinearity="sigmoid"), ValueError,
     r"nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    # torch's GRU has no projection; the dataclass refuses the field, naming it
    ("jax-gru-proj-size", lambda _: jax_impl.GRU(8, proj_size=4), TypeError,
     r"GRU.__init__\(\) got an unexpected keyword argument 'proj_size'"),
    ("jax-stream-gru-given-lstm-carry",
     lambda _: jax_impl.Stateful(*jax_gru(), carry=zeros_carry((1, 2, 8))), TypeError,
     r"carry must be one array h of shape \(1, 2, 8\), got a tuple of 2 \(an LSTM's \(h, c\)\?\)"),
    ("jax-stream-gru-carry-hidden-size",
     lambda _: jax_impl.Stateful(*jax_gru(), carry=jnp.zeros((1, 2, 9))), ValueError,
     r"carry h has shape \(1, 2, 9\), expected \(1, 2, 8\) \(the module's carry layout\)"),
    ("jax-stream-lstm-given-gru-carry",
     lambda _: jax_impl.Stateful(*jax_lstm(), carry=jnp.zeros((1, 2, 8))), TypeError,
     r"carry must be a pair \(h, c\), got one array of shape \(1, 2, 8\) \(a GRU/RNN carry\?\)"),
    # --- seq_lengths and reset masks
    ("jax-seq-lengths-shape", lambda _: apply_lstm(seq_lengths=jnp.array([1, 2, 3])), ValueError,
     r"seq_lengths has shape \(3,\), expected \(2,\) \(one length per batch row\)"),
    ("jax-seq-lengths-range", lambda _: apply_lstm(seq_lengths=jnp.array([1, 6])), ValueError,
     r"seq_lengths must lie in \[0, 5\] \(the sequence length\), got min 1 max 6"),
    ("jax-seq-lengths-float", lambda _: apply_lstm(seq_lengths=jnp.array([1.0, 2.0])), TypeError,
     r"seq_lengths has dtype float32, expected an integer dtype"),
    ("jax-reset-shape", lambda _: apply_lstm(reset=jnp.zeros((5, 2), bool)), ValueError,
     r"reset has shape \(5, 2\), expected \(2, 5\) \(\(B, T\)\)"),
    ("jax-reset-dtype", lambda _: apply_lstm(reset=jnp.zeros((2, 5), jnp.int32)), TypeError,
     r"reset has dtype int32, expected bool"),
    # --- constructors
    ("jax-proj-size", lambda _: jax_impl.LSTM(4, proj_size=4), ValueError,
     r"proj_size must be smaller than hidden_size \(4\), got 4"),
    ("jax-dropout-range", lambda _: jax_impl.LSTM(4, dropout=1.0), ValueError,
     r"dropout must lie in \[0, 1\), got 1.0"),
    ("jax-hidden-size-type", lambda _: jax_impl.LSTM("8"), TypeError,
     r"hidden_size must be an int, got str"),
    ("jax-kernel-size-zero", lambda _: jax_impl.ConvLSTM(4, kernel_size=0), ValueError,
     r"kernel_size must be >= 1, got 0"),
    ("jax-kernel-size-float", lambda _: jax_impl.ConvLSTM(4, kernel_size=2.5), TypeError,
     r"kernel_size must be an int or a pair of ints, got 2.5"),
    ("jax-dilation-zero", lambda _: jax_impl.ConvLSTM(4, 3, dilation=(1, 0)), ValueError,
     r"dilation must be >= 1, got \(1, 0\)"),
    # --- jax_impl.Stateful
    ("jax-stream-batch-change", lambda _: jax_stream()(jnp.ones((3, 4, 3))), ValueError,
     r"input batch 3 differs from the carried state's batch 2; call reset\(\) first"),
    ("jax-stream-empty-chunk", lambda _: jax_stream()(jnp.ones((2, 0, 3))), ValueError,
     r"chunk has 0 time steps, expected at least 1"),
    ("jax-stream-chunk-rank", lambda _: jax_stream()(jnp.ones((2, 4, 3, 1))), ValueError,
     r"chunk has rank 4 \(shape \(2, 4, 3, 1\)\), expected 2 \(unbatched\) or 3 \(batched\)"),
    ("jax-stream-reset-mask-length", lambda _: jax_stream().reset(np.array([True, False, True])),
     ValueError, r"reset mask has shape \(3,\), expected \(2,\) \(carried batch\)"),
    ("jax-stream-reset-mask-dtype", lambda _: jax_stream().reset(np.array([1, 0])), TypeError,
     r"reset mask has dtype int64, expected bool"),
    ("jax-stream-chunk-reset-shape",
     lambda _: jax_stream()(jnp.ones((2, 5, 3)), reset=np.zeros((5, 2), bool)), ValueError,
     r"reset has shape \(5, 2\), expected \(2, 5\) \(\(B, T\)\)"),
    ("jax-stream-carry-layout",
     lambda _: setattr(jax_stream(), "carry", zeros_carry((2, 2, 8))), ValueError,
     r"carry h has shape \(2, 2, 8\), expected \(1, 2, 8\) \(the module's carry layout\)"),
    ("jax-stream-of-torch-module", lambda _: jax_impl.Stateful(torch.nn.LSTM(3, 4), {}), TypeError,
     r"Stateful needs a jax_impl LSTM, GRU, RNN or ConvLSTM, got LSTM"),
    # --- torch_impl.ConvLSTM2d / ConvLSTMCell
    ("torch-convlstm-channels",
     lambda _: torch_impl.ConvLSTM2d(2, 4, 3)(torch.randn(3, 2, 3, 4, 4)), ValueError,
     r"input has 3 channels, expected 2 \(input_channels\)"),
    ("torch-convlstm-dtype",
     lambda _: torch_impl.ConvLSTM2d(2, 4, 3)(torch.randn(3, 2, 2, 4, 4, dtype=torch.float64)),
     TypeError, r"input has dtype torch.float64, expected torch.float32 \(the parameters' dtype\)"),
    ("torch-convlstm-rank", lambda _: torch_impl.ConvLSTM2d(2, 4, 3)(torch.randn(3, 2, 4)),
     ValueError, r"input must be 5-D \(T, B, C, H, W\) or 4-D unbatched \(T, C, H, W\), got 3-D shape \(3, 2, 4\)"),
    ("torch-convlstm-hx-height",
     lambda _: torch_impl.ConvLSTM2d(2, 4, 3)(torch.randn(3, 2, 2, 4, 4), (torch.zeros(1, 2, 4, 5, 4),) * 2),
     ValueError, r"hx h has height 5, expected 4 \(input height\)"),
    ("torch-convlstm-hx-not-a-pair",
     lambda _: torch_impl.ConvLSTM2d(2, 4, 3)(torch.randn(3, 2, 2, 4, 4), torch.zeros(1, 2, 4, 4, 4)),
     TypeError, r"hx must be a pair \(h_0, c_0\) of tensors, got Tensor"),
    ("torch-cell-hx-batch",
     lambda _: torch_impl.ConvLSTMCell(2, 4, 3)(torch.randn(2, 2, 4, 4), (torch.zeros(3, 4, 4, 4),) * 2),
     ValueError, r"hx h has batch 3, expected 2 \(input batch\)"),
    ("torch-convlstm-kernel-zero", lambda _: torch_impl.ConvLSTM2d(2, 4, 0), ValueError,
     r"kernel_size must be >= 1, got 0"),
    ("torch-convlstm-dropout-range", lambda _: torch_impl.ConvLSTM2d(2, 4, 3, dropout=1.0), ValueError,
     r"dropout must be in \[0, 1\), got 1.0"),
    ("torch-from-concat-gate-order",
     lambda _: torch_impl.from_concat_conv([torch.randn(8, 3, 3, 3)], gate_order="ifgx"), ValueError,
     r"gate_order must be a permutation of 'ifgo', got 'ifgx'"),
    # --- torch_impl stateful modules
    ("torch-stream-batch-change", lambda _: torch_stream()(torch.randn(3, 4, 3)), ValueError,
     r"input batch 3 differs from the carried state's batch 2; call reset_states\(\) first"),
    ("torch-stream-features", lambda _: torch_stream()(torch.randn(2, 4, 5)), ValueError,
     r"input has 5 features, expected 3 \(input_size\)"),
    ("torch-stream-dtype", lambda _: torch_stream()(torch.randn(2, 4, 3, dtype=torch.float64)),
     TypeError, r"input has dtype torch.float64, expected torch.float32 \(the parameters' dtype\)"),
    ("torch-stream-reset-mask-length",
     lambda _: torch_stream().reset_states(torch.tensor([True, False, True])), ValueError,
     r"reset mask has length 3, expected 2 \(the carried state's batch\)"),
    ("torch-stream-reset-mask-dtype", lambda _: torch_stream().reset_states(torch.tensor([1, 0])),
     TypeError, r"reset mask must have dtype torch.bool, got torch.int64"),
    ("torch-stream-set-state-layers",
     lambda _: torch_stream().set_state((torch.zeros(2, 2, 8), torch.zeros(2, 2, 8))), ValueError,
     r"state h has 2 layers, expected 1 \(num_layers \* num_directions\)"),
    ("torch-rnn-nonlinearity", lambda _: torch_impl.StatefulRNN(3, 8, nonlinearity="sigmoid"),
     ValueError, r"nonlinearity must be 'tanh' or 'relu', got 'sigmoid'"),
    ("torch-gru-set-state-pair",
     lambda _: torch_impl.StatefulGRU(3, 8).set_state((torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))),
     TypeError, r"state of GRU must be None or a tensor h, got tuple"),
    ("torch-gru-set-state-hidden-size",
     lambda _: torch_impl.StatefulGRU(3, 8).set_state(torch.zeros(1, 2, 9)), ValueError,
     r"state h has 9 features, expected 8 \(hidden_size\)"),
    ("torch-stream-unsupported-module", lambda _: torch_impl.StatefulWrapper(torch.nn.Linear(3, 4)),
     TypeError, r"StatefulWrapper supports nn.LSTM, nn.GRU, nn.RNN and ConvLSTM2d, got Linear"),
    # --- parity: conversion
    ("to-jax-unsupported", lambda _: to_jax(torch.nn.Linear(3, 4)), TypeError,
     r"cannot convert a torch.nn.modules.linear.Linear; supported: torch.nn.LSTM, torch.nn.GRU, "
     r"torch.nn.RNN, torch.nn.LSTMCell, torch.nn.GRUCell, torch.nn.RNNCell, "
     r"torch_impl.ConvLSTM2d, torch_impl.ConvLSTMCell"),
    ("to-jax-float64-outside-x64", lambda _: float64_outside_x64(), TypeError,
     r"float64 weights need JAX's x64 mode"),
    ("to-jax-nan-weights", lambda _: to_jax(nan_lstm(float("nan"))), ValueError,
     r"parameter weight_hh_l0 has 1 non-finite values \(NaN or Inf\); expected finite weights"),
    ("to-jax-inf-weights", lambda _: to_jax(nan_lstm(float("inf"))), ValueError,
     r"parameter weight_hh_l0 has 1 non-finite values \(NaN or Inf\); expected finite weights"),
    ("to-torch-variables-of-another-config",
     lambda _: to_torch(jax_impl.LSTM(8, num_layers=2), jax_lstm()[1]), ValueError,
     r"LSTM params: missing .*layer_1/hh_bias.*layer_1/hh_kernel.*layer_1/ih_bias.*layer_1/ih_kernel"),
    ("to-torch-hidden-size-mismatch", lambda _: to_torch(jax_impl.LSTM(9), jax_lstm()[1]), ValueError,
     r"parameter weight_ih_l0 has shape \(32, 3\) after conversion, expected \(36, 3\)"),
    ("to-torch-missing-key",
     lambda _: to_torch(jax_lstm()[0], variables_with(lambda p: p.pop("hh_bias"))), ValueError,
     r"LSTM params: missing .*layer_0/hh_bias"),
    ("to-torch-extra-key",
     lambda _: to_torch(jax_lstm()[0], variables_with(lambda p: p.update(peephole=jnp.ones(8)))),
     ValueError, r"LSTM params: unexpected .*layer_0/peephole"),
    ("to-torch-nan-weights",
     lambda _: to_torch(jax_lstm()[0], variables_with(
         lambda p: p.update(ih_bias=p["ih_bias"].at[0].set(jnp.nan)))), ValueError,
     r"parameter bias_ih_l0 has 1 non-finite values \(NaN or Inf\); expected finite weights"),
    ("to-torch-mixed-dtypes",
     lambda _: to_torch(jax_lstm()[0], variables_with(
         lambda p: p.update(ih_bias=p["ih_bias"].astype(jnp.float16)))), TypeError,
     r"parameters have mixed dtypes \['float16', 'float32'\]; expected one dtype"),
    ("to-torch-unsupported-module", lambda _: to_torch(flax_nn.Dense(3), {"params": {}}), TypeError,
     r"cannot convert a Dense; supported: jax_impl.LSTM"),
    ("stream-to-jax-not-a-stream", lambda _: stream_to_jax(torch.nn.LSTM(3, 4)), TypeError,
     r"stream_to_jax needs a torch_impl stateful module, got LSTM"),
    ("stream-to-torch-not-a-stream", lambda _: stream_to_torch(jax_lstm()[0]), TypeError,
     r"stream_to_torch needs a jax_impl.Stateful, got LSTM"),
    ("state-to-jax-gru-given-a-pair",
     lambda _: state_to_jax(spec_for_torch(torch.nn.GRU(3, 4)), (torch.zeros(1, 2, 4),) * 2),
     TypeError, r"state must be one tensor h, got a tuple of 2 \(an LSTM's \(h, c\)\?\)"),
    ("state-to-jax-not-a-pair",
     lambda _: state_to_jax(spec_for_torch(torch.nn.LSTM(3, 4)), torch.zeros(1, 2, 4)), TypeError,
     r"state must be a pair \(h, c\), got Tensor"),
    # --- parity: compare
    ("compare-chunks-wrong-sum",
     lambda _: compare(torch.nn.LSTM(3, 4, batch_first=True), torch.randn(2, 6, 3), chunks=[2, 3]),
     ValueError, r"chunk lengths \[2, 3\] must be >= 1 and sum to the sequence length 6, got sum 5"),
    ("compare-chunks-empty-chunk",
     lambda _: compare(torch.nn.LSTM(3, 4, batch_first=True), torch.randn(2, 6, 3), chunks=[0, 6]),
     ValueError, r"chunk lengths \[0, 6\] must be >= 1 and sum to the sequence length 6"),
    ("compare-chunks-float",
     lambda _: compare(torch.nn.LSTM(3, 4, batch_first=True), torch.randn(2, 6, 3), chunks=2.5),
     TypeError, r'chunks must be an int, a list of int lengths or "random", got 2.5'),
    ("compare-chunks-zero",
     lambda _: compare(torch.nn.LSTM(3, 4, batch_first=True), torch.randn(2, 6, 3), chunks=0),
     ValueError, r"chunks must be >= 1, got 0"),
    ("compare-chunks-unknown-word",
     lambda _: compare(torch.nn.LSTM(3, 4, batch_first=True), torch.randn(2, 6, 3), chunks="all"),
     ValueError, r"chunks must be an int, a list of lengths or \"random\", got 'all'"),
    ("compare-seq-lengths-convlstm",
     lambda _: compare(torch_impl.ConvLSTM2d(2, 4, 3), torch.randn(3, 2, 2, 4, 4), seq_lengths=[1, 2]),
     ValueError, r"seq_lengths is supported for nn.LSTM, nn.GRU and nn.RNN, got ConvLSTM2d"),
    ("compare-initial-state-word",
     lambda _: compare(torch.nn.LSTM(3, 4), torch.randn(6, 2, 3), initial_state="zeros"),
     ValueError, r"initial_state must be a state, \"random\" or None, got 'zeros'"),
    ("compare-gru-initial-state-pair",
     lambda _: compare(torch.nn.GRU(3, 4), torch.randn(6, 2, 3),
                       initial_state=(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))), TypeError,
     r"initial_state must be one tensor h, got a tuple of 2 \(an LSTM's \(h, c\)\?\)"),
    ("compare-lstm-initial-state-one-tensor",
     lambda _: compare(torch.nn.LSTM(3, 4), torch.randn(6, 2, 3), initial_state=torch.zeros(1, 2, 4)),
     TypeError, r"initial_state must be a pair \(h, c\), got Tensor"),
    ("compare-training-gru-initial-state-pair",
     lambda _: compare_training(torch.nn.GRU(3, 4), [torch.randn(6, 2, 3)], [torch.randn(6, 2, 4)],
                                optimizer="sgd", steps=1,
                                initial_state=(torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
     TypeError, r"initial_state must be one tensor h for GRU, got a tuple of 2 \(an LSTM's \(h, c\)\?\)"),
    ("compare-dtype-without-bound",
     lambda _: compare(torch.nn.LSTM(3, 4), torch.randn(6, 2, 3), dtype=torch.float16), TypeError,
     r"dtype torch.float16 has no fixed parity bound; expected torch.float32 or torch.float64"),
    # --- parity.checkpoint
    ("checkpoint-truncated", lambda p: load_stream(saved_checkpoint(p, lambda b: b[: len(b) // 2]), "jax"),
     ValueError, r"has \d+ bytes, expected \d+ from its header: truncated or corrupted"),
    ("checkpoint-corrupted", lambda p: load_stream(saved_checkpoint(p, flip_last_byte), "jax"),
     ValueError, r"failed its checksum: stored sha256 [0-9a-f]{16}\.\.\., computed [0-9a-f]{16}\.\.\."),
    ("checkpoint-other-config",
     lambda p: load_stream(saved_checkpoint(p), "torch", expect=torch.nn.LSTM(3, 16, batch_first=True)),
     ValueError, r"has a different configuration: hidden_size=8, expected 16 \(from expect\)"),
    ("checkpoint-framework", lambda p: load_stream(saved_checkpoint(p), "mxnet"), ValueError,
     r"framework must be 'jax' or 'torch', got 'mxnet'"),
    ("checkpoint-float64-outside-x64", lambda p: float64_checkpoint_outside_x64(p), TypeError,
     r"holds float64 weights, expected float32 outside JAX's x64 mode"),
    ("checkpoint-gru-expected-lstm",
     lambda p: load_stream(gru_checkpoint(p), "jax", expect=torch_impl.StatefulLSTM(3, 8)),
     ValueError, r"holds kind 'gru', expected 'lstm' \(from expect\)"),
    ("checkpoint-unsupported-expect",
     lambda p: load_stream(gru_checkpoint(p), "torch", expect=torch.nn.GRUCell(3, 8)), TypeError,
     r"GRUCell is a gru_cell; a stream checkpoint holds an LSTM, GRU, RNN or ConvLSTM"),
    ("jax-gru-cell-carry-pair",
     lambda _: jax_impl.GRUCell(8).init(jax.random.key(0), zeros_carry((2, 8)), jnp.ones((2, 3))),
     TypeError, r"carry must be one array h of shape \(2, 8\), got a tuple of 2"),
    ("jax-gru-cell-carry-hidden-size",
     lambda _: jax_impl.GRUCell(8).init(jax.random.key(0), jnp.zeros((2, 9)), jnp.ones((2, 3))),
     ValueError, r"carry h has shape \(2, 9\), expected \(2, 8\)"),
    # --- new-user probes: layouts, precision, materialization
    ("jax-convlstm-channels-first", lambda _: convlstm_channels_first(), ValueError,
     r"input has shape \(2, 4, 3, 8, 8\): it looks channels-first \(\.\.\., C, H, W\) with C=3, but the "
     r"JAX ConvLSTM is channels-last"),
    ("jax-float64-apply-outside-x64", lambda _: float64_apply_outside_x64(), TypeError,
     r"the input, carry or parameters holds float64 arrays but JAX's x64 mode is off, so it would "
     r"silently run in float32; call it inside `with jax.enable_x64\(True\):`"),
    ("jax-float64-stateful-outside-x64", lambda _: float64_stateful_outside_x64(), TypeError,
     r"Stateful's variables holds float64 arrays but JAX's x64 mode is off"),
    ("to-jax-meta-parameters", lambda _: to_jax(torch.nn.LSTM(3, 4, device="meta")), ValueError,
     r"the module's parameters are on the 'meta' device \(not materialized\): call "
     r"module.to_empty\(device='cpu'\) and load its weights"),
    ("compare-meta-parameters", lambda _: compare(torch.nn.GRU(3, 4, device="meta"), torch.randn(5, 2, 3)),
     ValueError, r"on the 'meta' device \(not materialized\)"),
    ("compare-bfloat16-grads",
     lambda _: compare(torch.nn.LSTM(3, 4), torch.randn(5, 2, 3), dtype=torch.bfloat16, grads=True),
     ValueError, r"grads and dropout_masks are not supported in bfloat16"),
]



@pytest.mark.parametrize(
    "call, error, message", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE]
)
def test_bad_input_is_a_clear_error(tmp_path, call, error, message):
    with pytest.raises(error, match=message) as raised:
        call(tmp_path)
    assert type(raised.value) is error  # not a subclass (e.g. a library's own error type)


def test_catalogue_is_broad():
    """At least 20 distinct kinds, from every package."""
    ids = [c[0] for c in CATALOGUE]
    assert len(set(ids)) == len(ids) >= 20
    for prefix in ("jax-", "torch-", "to-jax", "to-torch", "compare-", "checkpoint-"):
        assert any(i.startswith(prefix) for i in ids), prefix
    for kind in ("gru", "rnn"):  # the one-tensor carries have their own probes
        assert sum(kind in i for i in ids) >= 3, kind


# ------------------------------------------------------------------------------ trace time

JIT_CASES = [
    ("input-rank", lambda v: (jnp.ones((2, 5, 3, 1)), None), {}),
    ("carry-batch", lambda v: (x_jax(), zeros_carry((1, 3, 8))), {}),
    ("seq-lengths-shape", lambda v: (x_jax(), None), {"seq_lengths": jnp.array([1, 2, 3])}),
    ("reset-shape", lambda v: (x_jax(), None), {"reset": jnp.zeros((5, 2), bool)}),
    ("reset-dtype", lambda v: (x_jax(), None), {"reset": jnp.zeros((2, 5), jnp.int32)}),
    ("input-features", lambda v: (jnp.ones((2, 5, 4)), None), {}),
]


@pytest.mark.parametrize("make, kwargs", [c[1:] for c in JIT_CASES], ids=[c[0] for c in JIT_CASES])
def test_checks_run_at_trace_time_with_the_same_error(make, kwargs):
    """Under jit the shapes are still concrete: the same error, raised while tracing."""
    module, variables = jax_lstm()
    x, carry = make(variables)
    with pytest.raises((ValueError, TypeError)) as eager:
        module.apply(variables, x, carry, **kwargs)
    traced = jax.jit(lambda v, x, carry, kw: module.apply(v, x, carry, **kw))
    with pytest.raises(type(eager.value), match=re.escape(str(eager.value))):
        traced.lower(variables, x, carry, kwargs)  # lowering only traces: nothing runs


@pytest.mark.parametrize("kind", ["lstm", "convlstm"])
def test_compiled_program_holds_no_runtime_checks(kind):
    """The checks leave nothing in the program: no custom calls, callbacks or assertions."""
    module, variables = jax_lstm() if kind == "lstm" else jax_convlstm()
    x = x_jax() if kind == "lstm" else jnp.ones((2, 3, 5, 5, 2))
    lengths = jnp.array([x.shape[1], 1])
    reset = jnp.zeros(x.shape[:2], bool)
    lowered = jax.jit(
        lambda v, x, n, r: module.apply(v, x, seq_lengths=n, reset=r)
    ).lower(variables, x, lengths, reset)
    # the detector itself: a program with a host callback is caught
    control = jax.jit(lambda a: jax.debug.callback(lambda _: None, a) or a).lower(lengths)
    assert "callback" in control.as_text().lower()
    for text in (lowered.as_text(), lowered.compile().as_text()):
        lowered_text = text.lower()
        # (function names such as check_seq_lengths do appear, in the frames' metadata)
        for marker in ("custom_call", "custom-call", "callback", "assert"):
            assert marker not in lowered_text, marker


def test_seq_lengths_under_jit_are_clipped_not_checked():
    """DESIGN.md: traced lengths cannot be checked; they are clipped to [0, T]."""
    module, variables = jax_lstm()
    run = jax.jit(lambda n: module.apply(variables, x_jax(), seq_lengths=n))
    y_clipped, carry_clipped = run(jnp.array([99, -4]))
    y_ref, carry_ref = module.apply(variables, x_jax(), seq_lengths=jnp.array([5, 0]))
    assert np.allclose(y_clipped, y_ref, atol=1e-6) and np.allclose(carry_clipped[0], carry_ref[0], atol=1e-6)


# ------------------------------------------------------------------------------ non-finite


def _nan_input(kind: str) -> np.ndarray:
    """Torch-layout input with one NaN (row 0, step 2) and one Inf (row 0, step 4)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 3) if kind == "lstm" else (2, 6, 2, 5, 5))
    x[(0, 2) + (1,) * (x.ndim - 2)] = np.nan
    x[(0, 4) + (0,) * (x.ndim - 2)] = np.inf
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["lstm", "convlstm"])
def test_nan_and_inf_in_input_propagate_as_in_torch(kind):
    torch.manual_seed(0)
    if kind == "lstm":
        module = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
    else:
        module = torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True)
    x = _nan_input(kind)
    with torch.no_grad():
        y_t, (h_t, c_t) = module(torch.from_numpy(x))
    jax_module, variables = to_jax(module)
    x_j = x if kind == "lstm" else np.moveaxis(x, 2, -1)
    y_j, (h_j, c_j) = jax_module.apply(variables, jnp.asarray(x_j))
    y_j = np.asarray(y_j) if kind == "lstm" else np.moveaxis(np.asarray(y_j), -1, 2)
    assert np.isnan(y_t.numpy()).any() and not np.isnan(y_t.numpy()[1]).any()  # row 1 clean
    assert np.array_equal(np.isnan(y_j), np.isnan(y_t.numpy()))
    assert np.array_equal(np.isinf(y_j), np.isinf(y_t.numpy()))
    assert np.allclose(y_j[1], y_t.numpy()[1], atol=1e-5)  # the other row is unaffected
    h_j = np.asarray(h_j) if kind == "lstm" else np.moveaxis(np.asarray(h_j), -1, 2)
    assert np.array_equal(np.isnan(h_j), np.isnan(h_t.numpy()))


def test_nan_in_a_stream_stays_in_its_row_and_a_reset_clears_it():
    module, variables = jax_lstm()
    stream = jax_impl.Stateful(module, variables)
    x = np.ones((2, 3, 3), np.float32)
    x[0, 1, 0] = np.nan
    y = np.asarray(stream(x))  # chunk of 3 is padded to bucket 3; the padding must not leak
    assert np.isnan(y[0, 1:]).all() and not np.isnan(y[1]).any()
    stream.reset(np.array([True, False]))
    y = np.asarray(stream(np.ones((2, 3, 3), np.float32)))
    assert not np.isnan(y).any()


@pytest.mark.parametrize("where", ["nan-input", "inf-initial-cell-state"])
def test_compare_reports_non_finite_values_as_not_ok(where):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    state = (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))
    if where == "nan-input":
        x[0, 1, 2] = float("nan")  # NaN everywhere downstream in row 0
        expected = {("full", "output"), ("full", "h_n"), ("chunks 2+3", "c_n")}
    else:
        state[1][0, 1, 3] = float("inf")  # c stays Inf; h = o * tanh(c) saturates, finite
        expected = {("full", "c_n"), ("chunks 2+3", "c_n")}
    report = compare(torch.nn.LSTM(3, 4, batch_first=True), x, chunks=[2, 3], initial_state=state)
    assert not report.ok
    flagged = {(c.run, c.tensor) for c in report.checks if "non-finite" in c.note}
    assert expected <= flagged and all(not c.ok for c in report.checks if "non-finite" in c.note)
    assert "non-finite" in str(report) and "MISMATCH" in str(report)
    with pytest.raises(AssertionError, match="non-finite"):
        report.assert_ok()
