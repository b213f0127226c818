"""ConvLSTM2d, ConvLSTMCell, convlstm_step and from_concat_conv against independent references.

The references here are written from the equations, not from torch_impl: plain loops over
layers, steps and gates, one F.conv2d per gate with explicit F.pad padding, in float64.
"""

from __future__ import annotations

import doctest
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

import torch_impl
from torch_impl import ConvLSTM2d, ConvLSTMCell, convlstm_step, from_concat_conv
from torch_impl import convlstm as convlstm_module
from torch_impl import stateful as stateful_module

DTYPE = torch.float64


def same_pad(kernel_size, dilation):
    """torch's padding='same': per dim total d*(k-1), total//2 before, the rest after."""
    pads = []
    for k, d in reversed(list(zip(kernel_size, dilation))):  # F.pad wants the last dim first
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def reference_step(x, h, c, w_ih, w_hh, b_ih, b_hh, kernel_size, dilation):
    """One step, gate by gate (i, f, g, o), one conv per gate and operand."""
    hidden = h.shape[1]
    pad = same_pad(kernel_size, dilation)
    pre = []
    for gate in range(4):
        rows = slice(gate * hidden, (gate + 1) * hidden)
        a = F.conv2d(F.pad(x, pad), w_ih[rows], None if b_ih is None else b_ih[rows], dilation=dilation)
        b = F.conv2d(F.pad(h, pad), w_hh[rows], None if b_hh is None else b_hh[rows], dilation=dilation)
        pre.append(a + b)
    i, f, g, o = pre
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def reference_convlstm(module, x, hx=None):
    """The whole stack, time-major batched x (T, B, C, H, W); returns (output, (h_n, c_n))."""
    T, B, _, H, W = x.shape
    L, hid = module.num_layers, module.hidden_channels
    if hx is None:
        hx = (x.new_zeros(L, B, hid, H, W), x.new_zeros(L, B, hid, H, W))
    layer_input, h_n, c_n = x, [], []
    for k in range(L):
        w_ih, w_hh = getattr(module, f"weight_ih_l{k}"), getattr(module, f"weight_hh_l{k}")
        b_ih = getattr(module, f"bias_ih_l{k}", None)
        b_hh = getattr(module, f"bias_hh_l{k}", None)
        h, c = hx[0][k], hx[1][k]
        outputs = []
        for t in range(T):
            h, c = reference_step(layer_input[t], h, c, w_ih, w_hh, b_ih, b_hh, module.kernel_size, module.dilation)
            outputs.append(h)
        layer_input = torch.stack(outputs)
        h_n.append(h)
        c_n.append(c)
    return layer_input, (torch.stack(h_n), torch.stack(c_n))


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kernel_size, dilation", [(3, 1), ((2, 4), 1), (3, (2, 1)), ((1, 2), 2)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(num_layers, kernel_size, dilation, bias):
    torch.manual_seed(0)
    m = ConvLSTM2d(2, 3, kernel_size, num_layers=num_layers, bias=bias, dilation=dilation, dtype=DTYPE)
    x = torch.randn(4, 2, 2, 7, 6, dtype=DTYPE)
    out, (h_n, c_n) = m(x)
    ref_out, (ref_h, ref_c) = reference_convlstm(m, x)
    assert out.shape == (4, 2, 3, 7, 6) and h_n.shape == c_n.shape == (num_layers, 2, 3, 7, 6)
    assert max(max_err(out, ref_out), max_err(h_n, ref_h), max_err(c_n, ref_c)) <= 1e-12


@pytest.mark.parametrize("num_layers", [1, 2])
def test_batch_first_given_hx_and_unbatched_match_reference(num_layers):
    torch.manual_seed(1)
    m = ConvLSTM2d(2, 3, (2, 3), num_layers=num_layers, batch_first=True, dtype=DTYPE)
    x = torch.randn(2, 5, 2, 6, 5, dtype=DTYPE)  # (B, T, C, H, W)
    hx = (torch.randn(num_layers, 2, 3, 6, 5, dtype=DTYPE), torch.randn(num_layers, 2, 3, 6, 5, dtype=DTYPE))
    out, (h_n, c_n) = m(x, hx)
    ref_out, (ref_h, ref_c) = reference_convlstm(m, x.transpose(0, 1), hx)
    assert out.shape == (2, 5, 3, 6, 5)
    assert max(max_err(out, ref_out.transpose(0, 1)), max_err(h_n, ref_h), max_err(c_n, ref_c)) <= 1e-12

    # Unbatched (T, C, H, W) with unbatched hx (L, hidden, H, W), as nn.LSTM does.
    u_out, (u_h, u_c) = m(x[0], (hx[0][:, 0], hx[1][:, 0]))
    assert u_out.shape == (5, 3, 6, 5) and u_h.shape == u_c.shape == (num_layers, 3, 6, 5)
    assert max(max_err(u_out, ref_out[:, 0]), max_err(u_h, ref_h[:, 0]), max_err(u_c, ref_c[:, 0])) <= 1e-12


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, (2, 5)])
@pytest.mark.parametrize("dilation", [1, 2, (3, 1)])
def test_even_and_odd_kernels_keep_the_spatial_size(kernel_size, dilation):
    m = ConvLSTM2d(1, 2, kernel_size, dilation=dilation)
    out, (h_n, _) = m(torch.randn(2, 1, 1, 9, 8))
    assert out.shape == (2, 1, 2, 9, 8) and h_n.shape == (1, 1, 2, 9, 8)


def test_same_padding_follows_torch_same_rule():
    torch.manual_seed(2)
    for kernel_size, dilation in [((4, 3), (1, 2)), ((2, 2), (3, 3)), ((5, 1), (1, 1))]:
        x, w = torch.randn(1, 2, 9, 8, dtype=DTYPE), torch.randn(3, 2, *kernel_size, dtype=DTYPE)
        pad = convlstm_module.same_padding(kernel_size, dilation)
        assert list(pad) == same_pad(kernel_size, dilation)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # unlike padding='same', no warning for even kernels
            ours = convlstm_module._conv(x, w, None, pad, dilation)
            warnings.simplefilter("ignore")
            theirs = F.conv2d(x, w, padding="same", dilation=dilation)
        assert max_err(ours, theirs) <= 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_chunked_equals_full_bitwise(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    m = ConvLSTM2d(2, 3, rng.choice([2, 3]), num_layers=rng.choice([1, 2]), batch_first=bool(seed % 2))
    T = 9
    x = torch.randn(2, T, 2, 6, 5) if m.batch_first else torch.randn(T, 2, 2, 6, 5)
    out, (h_n, c_n) = m(x)
    cuts = sorted(rng.sample(range(1, T), rng.randint(1, T - 1)))  # includes length-1 chunks often
    bounds = [0, *cuts, T]
    time_dim = 1 if m.batch_first else 0
    outs, hx = [], None
    for a, b in zip(bounds, bounds[1:]):
        y, hx = m(x.narrow(time_dim, a, b - a), hx)
        outs.append(y)
    # bitwise: ConvLSTM2d convolves step by step, (B, C, H, W) in both runs, never B*T frames
    assert torch.equal(torch.cat(outs, time_dim), out)
    assert torch.equal(hx[0], h_n) and torch.equal(hx[1], c_n)


def test_single_steps_equal_full_run():
    torch.manual_seed(3)
    m = ConvLSTM2d(2, 3, 3, num_layers=2)
    x = torch.randn(5, 2, 2, 6, 6)
    out, (h_n, c_n) = m(x)
    hx, outs = None, []
    for t in range(5):
        y, hx = m(x[t : t + 1], hx)
        outs.append(y)
    assert torch.equal(torch.cat(outs), out) and torch.equal(hx[0], h_n) and torch.equal(hx[1], c_n)


def test_cell_and_step_match_reference():
    torch.manual_seed(4)
    cell = ConvLSTMCell(2, 3, (2, 3), dilation=(1, 2), dtype=DTYPE)
    x = torch.randn(2, 2, 7, 6, dtype=DTYPE)
    hx = (torch.randn(2, 3, 7, 6, dtype=DTYPE), torch.randn(2, 3, 7, 6, dtype=DTYPE))
    h, c = cell(x, hx)
    ref = reference_step(x, *hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, cell.kernel_size, cell.dilation)
    assert max(max_err(h, ref[0]), max_err(c, ref[1])) <= 1e-12
    pad = convlstm_module.same_padding(cell.kernel_size, cell.dilation)
    step = convlstm_step(x, *hx, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, pad, pad, cell.dilation)
    assert torch.equal(step[0], h) and torch.equal(step[1], c)
    # Unbatched, and hx=None meaning zeros.
    u_h, u_c = cell(x[1], (hx[0][1], hx[1][1]))
    assert u_h.shape == (3, 7, 6) and max(max_err(u_h, h[1]), max_err(u_c, c[1])) <= 1e-12
    z = cell(x)
    zero = torch.zeros(2, 3, 7, 6, dtype=DTYPE)
    assert torch.equal(z[0], cell(x, (zero, zero))[0])


def test_cell_equals_one_layer_one_step():
    torch.manual_seed(5)
    m = ConvLSTM2d(2, 3, 3, bias=False)
    cell = ConvLSTMCell(2, 3, 3, bias=False)
    cell.load_state_dict({"weight_ih": m.weight_ih_l0, "weight_hh": m.weight_hh_l0})
    x = torch.randn(1, 2, 2, 5, 5)
    out, (h_n, c_n) = m(x)
    h, c = cell(x[0])
    assert torch.equal(out[0], h) and torch.equal(h_n[0], h) and torch.equal(c_n[0], c)


def test_parameters_attributes_and_init():
    m = ConvLSTM2d(3, 4, (3, 2), num_layers=2, dilation=2)
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (16, 3, 3, 2), "weight_hh_l0": (16, 4, 3, 2), "bias_ih_l0": (16,), "bias_hh_l0": (16,),
        "weight_ih_l1": (16, 4, 3, 2), "weight_hh_l1": (16, 4, 3, 2), "bias_ih_l1": (16,), "bias_hh_l1": (16,),
    }  # fmt: skip
    assert (m.input_channels, m.hidden_channels, m.num_layers) == (3, 4, 2)
    assert (m.kernel_size, m.dilation, m.bias, m.batch_first, m.dropout) == ((3, 2), (2, 2), True, False, 0.0)
    bound = 1 / (4 * 3 * 2) ** 0.5
    for p in m.parameters():
        assert p.abs().max() <= bound and p.std() > bound / 4  # U(-k, k), not constant
    no_bias = ConvLSTM2d(3, 4, 3, num_layers=2, bias=False)
    assert sorted(n for n, _ in no_bias.named_parameters()) == ["weight_hh_l0", "weight_hh_l1", "weight_ih_l0", "weight_ih_l1"]
    cell = ConvLSTMCell(3, 4, 3, bias=False)
    assert cell.bias_ih is None and [n for n, _ in cell.named_parameters()] == ["weight_ih", "weight_hh"]
    assert repr(m) == "ConvLSTM2d(3, 4, kernel_size=(3, 2), num_layers=2, dilation=(2, 2))"
    assert ConvLSTM2d(1, 2, 3, dtype=DTYPE).weight_hh_l0.dtype == DTYPE


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(6)
    m = ConvLSTM2d(2, 3, 3, num_layers=2, dropout=0.5)
    plain = ConvLSTM2d(2, 3, 3, num_layers=2)
    plain.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 2, 5, 5)
    assert torch.equal(m.eval()(x)[0], plain(x)[0])
    assert not torch.equal(m.train()(x)[0], plain(x)[0])
    # nn.LSTM semantics: dropout acts on the first layer's output sequence, not on the last layer's.
    with torch.no_grad():
        first = ConvLSTM2d(2, 3, 3)
        first.load_state_dict({k[:-1] + "0": v for k, v in m.state_dict().items() if k.endswith("l0")})
        second = ConvLSTM2d(3, 3, 3)
        second.load_state_dict({k[:-1] + "0": v for k, v in m.state_dict().items() if k.endswith("l1")})
        torch.manual_seed(8)
        expected = second(F.dropout(first(x)[0], 0.5, training=True))[0]
        torch.manual_seed(8)
        assert torch.equal(m(x)[0], expected)
    with pytest.warns(UserWarning, match="no effect with num_layers=1"):
        ConvLSTM2d(2, 3, 3, dropout=0.2)


def test_gradients_match_finite_differences():
    torch.manual_seed(9)
    m = ConvLSTM2d(1, 2, 2, num_layers=2, dtype=DTYPE)
    x = torch.randn(2, 1, 1, 3, 2, dtype=DTYPE, requires_grad=True)
    h0 = torch.randn(2, 1, 2, 3, 2, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0: m(x, (h0, torch.zeros_like(h0)))[0], (x, h0))


def single_conv_reference(weights, biases, gate_order, x):
    """The common single-conv ConvLSTM: per layer conv(cat([x, h])) split in gate_order."""
    T, B, _, H, W = x.shape
    layer_input = x
    for k, w in enumerate(weights):
        hid = w.shape[0] // 4
        h = c = x.new_zeros(B, hid, H, W)
        pad = same_pad(w.shape[2:], (1, 1))
        outputs = []
        for t in range(T):
            z = F.conv2d(F.pad(torch.cat([layer_input[t], h], 1), pad), w, None if biases is None else biases[k])
            gate = dict(zip(gate_order, z.chunk(4, 1)))
            c = torch.sigmoid(gate["f"]) * c + torch.sigmoid(gate["i"]) * torch.tanh(gate["g"])
            h = torch.sigmoid(gate["o"]) * torch.tanh(c)
            outputs.append(h)
        layer_input = torch.stack(outputs)
    return layer_input


@pytest.mark.parametrize("gate_order", ["ifog", "oigf", "ifgo"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_from_concat_conv_matches_single_conv_layout(gate_order, with_bias):
    torch.manual_seed(10)
    weights = [torch.randn(12, 2 + 3, 2, 3, dtype=DTYPE), torch.randn(12, 3 + 3, 2, 3, dtype=DTYPE)]
    biases = [torch.randn(12, dtype=DTYPE) for _ in weights] if with_bias else None
    m = from_concat_conv(weights, biases, gate_order=gate_order, batch_first=True)
    assert (m.input_channels, m.hidden_channels, m.kernel_size, m.num_layers) == (2, 3, (2, 3), 2)
    assert m.batch_first and m.bias == with_bias and m.weight_ih_l0.dtype == DTYPE
    if with_bias:
        assert torch.equal(m.bias_hh_l1, torch.zeros(12, dtype=DTYPE))
    x = torch.randn(2, 4, 2, 5, 6, dtype=DTYPE)
    expected = single_conv_reference(weights, biases, gate_order, x.transpose(0, 1)).transpose(0, 1)
    assert max_err(m(x)[0], expected) <= 1e-12


def test_from_concat_conv_rejects_bad_tensors():
    w = torch.randn(12, 5, 3, 3)
    with pytest.raises(ValueError, match=r"weights\[1\] has shape \(12, 5, 3, 3\), expected \(12, 6, 3, 3\)"):
        from_concat_conv([w, torch.randn(12, 5, 3, 3)])
    with pytest.raises(ValueError, match=r"weights\[0\] has shape \(10, 5, 3, 3\), expected \(4\*hidden"):
        from_concat_conv([torch.randn(10, 5, 3, 3)])
    with pytest.raises(ValueError, match=r"weights\[0\] must be 4-D .* got shape \(12, 5\)"):
        from_concat_conv([torch.randn(12, 5)])
    with pytest.raises(ValueError, match=r"biases\[0\] has shape \(8,\), expected \(12,\)"):
        from_concat_conv([w], [torch.randn(8)])
    with pytest.raises(ValueError, match="biases has 2 entries, expected 1"):
        from_concat_conv([w], [torch.randn(12), torch.randn(12)])
    with pytest.raises(ValueError, match="gate_order must be a permutation of 'ifgo', got 'iffo'"):
        from_concat_conv([w], gate_order="iffo")
    with pytest.raises(TypeError, match="weights must be a non-empty list of tensors, got Tensor"):
        from_concat_conv(w)
    with pytest.raises(TypeError, match=r"infers .* got \['kernel_size'\]"):
        from_concat_conv([w], kernel_size=3)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"kernel_size": 0}, ValueError, "kernel_size must be >= 1, got 0"),
        ({"kernel_size": (3, 0)}, ValueError, r"kernel_size must be >= 1, got \(3, 0\)"),
        ({"kernel_size": 2.5}, TypeError, "kernel_size must be an int or a pair of ints, got 2.5"),
        ({"dilation": 0}, ValueError, "dilation must be >= 1, got 0"),
        ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\), got -0.1"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": "0.1"}, TypeError, "dropout must be a float, got str"),
        ({"hidden_channels": 4.0}, TypeError, "hidden_channels must be an int, got float 4.0"),
        ({"input_channels": 0}, ValueError, "input_channels must be >= 1, got 0"),
        ({"num_layers": 0}, ValueError, "num_layers must be >= 1, got 0"),
        ({"num_layers": True}, TypeError, "num_layers must be an int, got bool True"),
        ({"batch_first": 1}, TypeError, "batch_first must be a bool, got int 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    args = {"input_channels": 2, "hidden_channels": 3, "kernel_size": 3, "num_layers": 2, **kwargs}
    with pytest.raises(error, match=message):
        ConvLSTM2d(**args)
    if "num_layers" not in kwargs and "dropout" not in kwargs and "batch_first" not in kwargs:
        del args["num_layers"]
        with pytest.raises(error, match=message):
            ConvLSTMCell(**args)


def test_forward_rejects_bad_input_and_hx():
    m = ConvLSTM2d(2, 3, 3, num_layers=2)
    x = torch.randn(4, 3, 2, 6, 5)  # (T, B, C, H, W)
    h = torch.zeros(2, 3, 3, 6, 5)
    with pytest.raises(ValueError, match=r"input must be 5-D \(T, B, C, H, W\) or 4-D unbatched .* got 3-D shape \(4, 3, 2\)"):
        m(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match="input has 5 channels, expected 2 \\(input_channels\\)"):
        m(torch.randn(4, 3, 5, 6, 5))
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got dtype torch.int64"):
        m(torch.ones(4, 3, 2, 6, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="input has dtype torch.float64, expected torch.float32"):
        m(x.double())
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        m([1.0])
    with pytest.raises(ValueError, match="input has 0 time steps"):
        m(x[:0])
    with pytest.raises(TypeError, match="hx must be a pair \\(h_0, c_0\\) of tensors, got Tensor"):
        m(x, h)
    with pytest.raises(TypeError, match="hx must be a pair"):
        m(x, (h, h, h))
    with pytest.raises(ValueError, match=r"hx h has batch 2, expected 3 \(input batch\)"):
        m(x, (h[:, :2], h))
    with pytest.raises(ValueError, match=r"hx c has layers 1, expected 2 \(num_layers\)"):
        m(x, (h, h[:1]))
    with pytest.raises(ValueError, match=r"hx h has channels 4, expected 3 \(hidden_channels\)"):
        m(x, (torch.zeros(2, 3, 4, 6, 5), h))
    with pytest.raises(ValueError, match=r"hx h has height 7, expected 6 \(input height\)"):
        m(x, (torch.zeros(2, 3, 3, 7, 5), h))
    with pytest.raises(ValueError, match=r"hx c has width 4, expected 5 \(input width\)"):
        m(x, (h, torch.zeros(2, 3, 3, 6, 4)))
    with pytest.raises(ValueError, match=r"hx h must be 4-D \(layers, channels, height, width\), got 5-D"):
        m(x[:, 0], (h, h))  # unbatched input with batched hx
    with pytest.raises(TypeError, match="hx h has dtype torch.float64, expected torch.float32"):
        m(x, (h.double(), h))
    cell = ConvLSTMCell(2, 3, 3)
    with pytest.raises(ValueError, match=r"input must be 4-D \(B, C, H, W\) or 3-D unbatched"):
        cell(x)
    with pytest.raises(ValueError, match="input has 1 channels, expected 2"):
        cell(torch.randn(3, 1, 6, 5))
    with pytest.raises(ValueError, match=r"hx h has batch 2, expected 3 \(input batch\)"):
        cell(x[0], (h[0, :2], h[0]))


def test_docstring_examples_run():
    for module in (convlstm_module, stateful_module):
        result = doctest.testmod(module)
        assert result.attempted > 5 and result.failed == 0


def test_public_names():
    assert sorted(torch_impl.__all__) == sorted(
        ["ConvLSTM2d", "ConvLSTMCell", "convlstm_step", "from_concat_conv", "StatefulLSTM", "StatefulConvLSTM",
         "StatefulGRU", "StatefulRNN", "StatefulWrapper"]
    )
