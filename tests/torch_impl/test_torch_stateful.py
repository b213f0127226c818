"""StatefulWrapper, StatefulLSTM and StatefulConvLSTM: carrying, resetting and checking state.

Chunked runs are compared with one full run, or (bidirectional modules, where chunking
changes the result) with the state threaded by hand. ConvLSTM2d runs step by step, so its
chunked run is bitwise equal; nn.LSTM/GRU/RNN project the whole chunk at once on CPU, so
theirs is compared in float64 within 1e-12.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from torch_impl import ConvLSTM2d, StatefulConvLSTM, StatefulLSTM, StatefulWrapper

DTYPE = torch.float64


def partitions(T, seed):
    """Random chunk boundaries of range(T); length-1 chunks come up often."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, T), rng.randint(1, T - 1)))
    return list(zip([0, *cuts], [*cuts, T]))


def run_chunks(stream, x, time_dim, bounds):
    return torch.cat([stream(x.narrow(time_dim, a, b - a)) for a, b in bounds], time_dim)


def make_stateful(kind):
    """(stateful module, input, time dim) for each supported kind, float64."""
    torch.manual_seed(0)
    if kind == "StatefulLSTM":
        s = StatefulLSTM(3, 4, num_layers=2, dtype=DTYPE)
        return s, torch.randn(2, 9, 3, dtype=DTYPE), 1
    if kind == "StatefulConvLSTM":
        s = StatefulConvLSTM(2, 3, (2, 3), num_layers=2, dtype=DTYPE)
        return s, torch.randn(2, 9, 2, 5, 4, dtype=DTYPE), 1
    if kind == "ConvLSTM2d time-major":
        s = StatefulWrapper(ConvLSTM2d(2, 3, 3, dtype=DTYPE))
        return s, torch.randn(9, 2, 2, 5, 4, dtype=DTYPE), 0
    if kind == "LSTM time-major":
        s = StatefulWrapper(nn.LSTM(3, 4, 2, dtype=DTYPE))
        return s, torch.randn(9, 2, 3, dtype=DTYPE), 0
    if kind == "GRU":
        s = StatefulWrapper(nn.GRU(3, 4, 2, batch_first=True, dtype=DTYPE))
        return s, torch.randn(2, 9, 3, dtype=DTYPE), 1
    if kind == "RNN":
        s = StatefulWrapper(nn.RNN(3, 4, batch_first=True, dtype=DTYPE))
        return s, torch.randn(2, 9, 3, dtype=DTYPE), 1
    raise AssertionError(kind)


KINDS = ["StatefulLSTM", "StatefulConvLSTM", "ConvLSTM2d time-major", "LSTM time-major", "GRU", "RNN"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_chunked_equals_full(kind, seed):
    stream, x, time_dim = make_stateful(kind)
    with torch.no_grad():
        full, full_state = stream.module(x)
        chunked = run_chunks(stream, x, time_dim, partitions(x.shape[time_dim], seed))
    full_state = full_state if isinstance(full_state, tuple) else (full_state,)
    held = stream.state if isinstance(stream.state, tuple) else (stream.state,)
    if isinstance(stream.module, ConvLSTM2d):
        assert torch.equal(chunked, full)
        assert all(torch.equal(a, b) for a, b in zip(held, full_state))
    else:
        assert (chunked - full).abs().max() <= 1e-12
        assert all((a - b).abs().max() <= 1e-12 for a, b in zip(held, full_state))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
def test_bidirectional_projected_lstm_threads_the_state():
    torch.manual_seed(1)
    lstm = nn.LSTM(3, 6, num_layers=2, bidirectional=True, proj_size=2, batch_first=True)
    stream = StatefulWrapper(lstm)
    x1, x2 = torch.randn(4, 5, 3), torch.randn(4, 2, 3)
    y1, y2 = stream(x1), stream(x2)
    h, c = stream.state
    assert h.shape == (4, 4, 2) and c.shape == (4, 4, 6)  # (layers * 2, B, proj_size / hidden)
    ref1, state = lstm(x1)
    ref2, (ref_h, ref_c) = lstm(x2, state)
    assert torch.equal(y1, ref1) and torch.equal(y2, ref2)
    assert torch.equal(h, ref_h) and torch.equal(c, ref_c)
    assert y2.shape == (4, 2, 4)


def test_single_tensor_state_of_gru_and_rnn():
    for module in (nn.GRU(3, 4, 2), nn.RNN(3, 4, bidirectional=True)):
        stream = StatefulWrapper(module)
        assert stream.state is None and stream.get_state() is None
        stream(torch.randn(5, 2, 3))
        directions = 2 if module.bidirectional else 1
        assert isinstance(stream.state, torch.Tensor)
        assert stream.get_state().shape == (module.num_layers * directions, 2, 4)


@pytest.mark.parametrize("kind", ["StatefulLSTM", "StatefulConvLSTM", "GRU"])
@pytest.mark.parametrize("mask_type", [torch.tensor, list, np.array])
def test_reset_mask_touches_only_chosen_rows(kind, mask_type):
    stream, x, time_dim = make_stateful(kind)
    with torch.no_grad():
        first, second = x.narrow(time_dim, 0, 4), x.narrow(time_dim, 4, 5)
        stream(first)
        before = stream.state if isinstance(stream.state, tuple) else (stream.state,)
        stream.reset_states(mask_type([True, False]))
        after = stream.state if isinstance(stream.state, tuple) else (stream.state,)
        for b, a in zip(before, after):
            assert torch.equal(a[:, 1], b[:, 1]) and not a[:, 0].any()
        y = stream(second)
        # Row 0 restarts from zeros: as if run alone from scratch; row 1 continues.
        fresh, _ = stream.module(second.narrow(0, 0, 1))
        continued, _ = stream.module(x.narrow(0, 1, 1))
    assert (y.narrow(0, 0, 1) - fresh).abs().max() <= 1e-12
    assert (y.narrow(0, 1, 1) - continued.narrow(time_dim, 4, 5)).abs().max() <= 1e-12


def test_reset_all_and_batch_change():
    stream = StatefulLSTM(3, 4)
    stream(torch.randn(3, 2, 3))
    with pytest.raises(ValueError, match="input batch 5 differs from the carried state's batch 3; call reset_states"):
        stream(torch.randn(5, 2, 3))
    stream.reset_states()
    assert stream.state is None
    assert stream(torch.randn(5, 2, 3)).shape == (5, 2, 4)
    assert stream.state[0].shape == (1, 5, 4)


def test_convlstm_spatial_change_needs_reset():
    stream = StatefulConvLSTM(2, 3, 3)
    stream(torch.randn(2, 1, 2, 6, 6))
    with pytest.raises(ValueError, match=r"input spatial size \(5, 6\) differs from the carried state's \(6, 6\)"):
        stream(torch.randn(2, 1, 2, 5, 6))


def test_unbatched_input_carries_an_unbatched_state():
    stream = StatefulConvLSTM(2, 3, 3, num_layers=2)
    x = torch.randn(4, 2, 5, 5)  # (T, C, H, W)
    y = stream(x)
    assert y.shape == (4, 3, 5, 5) and stream.state[0].shape == (2, 3, 5, 5)
    full, _ = stream.convlstm(torch.cat([x, x]))
    assert torch.equal(torch.cat([y, stream(x)]), full)
    with pytest.raises(ValueError, match="reset mask needs a batched state, but the carried state is unbatched"):
        stream.reset_states(torch.tensor([True]))
    with pytest.raises(ValueError, match="input batch 1 differs from the carried state, which is unbatched"):
        stream(x[None])
    lstm = StatefulLSTM(3, 4)
    lstm(torch.randn(4, 3))
    assert lstm.state[0].shape == (1, 4)
    gru = StatefulWrapper(nn.GRU(3, 4))
    gru.set_state(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="input is unbatched but the carried state has batch 2"):
        gru(torch.randn(5, 3))


def test_truncated_bptt_training_learns_a_delay():
    """Target: the input one step earlier; the step across a chunk boundary needs the state."""
    torch.manual_seed(2)
    stream = StatefulLSTM(1, 8)
    head = nn.Linear(8, 1)
    opt = torch.optim.Adam([*stream.parameters(), *head.parameters()], lr=0.03)
    losses = []
    for _ in range(12):
        seq = torch.randn(4, 21, 1)
        stream.reset_states()
        for a in range(1, 21, 5):
            y = head(stream(seq[:, a : a + 5]))
            loss = ((y - seq[:, a - 1 : a + 4]) ** 2).mean()
            opt.zero_grad()
            loss.backward()  # a second backward per sequence: works because the state is detached
            opt.step()
            losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8


def test_truncated_bptt_convlstm_backward_twice():
    torch.manual_seed(3)
    stream = StatefulConvLSTM(1, 2, 3)
    opt = torch.optim.SGD(stream.parameters(), lr=0.1)
    for _ in range(2):
        loss = stream(torch.randn(2, 3, 1, 4, 4)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not stream.state[0].requires_grad


@pytest.mark.parametrize("make", [lambda d: StatefulLSTM(2, 3, detach=d), lambda d: StatefulConvLSTM(2, 3, 3, detach=d)])
def test_detach_false_keeps_the_graph(make):
    torch.manual_seed(4)
    spatial = (3, 3) if isinstance(make(True).module, ConvLSTM2d) else ()
    for detach in (False, True):
        stream = make(detach)
        x1 = torch.randn(2, 3, 2, *spatial, requires_grad=True)
        stream(x1)
        stream(torch.randn(2, 3, 2, *spatial)).sum().backward()
        if detach:
            assert x1.grad is None  # truncated: the second chunk does not reach the first
        else:
            assert x1.grad is not None and x1.grad.abs().sum() > 0
    stream.detach_states()
    assert not stream.state[0].requires_grad


def test_detach_false_with_mask_reset_keeps_the_graph_of_kept_rows():
    stream = StatefulLSTM(2, 3, detach=False)
    x1 = torch.randn(2, 3, 2, requires_grad=True)
    stream(x1)
    stream.reset_states(torch.tensor([True, False]))
    stream(torch.randn(2, 3, 2)).sum().backward()
    assert x1.grad[0].abs().sum() == 0 and x1.grad[1].abs().sum() > 0


def test_state_follows_input_dtype_and_device():
    stream = StatefulLSTM(2, 3)
    stream(torch.randn(2, 3, 2))
    stream.double()
    x = torch.randn(2, 3, 2, dtype=DTYPE)
    carried = tuple(t.double() for t in stream.state)
    y = stream(x)
    assert y.dtype == DTYPE and stream.state[0].dtype == DTYPE
    assert torch.equal(y, stream.lstm(x, carried)[0])
    assert stream.state[0].device == x.device


def test_get_and_set_state():
    torch.manual_seed(5)
    stream = StatefulConvLSTM(2, 3, 3, num_layers=2)
    x = torch.randn(2, 4, 2, 5, 5)
    h0 = (torch.randn(2, 2, 3, 5, 5), torch.randn(2, 2, 3, 5, 5))
    stream.set_state(h0)
    assert stream.get_state()[0] is not None and torch.equal(stream.get_state()[0], h0[0])
    assert torch.equal(stream(x), stream.convlstm(x, h0)[0])
    saved = stream.get_state()
    y = stream(x)
    stream.set_state(saved)
    assert torch.equal(stream(x), y)
    stream.state = None  # the attribute setter goes through set_state
    assert stream.get_state() is None


@pytest.mark.parametrize(
    "make, state, error, message",
    [
        (lambda: StatefulLSTM(2, 3), torch.zeros(1, 2, 3), TypeError, "state of LSTM must be None or a pair"),
        (lambda: StatefulWrapper(nn.GRU(2, 3)), (torch.zeros(1, 2, 3),), TypeError, "state of GRU must be None or a tensor h, got tuple"),
        (lambda: StatefulLSTM(2, 3, num_layers=2), (torch.zeros(1, 2, 3),) * 2, ValueError, r"state h has 1 layers, expected 2 \(num_layers \* num_directions\)"),
        (lambda: StatefulLSTM(2, 3), (torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)), ValueError, r"state c has 4 features, expected 3 \(hidden_size\)"),
        (lambda: StatefulLSTM(2, 6, proj_size=2), (torch.zeros(1, 2, 6),) * 2, ValueError, r"state h has 6 features, expected 2 \(proj_size\)"),
        (lambda: StatefulLSTM(2, 3), (torch.zeros(1, 2, 3), torch.zeros(1, 4, 3)), ValueError, "state c has batch 4, expected 2 like state h"),
        (lambda: StatefulLSTM(2, 3), (torch.zeros(1, 2, 3, 1),) * 2, ValueError, r"state h must be 3-D .* got 4-D shape \(1, 2, 3, 1\)"),
        (lambda: StatefulLSTM(2, 3), (torch.zeros(1, 2, 3, dtype=torch.long),) * 2, TypeError, "state h must be a floating-point tensor, got dtype torch.int64"),
        (lambda: StatefulConvLSTM(2, 3, 3), (torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 2, 3, 4, 5)), ValueError, r"state c has spatial size \(4, 5\), expected \(4, 4\)"),
        (lambda: StatefulConvLSTM(2, 3, 3), (torch.zeros(1, 2, 2, 4, 4),) * 2, ValueError, r"state h has 2 channels, expected 3 \(hidden_channels\)"),
    ],
)
def test_set_state_rejects_bad_states(make, state, error, message):
    with pytest.raises(error, match=message):
        make().set_state(state)


def test_bad_masks_and_inputs():
    stream = StatefulLSTM(2, 3)
    stream(torch.randn(3, 4, 2))
    with pytest.raises(ValueError, match=r"reset mask has length 2, expected 3 \(the carried state's batch\)"):
        stream.reset_states(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="reset mask must have dtype torch.bool, got torch.int64"):
        stream.reset_states(torch.tensor([1, 0, 1]))
    with pytest.raises(TypeError, match="reset mask must have dtype torch.bool, got torch.float32"):
        stream.reset_states([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"reset mask must be 1-D \(batch,\), got shape \(1, 3\)"):
        stream.reset_states(torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got dtype torch.int64"):
        stream(torch.ones(3, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input to LSTM must be 3-D \(batched\) or 2-D \(unbatched\), got 4-D"):
        stream(torch.randn(3, 4, 2, 1))
    with pytest.raises(ValueError, match=r"input has 5 features, expected 2 \(input_size\)"):
        stream(torch.randn(3, 4, 5))
    with pytest.raises(TypeError, match="input has dtype torch.float64, expected torch.float32"):
        stream(torch.randn(3, 4, 2, dtype=DTYPE))
    with pytest.raises(TypeError, match="StatefulWrapper supports nn.LSTM, nn.GRU, nn.RNN and ConvLSTM2d, got Linear"):
        StatefulWrapper(nn.Linear(2, 3))
    with pytest.raises(TypeError, match="detach must be a bool, got str"):
        StatefulWrapper(nn.GRU(2, 3), detach="no")


def test_state_is_not_in_state_dict_and_repr_shows_it():
    stream = StatefulLSTM(2, 3)
    keys = set(stream.state_dict())
    assert "state=None" in repr(stream)
    stream(torch.randn(4, 5, 2))
    assert set(stream.state_dict()) == keys == {f"module.{k}" for k in stream.lstm.state_dict()}
    assert "state=h (1, 4, 3), c (1, 4, 3)" in repr(stream)
    assert stream.lstm is stream.module and isinstance(stream.lstm, nn.LSTM)
    conv = StatefulConvLSTM(2, 3, 3)
    assert conv.convlstm is conv.module and isinstance(conv.convlstm, ConvLSTM2d)
