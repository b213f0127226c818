"""`pytest parity`: torch and JAX agree on outputs, final states and gradients, full and chunked.

The grid covers torch.nn.LSTM's options (layers, bidirectional, proj_size, bias, batch_first,
unbatched, packed lengths) and the same for nn.GRU and nn.RNN (tanh and relu; no proj_size),
the ConvLSTM's (layers, odd/even kernels, dilation, bias), every cell, inter-layer dropout with
given keep masks, float32 and float64, and random initial states; gradients are matched by
torch parameter name; wrong ports must be reported not ok.
"""

from __future__ import annotations

import pytest
import torch

import torch_impl
from parity import compare

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
CHUNKS = [4, 1, 4]  # T = 9: two chunk lengths, one of them 1


# The dense recurrent modules: torch class and fixed constructor options, by kind.
KINDS = {
    "lstm": (torch.nn.LSTM, {}),
    "gru": (torch.nn.GRU, {}),
    "rnn-tanh": (torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn-relu": (torch.nn.RNN, {"nonlinearity": "relu"}),
}
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "rnn-tanh": ("h",), "rnn-relu": ("h",)}


def _module(kind="lstm", batch_first=True, **kwargs):
    torch.manual_seed(0)
    cls, fixed = KINDS[kind]
    return cls(5, 7, batch_first=batch_first, **fixed, **kwargs)


CASES = {
    "l1": dict(),
    "l2-time-major": dict(num_layers=2, batch_first=False),
    "l3-bidirectional": dict(num_layers=3, bidirectional=True),
    "l2-bidirectional-proj": dict(num_layers=2, bidirectional=True, proj_size=3),
    "l1-proj-nobias": dict(proj_size=4, bias=False),
    "l1-nobias": dict(bias=False),
    "l2-dropout-eval": dict(num_layers=2, dropout=0.5),
}
# (kind, case): every LSTM case; the GRU's and the RNN's options split so that each is run
# once (torch has no proj_size for them; each configuration compiles its own programs, three
# bidirectional layers the most). The GRU's bidirectional and dropout runs are in
# test_unbatched, test_packed_lengths and test_dropout_masks below.
GRID = (
    [("lstm", c) for c in CASES if c != "l1-nobias"]
    + [("gru", c) for c in ("l1", "l2-time-major", "l1-nobias")]
    + [("rnn-tanh", c) for c in ("l1", "l3-bidirectional")]
    + [("rnn-relu", c) for c in ("l2-time-major", "l1-nobias")]
)


def _assert_grads_by_torch_name(report, module, kind):
    """Every torch parameter, the input and each initial state have a gradient check."""
    names = {c.tensor for c in report.checks}
    expected = {f"grad/{n}" for n, _ in module.named_parameters()}
    expected |= {"grad/input"} | {f"grad/{s}_0" for s in STATE_NAMES[kind]}
    assert expected <= names, sorted(expected - names)
    assert not any(t.startswith("grad/c_") or t == "c_n" for t in names) or kind == "lstm"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, case", GRID, ids=[f"{k}-{c}" for k, c in GRID])
def test_full_and_chunked(kind, case, dtype):
    module = _module(kind, **CASES[case]).eval()
    x = torch.randn((3, 9, 5) if module.batch_first else (9, 3, 5))
    report = compare(module, x, dtype=dtype, chunks=CHUNKS, initial_state="random", grads=True)
    report.assert_ok()
    assert {c.run for c in report.checks} == {"full", "chunks 4+1+4"}
    states = {f"{s}_n" for s in STATE_NAMES[kind]}
    for run in ("full", "chunks 4+1+4"):
        assert {c.tensor for c in report.checks if c.run == run} >= {"output"} | states
    _assert_grads_by_torch_name(report, module, kind)


UNBATCHED = {"lstm": dict(proj_size=2), "gru": {}, "rnn-relu": {}}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(UNBATCHED))
def test_unbatched(kind, dtype):
    module = _module(kind, num_layers=2, bidirectional=True, **UNBATCHED[kind])
    report = compare(module, torch.randn(9, 5), dtype=dtype, chunks=CHUNKS, initial_state="random")
    report.assert_ok()


PACKED = [("lstm", False), ("lstm", True), ("gru", False), ("gru", True), ("rnn-tanh", True),
          ("rnn-relu", False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, bidirectional", PACKED,
                         ids=[f"{k}-{'bi' if b else 'uni'}" for k, b in PACKED])
def test_packed_lengths(kind, bidirectional, dtype):
    """torch runs a packed sequence; lengths 1 and T included, rows unsorted."""
    extra = dict(proj_size=3) if kind == "lstm" else {}
    module = _module(kind, num_layers=2, bidirectional=bidirectional, **extra)
    report = compare(
        module, torch.randn(4, 9, 5), dtype=dtype, seq_lengths=[9, 4, 1, 6],
        initial_state="random", grads=True,
    )
    report.assert_ok()
    _assert_grads_by_torch_name(report, module, kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gru", "rnn-relu"])
def test_dropout_masks(kind, dtype):
    """Training-mode inter-layer dropout with the same random keep masks on both sides (torch
    layer by layer), full and chunked, gradients by torch name; float32 and float64 (the LSTM
    and the float64 bound relative to the largest gradient: test_dropout_grads.py)."""
    module = _module(kind, num_layers=2, bidirectional=kind == "gru", dropout=0.4)
    x = torch.randn(3, 8, 5)
    report = compare(module, x, dtype=dtype, chunks=[5, 3], initial_state="random", grads=True,
                     dropout_masks="random", seed=3)
    report.assert_ok()
    _assert_grads_by_torch_name(report, module, kind)


CONV_CASES = {
    "l1-k3": dict(kernel_size=3),
    "l2-k2-even": dict(kernel_size=2, num_layers=2),
    "l1-k3x2-dilation2-nobias": dict(kernel_size=(3, 2), dilation=2, bias=False),
    "l2-k3-time-major": dict(kernel_size=3, num_layers=2, batch_first=False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_convlstm_full_and_chunked(case, dtype):
    torch.manual_seed(0)
    kwargs = dict(CONV_CASES[case])
    kwargs.setdefault("batch_first", True)
    module = torch_impl.ConvLSTM2d(2, 3, **kwargs)
    shape = (2, 9, 2, 6, 5) if module.batch_first else (9, 2, 2, 6, 5)
    report = compare(module, torch.randn(shape), dtype=dtype, chunks=CHUNKS, initial_state="random", grads=True)
    report.assert_ok()


@pytest.mark.parametrize("dtype", DTYPES)
def test_convlstm_unbatched(dtype):
    torch.manual_seed(0)
    module = torch_impl.ConvLSTM2d(2, 3, 3, num_layers=2)
    compare(module, torch.randn(9, 2, 5, 5), dtype=dtype, chunks=CHUNKS).assert_ok()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: torch.nn.LSTMCell(5, 7), (6, 3, 5)),
        (lambda: torch.nn.GRUCell(5, 7), (6, 3, 5)),
        (lambda: torch.nn.RNNCell(5, 7), (6, 3, 5)),
        (lambda: torch.nn.RNNCell(5, 7, nonlinearity="relu"), (6, 3, 5)),
        (lambda: torch_impl.ConvLSTMCell(2, 3, (2, 3)), (6, 2, 2, 5, 5)),
    ],
    ids=["lstm-cell", "gru-cell", "rnn-cell-tanh", "rnn-cell-relu",
         "convlstm-cell"],
)
def test_cells(make, shape, dtype):
    torch.manual_seed(0)
    module = make()
    report = compare(module, torch.randn(shape), dtype=dtype, chunks=[2, 1, 3], initial_state="random", grads=True)
    report.assert_ok()
    names = {c.tensor for c in report.checks}
    assert {f"grad/{n}" for n, _ in module.named_parameters()} <= names


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_long_sequence_float32_within_bound(kind):
    """float32 holds 1e-5 over 1,000 steps (docs/design.md)."""
    module = _module(kind, num_layers=2)
    report = compare(module, torch.randn(2, 1000, 5), chunks=[500, 500])
    report.assert_ok()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_report_is_readable_and_serialisable(kind):
    report = compare(_module(kind), torch.randn(2, 9, 5), chunks=CHUNKS)
    text = str(report)
    assert "output" in text and "h_n" in text and "chunks 4+1+4" in text
    assert ("c_n" in text) == (kind == "lstm")  # a GRU has no cell state to report
    data = report.to_dict()
    assert data["ok"] is True and len(data["checks"]) == 2 * (1 + len(STATE_NAMES[kind]))
    assert all(set(c) >= {"run", "tensor", "max_abs", "max_rel", "where", "bound", "ok"} for c in data["checks"])
