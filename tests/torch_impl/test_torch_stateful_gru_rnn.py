"""StatefulGRU and StatefulRNN (tanh and relu): carrying, resetting, detaching and checking h.

Each test runs for the three kinds. nn.GRU/RNN project a whole chunk at once on CPU, so a
chunked run is compared with one full run in float64 within 1e-12; where the stream and the
reference run the very same shapes (the state threaded by hand, the same weights), equality
is bitwise.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from torch_impl import StatefulGRU, StatefulRNN, StatefulWrapper

DTYPE = torch.float64
BOUND = 1e-12
KINDS = ["GRU", "RNN-tanh", "RNN-relu"]


def make(kind, input_size=3, hidden_size=4, seed=0, **kwargs):
    """A float64 stateful module of ``kind`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    kwargs.setdefault("dtype", DTYPE)
    if kind == "GRU":
        return StatefulGRU(input_size, hidden_size, **kwargs)
    return StatefulRNN(input_size, hidden_size, nonlinearity=kind.split("-")[1], **kwargs)


def twin(stream):
    """A second stream of the same kind and weights, with nothing carried."""
    copy = make(kind_of(stream), stream.module.input_size, stream.module.hidden_size,
                num_layers=stream.module.num_layers, batch_first=stream.module.batch_first,
                bidirectional=stream.module.bidirectional, detach=stream.detach)  # fmt: skip
    copy.module.load_state_dict(stream.module.state_dict())
    return copy


def kind_of(stream):
    return "GRU" if isinstance(stream, StatefulGRU) else f"RNN-{stream.rnn.nonlinearity}"


def partitions(T, seed):
    """Random chunk boundaries of range(T); length-1 chunks come up often."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, T), rng.randint(1, T - 1)))
    return list(zip([0, *cuts], [*cuts, T]))


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_chunked_equals_full(kind, batch_first, seed):
    stream = make(kind, num_layers=2, batch_first=batch_first, seed=seed)
    time_dim = 1 if batch_first else 0
    x = torch.randn(3, 11, 3, dtype=DTYPE)
    x = x if batch_first else x.transpose(0, 1)
    bounds = partitions(11, seed)
    with torch.no_grad():
        full, full_h = stream.module(x)
        chunks = [stream(x.narrow(time_dim, a, b - a)) for a, b in bounds]
        chunked = torch.cat(chunks, time_dim)
        # The same chunks threaded by hand run the same shapes: bitwise equal.
        h, by_hand = None, []
        for a, b in bounds:
            y, h = stream.module(x.narrow(time_dim, a, b - a), h)
            by_hand.append(y)
    assert max_diff(chunked, full) <= BOUND and max_diff(stream.state, full_h) <= BOUND
    assert all(torch.equal(c, r) for c, r in zip(chunks, by_hand)) and torch.equal(stream.state, h)
    assert isinstance(stream.state, torch.Tensor) and stream.state.shape == (2, 3, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_bidirectional_multilayer_threads_the_state(kind):
    # Chunking changes a bidirectional result (the backward pass restarts at each chunk's
    # end), so the reference threads h by hand rather than running the whole sequence.
    stream = make(kind, num_layers=2, bidirectional=True)
    x1, x2 = torch.randn(4, 5, 3, dtype=DTYPE), torch.randn(4, 2, 3, dtype=DTYPE)
    y1, y2 = stream(x1), stream(x2)
    ref1, h = stream.module(x1)
    ref2, ref_h = stream.module(x2, h)
    assert torch.equal(y1, ref1) and torch.equal(y2, ref2) and torch.equal(stream.state, ref_h)
    assert stream.state.shape == (4, 4, 4)  # (num_layers * 2, B, hidden)
    assert y2.shape == (4, 2, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_reset_all_starts_fresh_and_allows_a_new_batch(kind):
    stream = make(kind, num_layers=2)
    stream(torch.randn(3, 4, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="input batch 5 differs from the carried state's batch 3; call reset_states"):
        stream(torch.randn(5, 4, 3, dtype=DTYPE))
    stream.reset_states()
    assert stream.state is None and stream.get_state() is None
    x = torch.randn(5, 4, 3, dtype=DTYPE)
    assert torch.equal(stream(x), twin(stream)(x))
    assert stream.state.shape == (2, 5, 4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_type", [torch.tensor, list, np.array])
def test_reset_mask_restarts_only_chosen_rows(kind, mask_type):
    stream = make(kind, num_layers=2)
    x = torch.randn(3, 9, 3, dtype=DTYPE)
    first, second = x[:, :4], x[:, 4:]
    with torch.no_grad():
        stream(first)
        before = stream.state
        stream.reset_states(mask_type([True, False, True]))
        after = stream.state
        assert not after[:, [0, 2]].any() and torch.equal(after[:, 1], before[:, 1])
        y = stream(second)
        fresh = twin(stream)(second)
        continued, _ = stream.module(x)
    assert max_diff(y[[0, 2]], fresh[[0, 2]]) <= BOUND  # reset rows: as a stream that never ran
    assert max_diff(y[1], continued[1, 4:]) <= BOUND  # the kept row continues its sequence


@pytest.mark.parametrize("kind", KINDS)
def test_reset_mask_without_state_and_on_unbatched_state(kind):
    stream = make(kind)
    stream.reset_states(torch.tensor([True, False]))  # nothing carried: nothing to do
    assert stream.state is None
    stream(torch.randn(4, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="reset mask needs a batched state, but the carried state is unbatched"):
        stream.reset_states(torch.tensor([True]))


@pytest.mark.parametrize("kind", KINDS)
def test_detach_cuts_the_graph_between_calls_not_inside_a_chunk(kind):
    stream = make(kind)
    x1 = torch.randn(2, 3, 3, dtype=DTYPE, requires_grad=True)
    x2 = torch.randn(2, 3, 3, dtype=DTYPE, requires_grad=True)
    stream(x1).sum().backward()
    carried = stream.state
    assert not carried.requires_grad and carried.grad_fn is None
    first_grad = x1.grad.clone()
    stream(x2).sum().backward()  # a second backward works: the first chunk's graph is not reached
    assert x2.grad.abs().sum() > 0
    assert torch.equal(x1.grad, first_grad)  # nothing flowed back into the earlier chunk
    # Inside a chunk the gradient is that of the module run from the carried h as a constant.
    x3 = x2.detach().clone().requires_grad_()
    ref = x2.detach().clone().requires_grad_()
    held = stream.state
    stream(x3).square().sum().backward()
    stream.module(ref, held)[0].square().sum().backward()
    assert torch.equal(x3.grad, ref.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_detach_false_keeps_the_graph_until_detach_states(kind):
    stream = make(kind, detach=False)
    x1 = torch.randn(2, 3, 3, dtype=DTYPE, requires_grad=True)
    stream(x1)
    assert stream.state.requires_grad
    stream(torch.randn(2, 3, 3, dtype=DTYPE)).sum().backward()
    assert x1.grad is not None and x1.grad.abs().sum() > 0  # full BPTT across the boundary
    stream.detach_states()
    assert not stream.state.requires_grad
    x1.grad = None
    stream(torch.randn(2, 3, 3, dtype=DTYPE)).sum().backward()
    assert x1.grad is None
    stream.reset_states()
    stream.detach_states()  # nothing carried: a no-op
    assert stream.state is None


@pytest.mark.parametrize("kind", KINDS)
def test_detach_false_mask_reset_keeps_the_graph_of_kept_rows(kind):
    stream = make(kind, detach=False)
    x1 = torch.randn(2, 3, 3, dtype=DTYPE, requires_grad=True)
    stream(x1)
    stream.reset_states(torch.tensor([True, False]))
    stream(torch.randn(2, 3, 3, dtype=DTYPE)).sum().backward()
    assert x1.grad[0].abs().sum() == 0 and x1.grad[1].abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_get_and_set_state_round_trip(kind):
    stream = make(kind, num_layers=2)
    x = torch.randn(2, 4, 3, dtype=DTYPE)
    h0 = torch.randn(2, 2, 4, dtype=DTYPE, requires_grad=True)
    stream.set_state(h0)
    assert torch.equal(stream.get_state(), h0) and not stream.get_state().requires_grad
    assert torch.equal(stream(x), stream.module(x, h0)[0])
    saved = stream.get_state()
    assert isinstance(saved, torch.Tensor) and saved is stream.state
    y = stream(x)
    stream.set_state(saved)  # later calls did not change the saved tensor
    assert torch.equal(stream(x), y)
    stream.state = saved  # the attribute setter goes through set_state
    assert torch.equal(stream.state, saved)
    stream.state = None
    assert stream.get_state() is None


@pytest.mark.parametrize("kind", KINDS)
def test_state_follows_the_input_dtype(kind):
    stream = make(kind, dtype=torch.float32)
    stream(torch.randn(2, 3, 3))
    assert stream.state.dtype == torch.float32
    stream.double()
    carried = stream.state.double()
    x = torch.randn(2, 3, 3, dtype=DTYPE)
    y = stream(x)
    assert y.dtype == DTYPE and stream.state.dtype == DTYPE
    assert torch.equal(y, stream.module(x, carried)[0])
    fresh = make(kind)  # float64 from the start: the zeros it starts from are float64 too
    fresh(x)
    assert fresh.state.dtype == DTYPE and fresh.state.device == x.device


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_carries_an_unbatched_state(kind):
    stream = make(kind, num_layers=2, bidirectional=True)
    x = torch.randn(7, 3, dtype=DTYPE)  # (T, F)
    y1, y2 = stream(x[:4]), stream(x[4:])
    assert y1.shape == (4, 8) and stream.state.shape == (4, 4)
    ref1, h = stream.module(x[:4])
    ref2, ref_h = stream.module(x[4:], h)
    assert torch.equal(y1, ref1) and torch.equal(y2, ref2) and torch.equal(stream.state, ref_h)
    with pytest.raises(ValueError, match="input batch 1 differs from the carried state, which is unbatched"):
        stream(x[None])
    stream.set_state(torch.zeros(4, 2, 4, dtype=DTYPE))
    with pytest.raises(ValueError, match="input is unbatched but the carried state has batch 2"):
        stream(x)
    unidirectional = make(kind)
    with torch.no_grad():
        chunked = torch.cat([unidirectional(x[a:b]) for a, b in partitions(7, 1)])
        full, _ = unidirectional.module(x)
    assert max_diff(chunked, full) <= BOUND


def bad_state_cases():
    cases = []
    for kind in KINDS:
        name = kind.split("-")[0]
        cases += [
            (kind, {}, (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)), TypeError,
             rf"state of {name} must be None or a tensor h, got tuple"),
            (kind, {}, [torch.zeros(1, 2, 4)] * 2, TypeError, rf"state of {name} must be None or a tensor h, got list"),
            (kind, {}, torch.zeros(1, 2, 5), ValueError, r"state h has 5 features, expected 4 \(hidden_size\)"),
            (kind, {}, torch.zeros(1, 5), ValueError, r"state h has 5 features, expected 4 \(hidden_size\)"),
            (kind, {"num_layers": 2, "bidirectional": True}, torch.zeros(2, 2, 4), ValueError,
             r"state h has 2 layers, expected 4 \(num_layers \* num_directions\)"),
            (kind, {}, torch.zeros(1, 2, 4, 1), ValueError,
             r"state h must be 3-D \(layers, batch, features\) or 2-D unbatched, got 4-D shape \(1, 2, 4, 1\)"),
            (kind, {}, torch.zeros(1, 2, 4, dtype=torch.long), TypeError,
             "state h must be a floating-point tensor, got dtype torch.int64"),
        ]  # fmt: skip
    return cases


@pytest.mark.parametrize("kind, kwargs, state, error, message", bad_state_cases())
def test_set_state_rejects_bad_states(kind, kwargs, state, error, message):
    stream = make(kind, **kwargs)
    with pytest.raises(error, match=message):
        stream.set_state(state)
    assert stream.state is None  # a rejected state leaves nothing behind


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_and_masks(kind):
    stream = make(kind)
    stream(torch.randn(3, 4, 3, dtype=DTYPE))
    name = kind.split("-")[0]
    with pytest.raises(ValueError, match=r"input has 5 features, expected 3 \(input_size\)"):
        stream(torch.randn(3, 4, 5, dtype=DTYPE))
    with pytest.raises(TypeError, match="input has dtype torch.float32, expected torch.float64"):
        stream(torch.randn(3, 4, 3))
    with pytest.raises(ValueError, match=rf"input to {name} must be 3-D \(batched\) or 2-D \(unbatched\), got 4-D"):
        stream(torch.randn(3, 4, 3, 1, dtype=DTYPE))
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got dtype torch.int64"):
        stream(torch.ones(3, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"reset mask has length 2, expected 3 \(the carried state's batch\)"):
        stream.reset_states(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="reset mask must have dtype torch.bool, got torch.int64"):
        stream.reset_states(torch.tensor([1, 0, 1]))
    with pytest.raises(TypeError, match="detach must be a bool, got str"):
        make(kind, detach="no")


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "Tanh", None])
def test_rnn_rejects_other_nonlinearities(nonlinearity):
    with pytest.raises(ValueError, match=rf"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}"):
        StatefulRNN(3, 4, nonlinearity=nonlinearity)


def test_gru_has_no_nonlinearity():
    with pytest.raises(TypeError, match="nonlinearity"):
        StatefulGRU(3, 4, nonlinearity="relu")


def test_modules_arguments_and_repr():
    gru = StatefulGRU(3, 4, 2, batch_first=False, bias=False, dropout=0.0, bidirectional=True)
    assert gru.gru is gru.module and isinstance(gru.gru, nn.GRU)
    assert (gru.gru.num_layers, gru.gru.batch_first, gru.gru.bias, gru.gru.bidirectional) == (2, False, False, True)
    rnn = StatefulRNN(3, 4, 2, "relu", batch_first=False)  # nonlinearity 4th, as nn.RNN
    assert rnn.rnn is rnn.module and isinstance(rnn.rnn, nn.RNN)
    assert (rnn.rnn.num_layers, rnn.rnn.nonlinearity, rnn.rnn.batch_first) == (2, "relu", False)
    assert StatefulRNN(3, 4).rnn.nonlinearity == "tanh" and StatefulGRU(3, 4).gru.batch_first
    keys = set(gru.state_dict())
    assert "state=None" in repr(gru)
    gru(torch.randn(5, 2, 3))
    assert set(gru.state_dict()) == keys == {f"module.{k}" for k in gru.gru.state_dict()}
    assert "state=h (4, 2, 4)" in repr(gru)


@pytest.mark.parametrize("kind", KINDS)
def test_same_as_stateful_wrapper_around_the_module(kind):
    ours = make(kind, num_layers=2)
    module = nn.GRU if kind == "GRU" else nn.RNN
    extra = {} if kind == "GRU" else {"nonlinearity": ours.rnn.nonlinearity}
    wrapped = StatefulWrapper(module(3, 4, 2, batch_first=True, dtype=DTYPE, **extra))
    wrapped.module.load_state_dict(ours.module.state_dict())
    for T in (4, 1, 3):
        x = torch.randn(2, T, 3, dtype=DTYPE)
        assert torch.equal(ours(x), wrapped(x))
    assert torch.equal(ours.state, wrapped.state)


# --- the seeds' usage pattern (tests/torch_impl/test_torch_seeds.py) with GRU and RNN ----------


class SeedStatefulRecurrent(nn.Module):
    """Seed 004's hand-written StatefulLSTM with one state tensor, detached as TBPTT does."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.h_t = None

    def forward(self, x):
        if self.h_t is None:
            self.h_t = torch.zeros(self.module.num_layers, x.size(0), self.module.hidden_size, dtype=x.dtype)
        output, h_t = self.module(x, self.h_t)
        self.h_t = h_t.detach()
        return output


@pytest.mark.parametrize("kind", KINDS)
def test_seed_pattern_carry_reset_rows_and_train(kind):
    ours = make(kind, input_size=5, hidden_size=6, num_layers=2)
    seed = SeedStatefulRecurrent(twin(ours).module)
    head, seed_head = nn.Linear(6, 1, dtype=DTYPE), nn.Linear(6, 1, dtype=DTYPE)
    seed_head.load_state_dict(head.state_dict())
    opt = torch.optim.SGD([*ours.parameters(), *head.parameters()], lr=0.05)
    seed_opt = torch.optim.SGD([*seed.parameters(), *seed_head.parameters()], lr=0.05)
    for step in range(4):
        x, target = torch.randn(3, 4, 5, dtype=DTYPE), torch.randn(3, 4, 1, dtype=DTYPE)
        if step == 2:  # row 1's sequence ends: it starts the next chunk from zeros
            ours.reset_states(torch.tensor([False, True, False]))
            seed.h_t = seed.h_t.clone()
            seed.h_t[:, 1] = 0
        for model, out, optimizer in ((ours, head, opt), (seed, seed_head, seed_opt)):
            loss = (out(model(x)) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()  # once per chunk: the carried state holds no graph
            optimizer.step()
        assert torch.equal(ours.state, seed.h_t)
    assert all(torch.equal(a, b) for a, b in zip(ours.module.parameters(), seed.module.parameters()))
    assert ours.state.shape == (2, 3, 6)
