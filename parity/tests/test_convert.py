"""Conversion is lossless both ways, and live streams move between frameworks mid-sequence."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import jax_impl
import torch_impl
from parity import stream_to_jax, stream_to_torch, to_jax, to_torch

MODULES = {
    "lstm": lambda: torch.nn.LSTM(4, 6, num_layers=2, batch_first=True),
    "lstm-bi-proj-nobias": lambda: torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3, bias=False),
    "lstm-cell": lambda: torch.nn.LSTMCell(4, 6),
    "convlstm": lambda: torch_impl.ConvLSTM2d(2, 3, (3, 2), num_layers=2, dilation=(1, 2), batch_first=True),
    "convlstm-nobias": lambda: torch_impl.ConvLSTM2d(2, 3, 3, bias=False),
    "convlstm-cell": lambda: torch_impl.ConvLSTMCell(2, 3, 2),
    # GRU and RNN: every option (layers, bidirectional, bias, batch_first, dropout, nonlinearity)
    "gru": lambda: torch.nn.GRU(4, 6, num_layers=2, batch_first=True),
    "gru-l3-bi-nobias": lambda: torch.nn.GRU(4, 6, num_layers=3, bidirectional=True, bias=False),
    "gru-dropout-time-major": lambda: torch.nn.GRU(4, 6, num_layers=2, dropout=0.25),
    "gru-cell": lambda: torch.nn.GRUCell(4, 6),
    "gru-cell-nobias": lambda: torch.nn.GRUCell(4, 6, bias=False),
    "rnn-tanh": lambda: torch.nn.RNN(4, 6, num_layers=2, batch_first=True),
    "rnn-relu-bi-nobias": lambda: torch.nn.RNN(4, 6, num_layers=2, nonlinearity="relu", bidirectional=True, bias=False),
    "rnn-relu-dropout": lambda: torch.nn.RNN(4, 6, num_layers=3, nonlinearity="relu", dropout=0.5, batch_first=True),
    "rnn-cell-tanh-nobias": lambda: torch.nn.RNNCell(4, 6, bias=False),
    "rnn-cell-relu": lambda: torch.nn.RNNCell(4, 6, nonlinearity="relu"),
}
EXPECTED_JAX = {
    "lstm": jax_impl.LSTM, "lstm-bi-proj-nobias": jax_impl.LSTM, "lstm-cell": jax_impl.LSTMCell,
    "convlstm": jax_impl.ConvLSTM, "convlstm-nobias": jax_impl.ConvLSTM, "convlstm-cell": jax_impl.ConvLSTMCell,
    "gru": jax_impl.GRU, "gru-l3-bi-nobias": jax_impl.GRU, "gru-dropout-time-major": jax_impl.GRU,
    "gru-cell": jax_impl.GRUCell, "gru-cell-nobias": jax_impl.GRUCell,
    "rnn-tanh": jax_impl.RNN, "rnn-relu-bi-nobias": jax_impl.RNN, "rnn-relu-dropout": jax_impl.RNN,
    "rnn-cell-tanh-nobias": jax_impl.RNNCell, "rnn-cell-relu": jax_impl.RNNCell,
}
# The options that decide the JAX module, read from the torch module (torch name -> JAX name).
JAX_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_layers", "bias": "use_bias",
              "dropout": "dropout", "bidirectional": "bidirectional", "nonlinearity": "nonlinearity"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(MODULES))
def test_round_trip_is_bit_exact(name, dtype):
    module = MODULES[name]().to(dtype)
    with jax.enable_x64(dtype == torch.float64):
        jax_module, variables = to_jax(module)
        assert type(jax_module) is EXPECTED_JAX[name]
        leaves = jax.tree_util.tree_leaves(variables)
        assert leaves and all(leaf.dtype == np.dtype(str(dtype).replace("torch.", "")) for leaf in leaves)
        back = to_torch(jax_module, variables)
    assert type(back) is type(module)
    original, restored = module.state_dict(), back.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert restored[key].dtype == original[key].dtype, key
        assert torch.equal(restored[key], original[key]), key
    assert repr(back) == repr(module)
    # repr leaves some options out (nn.RNN's nonlinearity): compare them one by one, both sides
    for torch_name, jax_name in JAX_FIELDS.items():
        if hasattr(module, torch_name):
            assert getattr(back, torch_name) == getattr(module, torch_name), torch_name
            if hasattr(jax_module, jax_name):
                assert getattr(jax_module, jax_name) == getattr(module, torch_name), jax_name
    if hasattr(module, "batch_first"):
        assert jax_module.time_major is not module.batch_first


def test_layout_follows_batch_first():
    module, _ = to_jax(torch.nn.LSTM(4, 6, batch_first=False))
    assert module.time_major is True
    module, _ = to_jax(torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True))
    assert module.time_major is False


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn-relu", "convlstm"])
def test_stream_moves_torch_to_jax_and_back(kind):
    """A stream stopped in torch continues in JAX where it stopped, and back again."""
    torch.manual_seed(0)
    if kind != "convlstm":
        stateful = {
            "lstm": lambda: torch_impl.StatefulLSTM(4, 6, num_layers=2),
            "gru": lambda: torch_impl.StatefulGRU(4, 6, num_layers=2, bidirectional=True),
            "rnn-relu": lambda: torch_impl.StatefulRNN(4, 6, num_layers=2, nonlinearity="relu"),
        }[kind]().double()
        chunks = [torch.randn(3, n, 4, dtype=torch.float64) for n in (5, 3, 4)]
        to_jax_layout = lambda t: t.numpy()
    else:
        stateful = torch_impl.StatefulConvLSTM(2, 3, 3, num_layers=2).double()
        chunks = [torch.randn(2, n, 2, 5, 5, dtype=torch.float64) for n in (3, 2, 2)]
        to_jax_layout = lambda t: np.moveaxis(t.numpy(), -3, -1)
    reference = torch_impl.StatefulWrapper(stateful.module)  # same weights, its own state
    expected = [reference(c).detach() for c in chunks]

    with torch.no_grad():
        stateful(chunks[0])
    with jax.enable_x64(True):
        stream = stream_to_jax(stateful)
        # the live state came along, in the module's carry form: (h, c), or the array h
        one_tensor = kind in ("gru", "rnn-relu")
        assert isinstance(stream.carry, jax_impl.LSTMState) != one_tensor
        if one_tensor:
            assert np.array_equal(np.asarray(stream.carry), stateful.get_state().numpy())
        y_jax = np.asarray(stream(to_jax_layout(chunks[1])))
        back = stream_to_torch(stream)
        if one_tensor:  # the state JAX left, bit for bit, as torch's one tensor h
            assert isinstance(back.get_state(), torch.Tensor)
            assert np.array_equal(back.get_state().numpy(), np.asarray(stream.carry))
    assert np.abs(y_jax - to_jax_layout(expected[1])).max() <= 1e-12
    assert type(back) is type(stateful)
    assert getattr(back.module, "nonlinearity", None) == getattr(stateful.module, "nonlinearity", None)
    y_back = back(chunks[2]).detach()
    assert torch.allclose(y_back, expected[2], rtol=0, atol=1e-12)
    end = back.get_state() if one_tensor else back.get_state()[0]
    ref_end = reference.get_state() if one_tensor else reference.get_state()[0]
    assert torch.allclose(end, ref_end.detach(), rtol=0, atol=1e-12)


def test_unsupported_module_is_a_type_error():
    with pytest.raises(TypeError, match=r"cannot convert a torch\.nn\.modules\.linear\.Linear.*supported: torch\.nn\.LSTM"):
        to_jax(torch.nn.Linear(3, 4))


def test_float64_needs_x64():
    with pytest.raises(TypeError, match="x64"):
        to_jax(torch.nn.LSTM(3, 4).double())


def test_missing_and_mismatched_parameters_are_named():
    module, variables = to_jax(torch.nn.LSTM(3, 4, num_layers=2))
    params = {k: dict(v) for k, v in variables["params"].items()}
    del params["layer_1"]["hh_bias"]
    with pytest.raises(ValueError, match=r"missing layer_1/hh_bias \(torch bias_hh_l1\)"):
        to_torch(module, {"params": params})
    other, other_vars = to_jax(torch.nn.LSTM(3, 5, num_layers=2))
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \(20, 3\) after conversion, expected \(16, 3\)"):
        to_torch(module, other_vars)


def test_non_finite_weights_are_refused():
    lstm = torch.nn.LSTM(3, 4)
    with torch.no_grad():
        lstm.weight_hh_l0[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weight_hh_l0 has 1 non-finite"):
        to_jax(lstm)
