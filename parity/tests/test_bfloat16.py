"""bfloat16: conversion keeps the dtype bit for bit, and ``compare`` judges JAX against a float64
truth relative to torch's own bfloat16 error (a fixed atol means nothing in bfloat16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
import torch

import torch_impl
from parity import compare, to_jax, to_torch
from parity.tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

MODULES = {
    "lstm": (lambda: torch.nn.LSTM(6, 8, num_layers=2, batch_first=True), (3, 20, 6)),
    "gru": (lambda: torch.nn.GRU(6, 8, bidirectional=True, batch_first=True), (3, 20, 6)),
    "rnn-relu": (lambda: torch.nn.RNN(6, 8, nonlinearity="relu"), (20, 3, 6)),
    "convlstm": (lambda: torch_impl.ConvLSTM2d(2, 4, 3, batch_first=True), (2, 6, 2, 6, 6)),
}


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_round_trip_keeps_bfloat16_bit_for_bit(kind):
    torch.manual_seed(0)
    module = MODULES[kind][0]().to(torch.bfloat16)
    jax_module, variables = to_jax(module)
    assert {a.dtype for a in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    back = to_torch(jax_module, variables)
    for name, tensor in module.state_dict().items():
        assert back.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(back.state_dict()[name], tensor), name


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_jax_bfloat16_no_worse_than_torch_bfloat16(kind):
    torch.manual_seed(1)
    make, shape = MODULES[kind]
    report = compare(make(), torch.randn(shape), dtype=torch.bfloat16, chunks="random",
                     initial_state="random")
    report.assert_ok()
    assert all("torch error" in c.note for c in report.checks)


def test_a_wrong_bfloat16_port_fails():
    torch.manual_seed(2)
    module = torch.nn.GRU(6, 8, batch_first=True).to(torch.bfloat16)
    jax_module, variables = to_jax(module)
    nudged = jax.tree_util.tree_map(lambda a: a * jnp.asarray(1.05, a.dtype), variables)
    report = compare(module, torch.randn(3, 20, 6), jax_module=jax_module, variables=nudged)
    assert not report.ok


def test_bfloat16_refuses_gradients():
    with pytest.raises(ValueError, match="grads and dropout_masks are not supported in bfloat16"):
        compare(torch.nn.LSTM(3, 4), torch.randn(5, 2, 3), dtype=torch.bfloat16, grads=True)


def test_meta_parameters_name_the_fix():
    with pytest.raises(ValueError, match=r"'meta' device \(not materialized\).*to_empty"):
        to_jax(torch.nn.LSTM(3, 4, device="meta"))
    with pytest.raises(ValueError, match=r"'meta' device"):
        compare(torch.nn.GRU(3, 4, device="meta"), torch.randn(5, 2, 3))
