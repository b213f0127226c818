"""The NNX modules through the harness: conversion both ways, compare (full, chunked, packed,
dropout masks, grads by torch name), streams, and a TBPTT training run that follows torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import torch_impl
from jax_impl import nnx as jax_nnx
from parity import compare, stream_to_jax, stream_to_torch, to_jax, to_torch
from parity.tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

CASES = {
    "lstm-l2-bidir-proj": (lambda: torch.nn.LSTM(4, 6, 2, bidirectional=True, proj_size=3,
                                                 batch_first=True), (2, 9, 4),
                           {"seq_lengths": [9, 4]}),
    "gru-l2-dropout": (lambda: torch.nn.GRU(4, 6, 2, dropout=0.3, batch_first=True), (2, 9, 4),
                       {"dropout_masks": "random"}),
    "rnn-relu-chunks": (lambda: torch.nn.RNN(4, 6, nonlinearity="relu"), (9, 2, 4),
                        {"chunks": [4, 5]}),
    "convlstm": (lambda: torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True), (2, 5, 2, 6, 6),
                 {"chunks": [2, 3]}),
    "grucell": (lambda: torch.nn.GRUCell(4, 6), (7, 2, 4), {"chunks": [3, 4]}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nnx_port_matches_torch_float64_and_round_trips(name):
    torch.manual_seed(0)
    make, shape, options = CASES[name]
    module = make().double()
    with jax.enable_x64(True):
        jax_module, variables = to_jax(module, target="nnx")
    assert variables is None and isinstance(jax_module, nnx.Module)
    report = compare(module, torch.randn(*shape, dtype=torch.float64), jax_module=jax_module,
                     grads=True, initial_state="random", **options)
    report.assert_ok()
    assert report.worst("output") <= 1e-12
    back = to_torch(jax_module)
    for key, tensor in module.state_dict().items():
        assert back.state_dict()[key].dtype == tensor.dtype
        assert torch.equal(back.state_dict()[key], tensor), key


def test_nnx_and_linen_reports_are_identical_in_float64():
    """The math is shared: the same weights and inputs give the same errors to the last bit."""
    torch.manual_seed(1)
    module = torch.nn.GRU(4, 6, 2, bidirectional=True, batch_first=True).double()
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    with jax.enable_x64(True):
        nnx_module, _ = to_jax(module, target="nnx")
    linen = compare(module, x, chunks=[3, 5], initial_state="random", grads=True)
    via_nnx = compare(module, x, jax_module=nnx_module, chunks=[3, 5], initial_state="random",
                      grads=True)
    assert [(c.tensor, c.run, c.max_abs) for c in linen.checks] == [
        (c.tensor, c.run, c.max_abs) for c in via_nnx.checks
    ]


def test_compare_converts_to_the_target_it_is_named():
    """compare(target=NAME) validates to_jax(module, target=NAME): a stock NNX GRU cannot hold
    torch's b_hn, so target "flax.nnx" refuses the module that the default (Linen) runs."""
    torch.manual_seed(1)
    module = torch.nn.GRU(4, 6, batch_first=True)
    x = torch.randn(3, 8, 4)
    assert compare(module, x).ok
    with pytest.raises(ValueError, match="b_hn .* cannot be expressed by target 'flax.nnx'"):
        compare(module, x, target="flax.nnx")
    with pytest.raises(ValueError, match=r"target must be one of \(.linen., .nnx., .*got .tensorflow."):
        compare(module, x, target="tensorflow")
    nnx_module, _ = to_jax(module, target="nnx")
    with pytest.raises(ValueError, match="pass jax_module or target, not both"):
        compare(module, x, jax_module=nnx_module, target="nnx")


def test_a_wrong_nnx_port_fails():
    torch.manual_seed(2)
    module = torch.nn.LSTM(4, 6, batch_first=True).double()
    with jax.enable_x64(True):
        jax_module, _ = to_jax(module, target="nnx")
        kernel = jax_module.layer_0.hh_kernel
        kernel[...] = kernel[...].at[0, 0].add(1e-6)
    report = compare(module, torch.randn(2, 9, 4, dtype=torch.float64), jax_module=jax_module,
                     grads=True)
    assert not report.ok


def test_nnx_stream_continues_a_torch_stream():
    torch.manual_seed(3)
    stream = torch_impl.StatefulGRU(4, 6, num_layers=2)
    chunks = torch.randn(3, 2, 5, 4)
    stream(chunks[0])
    jax_stream = stream_to_jax(stream, target="nnx")
    assert isinstance(jax_stream.module, jax_nnx.LinenView)
    expected = stream(chunks[1]).detach().numpy()
    got = np.asarray(jax_stream(jnp.asarray(chunks[1].numpy())))
    assert np.abs(got - expected).max() <= 1e-5
    back = stream_to_torch(jax_stream)
    assert torch.allclose(back(chunks[2]), stream(chunks[2]), atol=1e-5, rtol=0)


def test_unknown_target_lists_the_targets():
    with pytest.raises(ValueError, match=r"target must be one of \(.linen., .nnx., .flax.linen., .flax.nnx., .equinox., .keras.\), got .tensorflow."):
        to_jax(torch.nn.LSTM(3, 4), target="tensorflow")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_nnx_tbptt_training_follows_torch(optimizer):
    """N chunks of truncated BPTT: nnx.Optimizer + optax on the NNX port, torch.optim on torch,
    the same weights and data; the parameters agree after every step (float64)."""
    torch.manual_seed(4)
    module = torch.nn.GRU(3, 5, batch_first=True).double()
    head_free_target = torch.randn(4, 2, 6, 5, dtype=torch.float64)  # (chunks, B, T, H)
    xs = torch.randn(4, 2, 6, 3, dtype=torch.float64)
    lr = 0.05
    with jax.enable_x64(True):
        model, _ = to_jax(module, target="nnx")
        tx = optax.sgd(lr) if optimizer == "sgd" else optax.adam(lr)
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        step = jax_nnx.make_tbptt_step()
        carry = model.initialize_carry((2,), jnp.float64)
        torch_opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(
            module.parameters(), lr=lr
        )
        state = None
        for x, y in zip(xs, head_free_target):
            torch_opt.zero_grad()
            out, state = module(x, None if state is None else state.detach())
            torch.nn.functional.mse_loss(out, y).backward()
            torch_opt.step()
            carry, _ = step(model, opt, carry, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
            back = to_torch(model)
            for key, tensor in module.state_dict().items():
                np.testing.assert_allclose(back.state_dict()[key].numpy(), tensor.numpy(),
                                           rtol=0, atol=1e-12, err_msg=key)
