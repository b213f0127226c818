"""Ports the user already has: their own function (``CustomPort``) and Equinox's cells.

Each must match torch (outputs, final states, gradients by torch name), and each wrong port
(gates swapped, a bias dropped, the carry order declared wrong) must fail the comparison, not
crash it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import torch

from parity import CustomPort, compare, to_jax, to_torch
from parity.targets import gate_blocks, summed
from parity.tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

H = 5
ORDER = (0, 1, 2, 3)  # Flax's LSTM cells name the gates as torch orders them: i, f, g, o


class TwoLayer(nn.Module):
    """A custom two-layer LSTM built from Flax's stock cell: carry [(c, h), (c, h)]."""

    hidden: int

    @nn.compact
    def __call__(self, x, carry):
        finals = []
        for k in range(2):
            rnn = nn.RNN(nn.OptimizedLSTMCell(self.hidden), return_carry=True, name=f"layer{k}")
            final, x = rnn(x, initial_carry=carry[k])
            finals.append(final)
        return x, finals


def _table(order=ORDER, bias=True):
    table = []
    for k in range(2):
        cell = f"OptimizedLSTMCell_{k}"
        table.append(gate_blocks(f"weight_ih_l{k}", [(cell, g, "kernel") for g in ("ii", "if", "ig", "io")], order))
        table.append(gate_blocks(f"weight_hh_l{k}", [(cell, g, "kernel") for g in ("hi", "hf", "hg", "ho")], order))
        if bias:
            table.append(summed((f"bias_ih_l{k}", f"bias_hh_l{k}"), lambda n, cell=cell: gate_blocks(
                n, [(cell, g, "bias") for g in ("hi", "hf", "hg", "ho")], order, transpose=False)))
    return table


def _apply(params, x, carry):
    return TwoLayer(H).apply({"params": params}, x, carry)


def _lstm():
    torch.manual_seed(0)
    return torch.nn.LSTM(3, H, num_layers=2, batch_first=True).double()


def _params(port, module):
    with jax.enable_x64(True):
        return port.params_from_torch(module)


def _run(port, module, **options):
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    return compare(module, x, jax_module=port, variables=_params(port, module),
                   chunks=[3, 4], initial_state="random", grads=True, **options)


def test_custom_two_layer_flax_module_matches_torch():
    module = _lstm()
    report = _run(CustomPort(_apply, _table(), carry_order="ch", per_layer=True), module)
    report.assert_ok()
    assert report.worst("output") <= 1e-12
    assert {c.tensor for c in report.checks} >= {"grad/weight_ih_l1", "grad/bias_hh_l0", "grad/c_0"}


@pytest.mark.parametrize("wrong", ["gates swapped", "carry order", "bias dropped"])
def test_wrong_custom_ports_fail(wrong):
    module = _lstm()
    port = CustomPort(_apply, _table(), carry_order="ch", per_layer=True)
    variables = _params(port, module)
    if wrong == "gates swapped":
        port = CustomPort(_apply, _table(order=(0, 2, 1, 3)), carry_order="ch", per_layer=True)
        variables = _params(port, module)
    elif wrong == "carry order":
        port = CustomPort(_apply, _table(), carry_order="hc", per_layer=True)
    else:
        variables["OptimizedLSTMCell_0"]["hf"]["bias"] = jnp.zeros(H)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    report = compare(module, x, jax_module=port, variables=variables, initial_state="random",
                     grads=True)
    assert not report.ok


def test_custom_port_declarations_are_checked():
    with pytest.raises(ValueError, match=r"carry_order must be one of \('hc', 'ch', 'h'\), got 'x'"):
        CustomPort(_apply, _table(), carry_order="x")
    with pytest.raises(TypeError, match="table must be a non-empty list"):
        CustomPort(_apply, [])
    port = CustomPort(_apply, _table(), carry_order="h")
    with pytest.raises(ValueError, match=r"carry_order 'h' does not fit a LSTM, whose state is \(h, c\)"):
        compare(_lstm(), torch.randn(2, 7, 3, dtype=torch.float64), jax_module=port,
                variables=_params(port, _lstm()))
    with pytest.raises(TypeError, match="float64 weights need JAX's x64 mode"):
        port.params_from_torch(_lstm())
    with pytest.raises(ValueError, match=r"table names torch parameters the module lacks: \['bias_hh_l0'"):
        _params(CustomPort(_apply, _table()), torch.nn.LSTM(3, H, 2, bias=False))


# ------------------------------------------------------------------------------- equinox

EQX = {
    "lstm": (lambda: torch.nn.LSTM(4, 6, batch_first=True), (2, 9, 4)),
    "lstm-no-bias-unbatched": (lambda: torch.nn.LSTM(4, 6, bias=False), (9, 4)),
    "gru-time-major": (lambda: torch.nn.GRU(4, 6), (9, 2, 4)),
    "lstmcell": (lambda: torch.nn.LSTMCell(4, 6), (9, 2, 4)),
    "grucell": (lambda: torch.nn.GRUCell(4, 6), (9, 2, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", sorted(EQX))
def test_equinox_cells_match_torch_and_go_back(name, dtype):
    pytest.importorskip("equinox")
    torch.manual_seed(1)
    make, shape = EQX[name]
    module = make().to(dtype)
    with jax.enable_x64(dtype == torch.float64):
        cell, variables = to_jax(module, target="equinox")
    assert variables is None
    report = compare(module, torch.randn(*shape, dtype=dtype), jax_module=cell, chunks=[4, 5],
                     initial_state="random", grads=True)
    report.assert_ok()
    back = to_torch(cell)  # a torch cell (nn.LSTMCell / nn.GRUCell), the same function
    xs = torch.randn(6, shape[-1], dtype=dtype)  # an unbatched sequence, time first
    state, outputs = None, []
    for x in xs:
        state = back(x, state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    if hasattr(module, "weight_ih"):  # the module is itself a cell: step it the same way
        expected, state = [], None
        for x in xs:
            state = module(x, state)
            expected.append(state[0] if isinstance(state, tuple) else state)
        expected = torch.stack(expected)
    else:
        expected = module(xs)[0]  # unbatched input is (T, F) whatever batch_first says
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(torch.stack(outputs), expected, rtol=0, atol=atol)


def test_wrong_equinox_port_fails_and_options_it_cannot_express_are_named():
    eqx = pytest.importorskip("equinox")
    module = torch.nn.GRU(4, 6, batch_first=True).double()
    with jax.enable_x64(True):
        cell, _ = to_jax(module, target="equinox")
        swapped = eqx.tree_at(lambda c: c.weight_ih, cell, jnp.roll(cell.weight_ih, 6, axis=0))
    report = compare(module, torch.randn(2, 9, 4, dtype=torch.float64), jax_module=swapped,
                     grads=True)
    assert not report.ok
    with pytest.raises(ValueError, match=r"num_layers \(num_layers=2\) cannot be expressed by target 'equinox'; targets 'linen' and 'nnx'"):
        to_jax(torch.nn.LSTM(3, 4, num_layers=2), target="equinox")
    with pytest.raises(ValueError, match="a RNN cannot be expressed by target 'equinox'"):
        to_jax(torch.nn.RNN(3, 4), target="equinox")
    with pytest.raises(ValueError, match=r"the equinox port has no packed sequences"):
        compare(torch.nn.LSTM(3, 4), torch.randn(5, 2, 3), jax_module=to_jax(torch.nn.LSTM(3, 4), target="equinox")[0],
                seq_lengths=[5, 3])
