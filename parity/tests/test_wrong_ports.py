"""A wrong port must be reported not ok: the harness can fail, and fails the way it should."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

import jax_impl
import torch_impl
from jax_impl.functional import DenseWeights, lstm_step
from parity import compare, to_jax

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


def _lstm():
    torch.manual_seed(0)
    return torch.nn.LSTM(5, 7, num_layers=2, batch_first=True)


def _edit(variables, layer, name, fn):
    params = jax.tree_util.tree_map(lambda a: a, variables["params"])  # a fresh tree
    params[layer] = dict(params[layer])
    params[layer][name] = fn(params[layer][name])
    return {"params": params}


def _compare_edited(dtype, layer, name, fn, **kwargs):
    module = _lstm().to(dtype)
    with jax.enable_x64(dtype == torch.float64):
        jax_module, variables = to_jax(module)
        variables = _edit(variables, layer, name, fn)
        return compare(module, torch.randn(3, 9, 5), jax_module=jax_module, variables=variables,
                       dtype=dtype, **kwargs)


def test_correct_port_passes_the_same_checks():
    """The control: with nothing edited the same comparison is ok."""
    for dtype in (torch.float32, torch.float64):
        _compare_edited(dtype, "layer_1", "hh_kernel", lambda k: k, chunks=[4, 5],
                        initial_state="random").assert_ok()


def test_one_weight_nudged_by_1e_4_fails():
    """In float64. (In float32 the nudge moves the outputs by ~2e-6, under the 1e-5 bound:
    float64 is where a port is validated, float32 where its drift is measured.)"""
    nudge = lambda k: k.at[2, 3].add(1e-4)
    report = _compare_edited(torch.float64, "layer_0", "hh_kernel", nudge, initial_state="random")
    assert not report.ok
    assert any(c.tensor == "output" and not c.ok for c in report.checks)
    with pytest.raises(AssertionError, match=r"output \(full\): max abs .* > bound"):
        report.assert_ok()


def _swap_i_f(a):
    """Swaps the i and f gate blocks on the last axis (4H)."""
    i, f, g, o = jnp.split(a, 4, axis=-1)
    return jnp.concatenate([f, i, g, o], axis=-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate_order_swapped_fails(dtype):
    module = _lstm().to(dtype)
    with jax.enable_x64(dtype == torch.float64):
        jax_module, variables = to_jax(module)
        params = {
            layer: {name: (_swap_i_f(a) if name != "proj_kernel" else a) for name, a in p.items()}
            for layer, p in variables["params"].items()
        }
        report = compare(module, torch.randn(3, 9, 5), jax_module=jax_module,
                         variables={"params": params}, dtype=dtype)
    assert not report.ok
    assert {c.tensor for c in report.failures} >= {"output", "h_n", "c_n"}


class _SwappedCarryLSTM(nn.Module):
    """A port that keeps Flax's (c, h) carry order where torch's is (h, c)."""

    inner: jax_impl.LSTM

    @nn.compact
    def __call__(self, x, carry=None, *, seq_lengths=None):
        if carry is not None:
            carry = (carry[1], carry[0])  # reads (c, h)
        y, (h, c) = self.inner(x, carry, seq_lengths=seq_lengths)
        return y, (c, h)  # returns (c, h)


@pytest.mark.parametrize("dtype", DTYPES)
def test_carry_order_swapped_fails(dtype):
    module = _lstm().to(dtype)
    with jax.enable_x64(dtype == torch.float64):
        jax_module, variables = to_jax(module)
        port = _SwappedCarryLSTM(jax_module)
        port_variables = {"params": {"inner": variables["params"]}}
        report = compare(module, torch.randn(3, 9, 5), jax_module=port, variables=port_variables,
                         dtype=dtype, chunks=[4, 5], initial_state="random")
    assert not report.ok
    assert any(c.tensor == "h_n" and not c.ok for c in report.checks)
    assert any(c.run.startswith("chunks") and c.tensor == "output" and not c.ok for c in report.checks)


class _MergedBiasLSTM(nn.Module):
    """A one-layer port with a single bias (b_ih + b_hh), as hand-written ports often do."""

    hidden_size: int

    @nn.compact
    def __call__(self, x, carry=None, *, seq_lengths=None):
        p = self.variables["params"]["layer_0"]
        weights = DenseWeights(p["ih_kernel"], p["hh_kernel"], p["bias"], jnp.zeros_like(p["bias"]))
        h, c = (a[0] for a in carry)
        (h, c), ys = jax.lax.scan(lambda carry, xt: lstm_step(weights, carry, xt), (h, c),
                                  jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1), (h[None], c[None])


def test_merged_biases_fail():
    """Forward values agree to rounding (the sum is the same), so only the by-name gradient check
    can see it: torch trains two biases, the port one."""
    torch.manual_seed(0)
    module = torch.nn.LSTM(5, 7, batch_first=True).double()
    with jax.enable_x64(True):
        _, variables = to_jax(module)
        p = variables["params"]["layer_0"]
        merged = {"layer_0": {"ih_kernel": p["ih_kernel"], "hh_kernel": p["hh_kernel"],
                              "bias": p["ih_bias"] + p["hh_bias"]}}
        report = compare(module, torch.randn(3, 9, 5), jax_module=_MergedBiasLSTM(7),
                         variables={"params": merged}, initial_state="random", grads=True)
    forward = [c for c in report.checks if c.tensor in ("output", "h_n", "c_n")]
    assert forward and all(c.ok for c in forward)  # the forward pass alone cannot tell
    assert not report.ok
    assert any(c.tensor == "grad/params" and "bias_hh_l0" in c.note for c in report.failures)


def test_wrong_convlstm_kernel_orientation_fails():
    """A ConvLSTM port that forgot to flip the kernel (cross-correlation vs convolution)."""
    torch.manual_seed(0)
    module = torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True).double()
    with jax.enable_x64(True):
        jax_module, variables = to_jax(module)
        params = {"layer_0": dict(variables["params"]["layer_0"])}
        params["layer_0"]["ih_kernel"] = params["layer_0"]["ih_kernel"][::-1, ::-1]
        report = compare(module, torch.randn(2, 4, 2, 6, 6), jax_module=jax_module,
                         variables={"params": params})
    assert not report.ok


def test_non_finite_output_is_not_a_match():
    module = _lstm()
    x = torch.randn(3, 9, 5)
    x[1, 4, 2] = float("nan")
    report = compare(module, x)
    assert not report.ok
    assert all("non-finite" in c.note for c in report.failures)
    assert np.isfinite(report.checks[0].max_abs)


# ------------------------------------------------------------------------------ GRU ports
# Hand-written GRU ports with the GRU's parameter paths (params/layer_0/ih_kernel, hh_kernel,
# ih_bias, hh_bias: jax_impl.GRU's), one layer, batch-first. ``variant`` picks the update; only
# "torch" is torch's GRU (jax_impl.cells.gru_update):
#   r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r * h_n), h' = (1 - z) * n + z * h
# with x_* = W_i* x + b_i* and h_* = W_h* h + b_h*.


def _gru_update(variant: str, p, x, h):
    """One step of ``variant`` from the layer's params ``p`` (Flax layout, (in, 3H) kernels)."""
    from_x = x @ p["ih_kernel"] + p["ih_bias"]
    from_h = h @ p["hh_kernel"] + p["hh_bias"]
    x_r, x_z, x_n = jnp.split(from_x, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(from_h, 3, axis=-1)
    if variant == "r-z-swapped":  # reads the blocks as z, r, n
        x_r, x_z, h_r, h_z = x_z, x_r, h_z, h_r
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    if variant == "reset-before-matmul":  # the textbook GRU: W_hn (r * h) + b_hn
        w_hn = jnp.split(p["hh_kernel"], 3, axis=-1)[2]
        b_hn = jnp.split(p["hh_bias"], 3, axis=-1)[2]
        n = jnp.tanh(x_n + (r * h) @ w_hn + b_hn)
    elif variant == "b-hn-merged":  # b_hn added with b_in, outside the reset gate
        b_hn = jnp.split(p["hh_bias"], 3, axis=-1)[2]
        n = jnp.tanh(x_n + b_hn + r * (h_n - b_hn))
    else:
        n = jnp.tanh(x_n + r * h_n)
    if variant == "one-minus-z-swapped":  # h' = z * n + (1 - z) * h
        return z * n + (1.0 - z) * h
    return (1.0 - z) * n + z * h


class _GRUPort(nn.Module):
    """A one-layer batch-first GRU port; ``variant`` selects the update (see _gru_update)."""

    variant: str

    @nn.compact
    def __call__(self, x, carry=None, *, seq_lengths=None):
        p = self.variables["params"]["layer_0"]
        h, ys = jax.lax.scan(lambda h, xt: (_gru_update(self.variant, p, xt, h),) * 2,
                             carry[0], jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1), h[None]


WRONG_GRU_PORTS = ["reset-before-matmul", "r-z-swapped", "b-hn-merged", "one-minus-z-swapped"]


def _gru():
    torch.manual_seed(0)
    return torch.nn.GRU(5, 7, batch_first=True)


def _compare_gru_port(variant, dtype, gru=None, **kwargs):
    gru = (gru or _gru()).to(dtype)
    x = torch.randn(3, 9, 5, generator=torch.Generator().manual_seed(1))
    with jax.enable_x64(dtype == torch.float64):
        _, variables = to_jax(gru)
        return compare(gru, x, jax_module=_GRUPort(variant), variables=variables, dtype=dtype,
                       **kwargs)


GRU_CHECKS = dict(chunks=[4, 5], initial_state="random", grads=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_gru_port_passes_the_same_checks(dtype):
    """The control: the same hand-written port with torch's update is ok, and so is the
    converted jax_impl.GRU, under the comparison every wrong port below fails."""
    report = _compare_gru_port("torch", dtype, **GRU_CHECKS)
    report.assert_ok()
    assert {c.tensor for c in report.checks} >= {
        "output", "h_n", "grad/input", "grad/h_0", "grad/weight_hh_l0", "grad/bias_hh_l0"
    }
    compare(_gru().to(dtype), torch.randn(3, 9, 5), dtype=dtype, **GRU_CHECKS).assert_ok()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", WRONG_GRU_PORTS)
def test_wrong_gru_port_fails(variant, dtype):
    """Each wrong GRU is caught in both dtypes, by the forward checks (full and chunked) and by
    the by-name gradients (the weights reach the output differently)."""
    report = _compare_gru_port(variant, dtype, **GRU_CHECKS)
    assert not report.ok
    failed = {(c.run, c.tensor) for c in report.failures}
    assert {("full", "output"), ("full", "h_n"), ("chunks 4+5", "output")} <= failed, failed
    assert any(t.startswith("grad/weight_") for _, t in failed), failed
    assert all(c.note == "" for c in report.failures)  # numbers off, not a shape or a NaN


def test_merged_b_hn_is_caught_by_the_forward_checks_and_only_while_r_is_not_1():
    """b_hn moved outside the reset gate equals torch's GRU exactly when r = 1. With weights as
    initialised r is about 0.5, and the forward checks catch it (output and h_n, by far more
    than the bound); the gradient of bias_hh_l0 differs too. With r saturated at 1 (b_ir = 50:
    σ(50) rounds to 1 in float64) the forward values agree to rounding: no forward check can
    see this bug unless r differs from 1, which random weights ensure."""
    report = _compare_gru_port("b-hn-merged", torch.float64, **GRU_CHECKS)
    failed = {c.tensor: c for c in report.failures if c.run == "full"}
    assert {"output", "h_n", "grad/bias_hh_l0"} <= set(failed)
    assert failed["output"].max_abs > 1e3 * failed["output"].bound

    saturated = _gru().double()
    with torch.no_grad():
        saturated.bias_ih_l0[:7] = 50.0  # b_ir: r = σ(50 + ...) == 1.0 in float64
    report = _compare_gru_port("b-hn-merged", torch.float64, saturated, chunks=[4, 5],
                               initial_state="random")
    assert report.ok  # the blind spot, documented: r == 1 makes the two GRUs one function
