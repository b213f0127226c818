"""Gradient parity in training mode: inter-layer dropout with the same keep masks on both sides.

Modules: nn.LSTM, nn.GRU, nn.RNN (relu) and ConvLSTM2d, each with two layers and dropout 0.4.

The bound is docs/design.md's float64 gradient bound, 1e-10 relative to the largest gradient; a
single flipped mask element on one side must break it.
"""

from __future__ import annotations

import pytest
import torch

import torch_impl
from parity import compare
from parity.dropout import draw_dropout_masks, masked_forward, split_layers

F64 = torch.float64
GRAD_BOUND = 1e-10  # relative to the largest gradient


def _lstm() -> torch.nn.LSTM:
    torch.manual_seed(0)
    return torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True,
                         dropout=0.4, dtype=F64)


def _gru() -> torch.nn.GRU:
    torch.manual_seed(0)
    return torch.nn.GRU(3, 4, num_layers=2, bidirectional=True, batch_first=True, dropout=0.4,
                        dtype=F64)


def _rnn_relu() -> torch.nn.RNN:
    torch.manual_seed(0)
    return torch.nn.RNN(3, 4, num_layers=3, nonlinearity="relu", batch_first=True, dropout=0.4,
                        dtype=F64)


def _convlstm() -> torch_impl.ConvLSTM2d:
    torch.manual_seed(1)
    return torch_impl.ConvLSTM2d(2, 3, 3, num_layers=2, batch_first=True, dropout=0.4, dtype=F64)


def _dense_input() -> torch.Tensor:
    return torch.randn(2, 6, 3, dtype=F64, generator=torch.Generator().manual_seed(2))


CASES = {
    "lstm": (_lstm, _dense_input),
    "gru": (_gru, _dense_input),
    "rnn-relu": (_rnn_relu, _dense_input),
    "convlstm": (
        _convlstm,
        lambda: torch.randn(2, 4, 2, 5, 5, dtype=F64, generator=torch.Generator().manual_seed(3)),
    ),
}


def _grad_rel(report) -> float:
    return max(c.max_rel for c in report.checks if c.tensor.startswith("grad/"))


@pytest.mark.parametrize("kind", sorted(CASES))
def test_same_masks_match_in_float64(kind):
    make, make_x = CASES[kind]
    module, x = make(), make_x()
    masks = draw_dropout_masks(module, x, torch.Generator().manual_seed(4))
    assert any(not m.all() for m in masks), "the masks must drop something"
    report = compare(module, x, grads=True, dropout_masks=masks, chunks=x.shape[1] // 2,
                     initial_state="random")
    report.assert_ok()
    assert {c.tensor for c in report.checks} >= {"grad/input", "grad/h_0", "grad/weight_ih_l1"}
    assert _grad_rel(report) <= GRAD_BOUND


@pytest.mark.parametrize("kind", sorted(CASES))
def test_one_flipped_mask_element_fails(kind):
    make, make_x = CASES[kind]
    module, x = make(), make_x()
    masks = draw_dropout_masks(module, x, torch.Generator().manual_seed(4))
    other = [m.clone() for m in masks]
    other[0].view(-1)[7] = ~other[0].view(-1)[7]  # one unit of one step, on the JAX side only
    report = compare(module, x, grads=True, dropout_masks=masks, jax_dropout_masks=other)
    assert not report.ok
    failed = {c.tensor for c in report.failures}
    assert "output" in failed and any(t.startswith("grad/weight_") for t in failed)
    assert _grad_rel(report) > 1e3 * GRAD_BOUND


def test_random_masks_are_drawn_from_the_seed():
    module, x = _lstm(), CASES["lstm"][1]()
    a = draw_dropout_masks(module, x, torch.Generator().manual_seed(5))
    b = draw_dropout_masks(module, x, torch.Generator().manual_seed(5))
    assert [m.shape for m in a] == [torch.Size([2, 6, 8])]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    compare(module, x, grads=True, dropout_masks="random", seed=5).assert_ok()


def test_without_masks_the_torch_side_is_deterministic():
    """A train-mode module with dropout is compared in eval mode (and left in train mode)."""
    module = _lstm()
    assert module.training
    compare(module, CASES["lstm"][1]()).assert_ok()
    assert module.training


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn-relu"])
def test_split_layers_shares_parameters_and_gradients(kind):
    module = CASES[kind][0]()
    layers = split_layers(module)
    assert len(layers) == module.num_layers and all(type(m) is type(module) for m in layers)
    assert layers[1].weight_hh_l0 is module.weight_hh_l1
    if module.bidirectional:
        assert layers[1].weight_hh_l0_reverse is module.weight_hh_l1_reverse
    if kind.startswith("rnn"):
        assert all(m.nonlinearity == module.nonlinearity for m in layers)
    x = CASES[kind][1]()
    module.eval()
    y_ref, state_ref = module(x)
    y, state = masked_forward(module, x)  # no masks: the eval forward, layer by layer
    # the module's own state form: (h, c) for the LSTM, the tensor h for the GRU and the RNN
    assert isinstance(state, tuple) == (kind == "lstm")
    assert torch.equal(y, y_ref)
    for got, ref in zip(state if kind == "lstm" else (state,), state_ref if kind == "lstm" else (state_ref,)):
        assert torch.equal(got, ref)
    y.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_masked_convlstm_is_F_dropout_bit_for_bit():
    """The same keep draw gives ConvLSTM2d's own train-mode output exactly: y * keep / (1-p)."""
    module, x = _convlstm(), CASES["convlstm"][1]()
    torch.manual_seed(6)
    y_ref, (h_ref, _) = module.train()(x)
    torch.manual_seed(6)  # F.dropout draws bernoulli(1-p) on the time-major (T, B, C, H, W) output
    keep = torch.empty(4, 2, 3, 5, 5, dtype=F64).bernoulli_(1 - module.dropout)
    y, (h, _) = masked_forward(module, x, None, [keep.transpose(0, 1)])
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref)


def test_bad_masks_are_rejected():
    module, x = _lstm(), CASES["lstm"][1]()
    with pytest.raises(ValueError, match="expected 1"):
        compare(module, x, dropout_masks=[torch.ones(2, 6, 8), torch.ones(2, 6, 8)])
    with pytest.raises(ValueError, match=r"shape \(2, 6, 4\), expected \(2, 6, 8\)"):
        compare(module, x, dropout_masks=[torch.ones(2, 6, 4)])
    no_dropout = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True, dtype=F64)
    with pytest.raises(ValueError, match="dropout > 0"):
        compare(no_dropout, x, dropout_masks="random")
