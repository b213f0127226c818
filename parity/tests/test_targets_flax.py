"""Flax's own recurrent modules as targets (``"flax.linen"``, ``"flax.nnx"``): parity in float64
and float32 with gradients, round trips, ports written by hand, wrong ports that must fail,
options that cannot be expressed, sizes that do not match."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import torch_impl
from parity import compare, to_jax, to_torch
from parity.targets import target_of
from parity.tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

F64, F32 = torch.float64, torch.float32
DTYPES = [pytest.param(F64, id="f64"), pytest.param(F32, id="f32")]
BOUND = {F64: 1e-12, F32: 1e-5}
PACKED = {"seq_lengths": [6, 3, 5]}

# name -> (torch module, input shape, compare options); the nnx cases are the linen ones NNX can
# express (its GRU has no b_hn: bias=False)
CASES = {
    "lstm": (lambda: torch.nn.LSTM(4, 5, batch_first=True), (3, 6, 4), {"chunks": [3, 3]}),
    "lstm-packed": (lambda: torch.nn.LSTM(4, 5), (6, 3, 4), PACKED),
    "lstm-bidir-packed": (lambda: torch.nn.LSTM(4, 5, bidirectional=True, batch_first=True),
                          (3, 6, 4), PACKED),
    "lstmcell": (lambda: torch.nn.LSTMCell(4, 5), (6, 3, 4), {"chunks": [3, 3]}),
    "gru": (lambda: torch.nn.GRU(4, 5, batch_first=True), (3, 6, 4), {"chunks": [3, 3]}),
    "gru-bidir-packed": (lambda: torch.nn.GRU(4, 5, bidirectional=True), (6, 3, 4), PACKED),
    "grucell": (lambda: torch.nn.GRUCell(4, 5), (6, 3, 4), {"chunks": [3, 3]}),
    "rnn-tanh": (lambda: torch.nn.RNN(4, 5), (6, 3, 4), {"chunks": [3, 3]}),
    "rnn-relu-packed": (lambda: torch.nn.RNN(4, 5, nonlinearity="relu", batch_first=True),
                        (3, 6, 4), PACKED),
    "rnncell-relu": (lambda: torch.nn.RNNCell(4, 5, nonlinearity="relu"), (6, 3, 4),
                     {"chunks": [3, 3]}),
    "convlstm": (lambda: torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True), (2, 4, 2, 6, 6),
                 {"chunks": [2, 2]}),
    "convlstmcell-even": (lambda: torch_impl.ConvLSTMCell(2, 3, (3, 4)), (4, 2, 2, 6, 5),
                          {"chunks": [2, 2]}),
}
NNX_CASES = {
    **{name: CASES[name] for name in ("lstm", "lstm-packed", "lstm-bidir-packed", "lstmcell",
                                      "rnn-tanh", "rnn-relu-packed", "rnncell-relu")},
    "gru-nobias": (lambda: torch.nn.GRU(4, 5, bias=False, batch_first=True), (3, 6, 4),
                   {"chunks": [3, 3]}),
    "gru-bidir-nobias-packed": (lambda: torch.nn.GRU(4, 5, bias=False, bidirectional=True),
                                (6, 3, 4), PACKED),
    "grucell-nobias": (lambda: torch.nn.GRUCell(4, 5, bias=False), (6, 3, 4), {"chunks": [3, 3]}),
}
TARGET_CASES = [pytest.param("flax.linen", name, id=f"linen-{name}") for name in CASES] + [
    pytest.param("flax.nnx", name, id=f"nnx-{name}") for name in NNX_CASES
]


def _case(target, name):
    return (CASES if target == "flax.linen" else NNX_CASES)[name]


def _convert(module, target, **kwargs):
    with jax.enable_x64(next(module.parameters()).dtype == F64):
        return to_jax(module, target=target, **kwargs)


def _shapes(rnn):
    """A Linen RNN's variables as shapes only (for errors raised before any run)."""
    return jax.eval_shape(rnn.init, jax.random.key(0), jnp.zeros((1, 6, 4)))


def _full_float64(module):
    """float64 weights with all 53 bits used (a float32 init cast up would hide roundings)."""
    torch.manual_seed(1)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand_like(p) * 0.8 - 0.4)
    return module


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target, name", TARGET_CASES)
def test_stock_port_matches_torch(target, name, dtype):
    torch.manual_seed(0)
    make, shape, options = _case(target, name)
    module = make().to(dtype)
    obj, variables = _convert(module, target)
    assert type(obj).__module__.startswith("flax.")
    assert (variables is None) == (target == "flax.nnx")
    report = compare(module, torch.randn(*shape, dtype=dtype), jax_module=obj,
                     variables=variables, initial_state="random", grads=True, **options)
    report.assert_ok()  # forward within 1e-12 / 1e-5, gradients within the default bounds
    forward = [c.max_abs for c in report.checks if not c.tensor.startswith("grad")]
    assert max(forward) <= BOUND[dtype]
    assert any(c.tensor == "grad/weight_hh" + ("" if "cell" in name else "_l0")
               for c in report.checks)


# ---------------------------------------------------------------------------------- round trips


def _run(module, x):
    with torch.no_grad():
        if isinstance(module, (torch.nn.RNNCellBase, torch_impl.ConvLSTMCell)):
            return module(x[0])
        return module(x)


@pytest.mark.parametrize("target, name", TARGET_CASES)
def test_round_trip_is_the_same_function_with_the_same_weights(target, name):
    make, shape, _ = _case(target, name)
    module = _full_float64(make())
    obj, variables = _convert(module, target)
    back = to_torch(obj, variables)
    assert type(back) is type(module)
    for option in ("batch_first", "bidirectional", "nonlinearity", "kernel_size"):
        assert getattr(back, option, None) == getattr(module, option, None), option
    before, after = module.state_dict(), back.state_dict()
    for key, tensor in before.items():
        if key.startswith("weight"):
            assert torch.equal(after[key], tensor), key  # bit for bit
    for key in [k for k in before if k.startswith("bias_ih")]:
        hh = key.replace("bias_ih", "bias_hh")
        if "conv" in name:  # no sum; the forget bias shifted by 1 and back: one rounding
            assert torch.equal(after[hh], before[hh])
            assert (after[key] - before[key]).abs().max() <= np.spacing(1.0)
        else:  # summed: the sum comes back exactly (in bias_ih; bias_hh keeps GRU's b_hn only)
            assert torch.equal(after[key] + after[hh], before[key] + before[hh]), key
    x = torch.randn(*shape, dtype=F64)
    for a, b in zip(jax.tree_util.tree_leaves(_run(module, x)),
                    jax.tree_util.tree_leaves(_run(back, x))):
        assert (a - b).abs().max() <= BOUND[F64]


def test_bias_false_comes_back_as_zero_biases():
    """Flax's cells always have biases: equal as a function, with bias=True."""
    module = torch.nn.GRU(4, 5, bias=False).double()
    obj, variables = _convert(module, "flax.linen")
    back = to_torch(obj, variables)
    assert back.bias and not back.bias_ih_l0.any() and not back.bias_hh_l0.any()
    assert torch.equal(back.weight_hh_l0, module.weight_hh_l0)


def test_time_major_override_and_to_torch_layout():
    module = torch.nn.LSTM(4, 5, batch_first=True).double()
    obj, variables = _convert(module, "flax.linen", time_major=True)
    assert obj.time_major
    back = to_torch(obj, variables)  # batch_first = not time_major
    assert isinstance(back, torch.nn.LSTM) and not back.batch_first
    # the port follows the torch module's layout whatever the Flax module's default
    compare(module, torch.randn(3, 6, 4, dtype=F64), jax_module=obj, variables=variables,
            initial_state="random").assert_ok()


# ---------------------------------------------------------------------------------- by hand


def test_a_linen_port_written_by_hand_passes():
    """The user's own code: a stock RNN initialised with ``init``, torch's weights copied in."""
    torch.manual_seed(2)
    lstm = torch.nn.LSTM(4, 5, batch_first=True).double()
    with jax.enable_x64(True):
        rnn = nn.RNN(nn.OptimizedLSTMCell(5, param_dtype=jnp.float64))
        variables = jax.jit(rnn.init)(jax.random.key(0), jnp.zeros((1, 6, 4), jnp.float64))
        params = jax.tree_util.tree_map(np.asarray, variables["params"])
        w_ih, w_hh = lstm.weight_ih_l0.detach().numpy(), lstm.weight_hh_l0.detach().numpy()
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy()
        for k, gate in enumerate("ifgo"):
            rows = slice(5 * k, 5 * (k + 1))
            params["cell"][f"i{gate}"]["kernel"] = jnp.asarray(w_ih[rows].T)
            params["cell"][f"h{gate}"]["kernel"] = jnp.asarray(w_hh[rows].T)
            params["cell"][f"h{gate}"]["bias"] = jnp.asarray(bias[rows])
    report = compare(lstm, torch.randn(3, 6, 4, dtype=F64), jax_module=rnn,
                     variables={"params": params}, chunks=[3, 3], initial_state="random",
                     grads=True)
    report.assert_ok()


def test_an_nnx_port_written_by_hand_passes():
    """nnx.LSTMCell (one Linear per gate, ``if_`` for the forget gate) set by the user."""
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(4, 5).double()
    with jax.enable_x64(True):
        cell = nnx.LSTMCell(4, 5, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        w_ih, w_hh = lstm.weight_ih_l0.detach().numpy(), lstm.weight_hh_l0.detach().numpy()
        bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy()
        for k, (i_name, h_name) in enumerate(zip(["ii", "if_", "ig", "io"], ["hi", "hf", "hg", "ho"])):
            rows = slice(5 * k, 5 * (k + 1))
            getattr(cell, i_name).kernel[...] = jnp.asarray(w_ih[rows].T)
            getattr(cell, h_name).kernel[...] = jnp.asarray(w_hh[rows].T)
            getattr(cell, h_name).bias[...] = jnp.asarray(bias[rows])
        rnn = nnx.RNN(cell, time_major=True)
    report = compare(lstm, torch.randn(6, 3, 4, dtype=F64), jax_module=rnn, chunks=[3, 3],
                     initial_state="random", grads=True)
    report.assert_ok()
    assert isinstance(to_torch(rnn), torch.nn.LSTM)


def test_to_torch_of_a_module_flax_initialised():
    """Started in Flax: back to torch, then compared against itself."""
    with jax.enable_x64(True):
        rnn = nn.Bidirectional(nn.RNN(nn.GRUCell(5, param_dtype=jnp.float64)),
                               nn.RNN(nn.GRUCell(5, param_dtype=jnp.float64)), time_major=True)
        variables = jax.jit(rnn.init)(jax.random.key(0), jnp.zeros((6, 2, 4), jnp.float64))
        variables = jax.tree_util.tree_map(  # nonzero biases too
            lambda a: a + 0.1 * jax.random.normal(jax.random.key(1), a.shape, a.dtype), variables)
    gru = to_torch(rnn, variables)
    assert isinstance(gru, torch.nn.GRU) and gru.bidirectional and not gru.batch_first
    compare(gru, torch.randn(6, 3, 4, dtype=F64), jax_module=rnn, variables=variables,
            initial_state="random", grads=True).assert_ok()


def test_convlstm_cell_without_bias_comes_back_with_forget_bias_one():
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        cell = nn.ConvLSTMCell(3, (3, 3), use_bias=False, param_dtype=jnp.float64)
        variables = {"params": {"ih": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 12)))},
                                "hh": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 3, 12)))}}}
        x, c0, h0 = (jnp.asarray(rng.normal(size=(2, 6, 6, n))) for n in (2, 3, 3))
        (c, h), _ = jax.jit(cell.apply)(variables, (c0, h0), x)
    back = to_torch(cell, variables)
    assert isinstance(back, torch_impl.ConvLSTMCell) and back.bias
    assert back.bias_ih.tolist() == [0.0] * 3 + [1.0] * 3 + [0.0] * 6 and not back.bias_hh.any()
    torch_layout = lambda a: torch.from_numpy(np.moveaxis(np.array(a), -1, 1).copy())
    with torch.no_grad():
        h_t, c_t = back(torch_layout(x), (torch_layout(h0), torch_layout(c0)))
    assert np.abs(np.moveaxis(h_t.numpy(), 1, -1) - np.asarray(h)).max() <= BOUND[F64]
    assert np.abs(np.moveaxis(c_t.numpy(), 1, -1) - np.asarray(c)).max() <= BOUND[F64]


# ---------------------------------------------------------------------------------- NNX's GRU


def test_nnx_gru_with_b_hn_is_refused():
    with pytest.raises(ValueError, match=r"b_hn.*'flax\.linen' has.*'flax\.nnx'.*'linen' and 'nnx'"):
        _convert(torch.nn.GRU(4, 5).double(), "flax.nnx")


def test_nnx_gru_has_no_b_hn_to_train():
    """From NNX (b_hn zero): forward parity; torch's bias_hh has a gradient NNX cannot give."""
    with jax.enable_x64(True):
        rnn = nnx.RNN(nnx.GRUCell(4, 5, param_dtype=jnp.float64,
                                  bias_init=nnx.initializers.normal(0.3), rngs=nnx.Rngs(0)))
    gru = to_torch(rnn)
    assert gru.bias and gru.bias_ih_l0.any() and not gru.bias_hh_l0.any()
    x = torch.randn(3, 6, 4, dtype=F64)
    compare(gru, x, jax_module=rnn, chunks=[3, 3], initial_state="random").assert_ok()
    report = compare(gru, x, jax_module=rnn, initial_state="random", grads=True)
    assert [c.tensor for c in report.failures] == ["grad/bias_hh_l0"]
    assert "no such parameter" in report.failures[0].note
    _convert(gru, "flax.nnx")  # b_hn is zero: converts


# ---------------------------------------------------------------------------------- wrong ports


def _lstm_port():
    torch.manual_seed(4)
    module = torch.nn.LSTM(4, 5, batch_first=True).double()
    obj, variables = _convert(module, "flax.linen")
    return module, obj, variables


def _edited(variables, edit):
    params = jax.tree_util.tree_map(np.array, variables["params"])  # a fresh, writable tree
    edit(params)
    return {"params": jax.tree_util.tree_map(jnp.asarray, params)}


def _fails(module, obj, variables, x, tensor="output", grads=True):
    report = compare(module, x, jax_module=obj, variables=variables, initial_state="random",
                     grads=grads)
    assert not report.ok
    assert any(c.tensor == tensor for c in report.failures), report.failures
    with pytest.raises(AssertionError):
        report.assert_ok()


def _swap_gates(params):
    cell = params["cell"]
    cell["if"], cell["ig"] = cell["ig"], cell["if"]


def _drop_bias(params):
    params["cell"]["hf"]["bias"] = np.zeros_like(params["cell"]["hf"]["bias"])


@pytest.mark.parametrize("edit", [_swap_gates, _drop_bias], ids=["ig-if-swapped", "bias-dropped"])
def test_wrong_linen_port_fails(edit):
    module, obj, variables = _lstm_port()
    with jax.enable_x64(True):
        variables = _edited(variables, edit)
    _fails(module, obj, variables, torch.randn(3, 6, 4, dtype=F64))


class _UserPort:
    """A port built by a user around a stock Flax RNN (``apply(variables, x, carry,
    seq_lengths)``, carries in torch's order with the layer axis). Not a Flax object: the
    harness calls its ``apply`` (and would read gradients in carryover's own layout, so no
    ``grads=True``)."""

    def __init__(self, rnn, swap):
        self.rnn, self.swap = rnn, swap

    def apply(self, variables, x, carry, seq_lengths=None):
        h, c = carry
        initial = (h[0], c[0]) if self.swap else (c[0], h[0])  # Flax's order is (c, h)
        (c_n, h_n), y = self.rnn.apply(variables, x, initial_carry=initial,
                                       seq_lengths=seq_lengths, return_carry=True)
        return y, (h_n[None], c_n[None])


def test_user_port_with_carry_order_swapped_fails():
    module, obj, variables = _lstm_port()
    x = torch.randn(3, 6, 4, dtype=F64)
    compare(module, x, jax_module=_UserPort(obj, swap=False), variables=variables,
            initial_state="random", chunks=[3, 3]).assert_ok()  # the control
    _fails(module, _UserPort(obj, swap=True), variables, x, grads=False)


def test_convlstm_forget_shift_forgotten_fails():
    torch.manual_seed(5)
    module = torch_impl.ConvLSTM2d(2, 3, 3).double()
    obj, variables = _convert(module, "flax.linen")

    def unshift(params):  # torch's bias copied as it is: Flax's own +1 comes on top
        params["cell"]["ih"]["bias"][6:9] += 1.0  # Flax's gate order i, g, f, o

    with jax.enable_x64(True):
        variables = _edited(variables, unshift)
    _fails(module, obj, variables, torch.randn(4, 2, 2, 6, 6, dtype=F64))


def test_wrong_nnx_port_fails():
    torch.manual_seed(6)
    module = torch.nn.LSTM(4, 5).double()
    obj, _ = _convert(module, "flax.nnx")
    kernel = obj.cell.dense_i.kernel
    kernel[...] = jnp.concatenate([kernel[:, 5:10], kernel[:, :5], kernel[:, 10:]],
                                  axis=1)  # i and f swapped
    report = compare(module, torch.randn(6, 3, 4, dtype=F64), jax_module=obj,
                     initial_state="random", grads=True)
    assert not report.ok and any(c.tensor == "output" for c in report.failures)


# ---------------------------------------------------------------------------------- refused


UNSUPPORTED = [
    pytest.param(lambda: torch.nn.LSTM(4, 5, num_layers=2), "num_layers", id="num_layers"),
    pytest.param(lambda: torch.nn.GRU(4, 5, num_layers=2, dropout=0.5), "num_layers",
                 id="dropout-layers"),
    pytest.param(lambda: torch.nn.LSTM(4, 5, proj_size=3), "proj_size", id="proj_size"),
]


@pytest.mark.parametrize("target", ["flax.linen", "flax.nnx"])
@pytest.mark.parametrize("make, option", UNSUPPORTED)
def test_unsupported_options_name_option_and_targets(target, make, option):
    with pytest.raises(ValueError) as error:
        to_jax(make(), target=target)
    message = str(error.value)
    assert option in message and repr(target) in message and "'linen' and 'nnx'" in message


@pytest.mark.parametrize("make, option", [
    (lambda: torch_impl.ConvLSTM2d(2, 3, 3, dilation=2), "dilation"),
    (lambda: torch_impl.ConvLSTMCell(2, 3, 3, bias=False), "bias"),
], ids=["dilation", "convlstm-bias-false"])
def test_unsupported_convlstm_options(make, option):
    with pytest.raises(ValueError, match=rf"{option}.*'flax\.linen'.*'linen' and 'nnx'"):
        to_jax(make(), target="flax.linen")


def test_nnx_has_no_convlstm():
    with pytest.raises(ValueError, match=r"ConvLSTM2d.*'flax\.nnx'.*'linen' and 'nnx'"):
        to_jax(torch_impl.ConvLSTM2d(2, 3, 3), target="flax.nnx")


def test_compare_refuses_an_option_the_port_cannot_have():
    module = torch.nn.LSTM(4, 5, num_layers=2)
    rnn = nn.RNN(nn.OptimizedLSTMCell(5))
    variables = _shapes(rnn)
    with pytest.raises(ValueError, match=r"num_layers.*'flax\.linen'"):
        compare(module, torch.randn(7, 2, 4), jax_module=rnn, variables=variables)


# ---------------------------------------------------------------------------------- sizes


def test_linen_port_of_other_sizes_names_the_parameter():
    module = torch.nn.LSTM(4, 6)
    rnn = nn.RNN(nn.OptimizedLSTMCell(5))
    variables = _shapes(rnn)
    with pytest.raises(ValueError, match=r"params/cell/ii/kernel \(torch weight_ih_l0\) has "
                                         r"shape \(4, 5\), expected \(4, 6\)"):
        compare(module, torch.randn(7, 2, 4), jax_module=rnn, variables=variables)


def test_nnx_port_of_other_sizes_names_the_parameter():
    module = torch.nn.GRUCell(3, 6, bias=False)
    cell = nnx.GRUCell(4, 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"dense_i/kernel \(torch weight_ih\) has shape "
                                         r"\(4, 18\), expected \(3, 18\)"):
        compare(module, torch.randn(5, 2, 3), jax_module=cell)


def test_to_torch_of_inconsistent_shapes_names_the_parameter():
    rnn = nn.RNN(nn.GRUCell(6))
    variables = jax.jit(rnn.init)(jax.random.key(0), jnp.zeros((1, 6, 4)))
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    params["cell"]["hz"]["kernel"] = np.zeros((5, 6), np.float32)
    with pytest.raises(ValueError, match=r"params/cell/hz/kernel \(torch weight_hh_l0\) has "
                                         r"shape \(5, 6\), expected \(6, 6\)"):
        to_torch(rnn, {"params": params})


def test_structure_must_fit_the_torch_module():
    rnn = nn.RNN(nn.GRUCell(5))
    variables = _shapes(rnn)
    with pytest.raises(ValueError, match="bidirectional=True"):
        compare(torch.nn.GRU(4, 5, bidirectional=True), torch.randn(7, 2, 4), jax_module=rnn,
                variables=variables)
    with pytest.raises(ValueError, match="cannot stand for a torch LSTM"):
        compare(torch.nn.LSTM(4, 5), torch.randn(7, 2, 4), jax_module=rnn, variables=variables)


# ---------------------------------------------------------------------------------- ownership


def test_ownership():
    lstm = torch.nn.LSTM(4, 5)
    ours, _ = to_jax(lstm)  # carryover's own Linen module: a Flax module, not a stock one
    ours_nnx, _ = to_jax(lstm, target="nnx")
    assert target_of(ours) is None and target_of(ours_nnx) is None
    assert target_of(nn.Dense(3)) is None
    assert target_of(to_jax(lstm, target="flax.linen")[0]).name == "flax.linen"
    assert target_of(nn.ConvLSTMCell(3, (3, 3))).name == "flax.linen"
    assert target_of(to_jax(lstm, target="flax.nnx")[0]).name == "flax.nnx"
    assert target_of(nnx.SimpleCell(2, 3, rngs=nnx.Rngs(0))).name == "flax.nnx"
