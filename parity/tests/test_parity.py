"""`pytest parity`: torch and JAX agree on outputs, final states and gradients, full and chunked.

The grid covers torch.nn.LSTM's options (layers, bidirectional, proj_size, bias, batch_first,
unbatched, packed lengths), the ConvLSTM's (layers, odd/even kernels, dilation, bias), both cells,
float32 and float64, and random initial states; wrong ports must be reported not ok.
"""

from __future__ import annotations

import pytest
import torch

import torch_impl
from parity import compare

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
CHUNKS = [4, 1, 4]  # T = 9: two chunk lengths, one of them 1


def _lstm(batch_first=True, **kwargs):
    torch.manual_seed(0)
    return torch.nn.LSTM(5, 7, batch_first=batch_first, **kwargs)


LSTM_CASES = {
    "l1": dict(),
    "l2-time-major": dict(num_layers=2, batch_first=False),
    "l3-bidirectional": dict(num_layers=3, bidirectional=True),
    "l2-bidirectional-proj": dict(num_layers=2, bidirectional=True, proj_size=3),
    "l1-proj-nobias": dict(proj_size=4, bias=False),
    "l2-dropout-eval": dict(num_layers=2, dropout=0.5),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(LSTM_CASES))
def test_lstm_full_and_chunked(case, dtype):
    module = _lstm(**LSTM_CASES[case]).eval()
    x = torch.randn((3, 9, 5) if module.batch_first else (9, 3, 5))
    report = compare(module, x, dtype=dtype, chunks=CHUNKS, initial_state="random", grads=True)
    report.assert_ok()
    assert {c.run for c in report.checks} == {"full", "chunks 4+1+4"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_unbatched(dtype):
    module = _lstm(num_layers=2, bidirectional=True, proj_size=2)
    report = compare(module, torch.randn(9, 5), dtype=dtype, chunks=CHUNKS, initial_state="random")
    report.assert_ok()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lstm_packed_lengths(bidirectional, dtype):
    module = _lstm(num_layers=2, bidirectional=bidirectional, proj_size=3)
    report = compare(
        module, torch.randn(4, 9, 5), dtype=dtype, seq_lengths=[9, 4, 1, 6],
        initial_state="random", grads=True,
    )
    report.assert_ok()


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
        (lambda: torch_impl.ConvLSTMCell(2, 3, (2, 3)), (6, 2, 2, 5, 5)),
    ],
    ids=["lstm-cell", "convlstm-cell"],
)
def test_cells(make, shape, dtype):
    torch.manual_seed(0)
    report = compare(make(), torch.randn(shape), dtype=dtype, chunks=[2, 1, 3], initial_state="random", grads=True)
    report.assert_ok()


def test_long_sequence_float32_within_bound():
    """float32 holds 1e-5 over 1,000 steps (DESIGN.md)."""
    module = _lstm(num_layers=2)
    report = compare(module, torch.randn(2, 1000, 5), chunks=[500, 500])
    report.assert_ok()


def test_report_is_readable_and_serialisable():
    report = compare(_lstm(), torch.randn(2, 9, 5), chunks=CHUNKS)
    text = str(report)
    assert "output" in text and "h_n" in text and "c_n" in text and "chunks 4+1+4" in text
    data = report.to_dict()
    assert data["ok"] is True and len(data["checks"]) == 6
    assert all(set(c) >= {"run", "tensor", "max_abs", "max_rel", "where", "bound", "ok"} for c in data["checks"])
