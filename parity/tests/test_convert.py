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
}
EXPECTED_JAX = {
    "lstm": jax_impl.LSTM, "lstm-bi-proj-nobias": jax_impl.LSTM, "lstm-cell": jax_impl.LSTMCell,
    "convlstm": jax_impl.ConvLSTM, "convlstm-nobias": jax_impl.ConvLSTM, "convlstm-cell": jax_impl.ConvLSTMCell,
}


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


def test_layout_follows_batch_first():
    module, _ = to_jax(torch.nn.LSTM(4, 6, batch_first=False))
    assert module.time_major is True
    module, _ = to_jax(torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True))
    assert module.time_major is False


@pytest.mark.parametrize("kind", ["lstm", "convlstm"])
def test_stream_moves_torch_to_jax_and_back(kind):
    """A stream stopped in torch continues in JAX where it stopped, and back again."""
    torch.manual_seed(0)
    if kind == "lstm":
        stateful = torch_impl.StatefulLSTM(4, 6, num_layers=2).double()
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
        y_jax = np.asarray(stream(to_jax_layout(chunks[1])))
        back = stream_to_torch(stream)
    assert np.abs(y_jax - to_jax_layout(expected[1])).max() <= 1e-12
    y_back = back(chunks[2]).detach()
    assert torch.allclose(y_back, expected[2], rtol=0, atol=1e-12)
    assert type(back) is type(stateful)


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
