"""Training parity: the same TBPTT run in torch and JAX, and the mismatches it must catch.

Every case trains from the same weights over cycling chunks with the carry cut at each chunk
boundary; the report checks the loss and every parameter after every step. Sizes are tiny and
shared between cases, so the JAX gradient program compiles once per module kind.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import torch_impl
from parity import compare_training, make_optimizers
from parity.training import TRAINING_ATOL

F64 = torch.float64
SGD = ("sgd", dict(lr=0.1))
NESTEROV = ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True))
ADAM = ("adam", dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8))
ADAMW = ("adamw", dict(lr=1e-2, weight_decay=0.1))
CLIP = 0.02  # clip_norm of the grid


def _data(shape_x, shape_y, dtype=F64, chunks=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*shape_x, dtype=dtype, generator=g) for _ in range(chunks)]
    ys = [0.5 * torch.randn(*shape_y, dtype=dtype, generator=g) for _ in range(chunks)]
    return xs, ys


def _lstm(dtype=F64) -> torch.nn.LSTM:
    torch.manual_seed(0)
    return torch.nn.LSTM(3, 5, batch_first=True, dtype=dtype)


def _lstm_data(dtype=F64):
    return _data((2, 6, 3), (2, 6, 5), dtype)


def _convlstm() -> torch_impl.ConvLSTM2d:
    torch.manual_seed(1)
    return torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True, dtype=F64)


def _convlstm_data():
    return _data((2, 3, 2, 4, 4), (2, 3, 3, 4, 4))


MODULES = {"lstm": (_lstm, _lstm_data), "convlstm": (_convlstm, _convlstm_data)}


def _first_failing_step(report) -> int:
    return min(int(c.run.split()[1]) for c in report.failures)


# ------------------------------------------------------------------------ matching runs pass


@pytest.mark.parametrize("kind", sorted(MODULES))
@pytest.mark.parametrize("clip_norm", [None, CLIP])
@pytest.mark.parametrize("optimizer", [SGD, NESTEROV, ADAM, ADAMW], ids=["sgd", "nesterov", "adam", "adamw"])
def test_matching_optimizers_agree_in_float64(kind, optimizer, clip_norm):
    make, data = MODULES[kind]
    xs, ys = data()
    report = compare_training(make(), xs, ys, optimizer=optimizer, steps=4, clip_norm=clip_norm,
                              initial_state="random")
    report.assert_ok()
    assert len(report.jax_losses) == 4
    assert {"step 3"} <= {c.run for c in report.checks}
    assert any(c.tensor == "param/weight_hh_l0" for c in report.checks)


def test_twenty_adam_steps_stay_within_1e_9():
    """The fused program (make_tbptt_step, what a JAX loop runs) over 20 steps, float64."""
    xs, ys = _lstm_data()
    report = compare_training(_lstm(), xs, ys, optimizer=ADAM, steps=20, fused=True)
    report.assert_ok()
    assert report.worst("param/") <= 1e-9
    assert report.worst("loss") <= 1e-9
    # it trains: chunk 0 again (after 6 cycles of 3 chunks) has a lower loss
    assert report.jax_losses[18] < report.jax_losses[0]


def test_float32_within_its_bound():
    xs, ys = _lstm_data(torch.float32)
    report = compare_training(_lstm(torch.float32), xs, ys, optimizer=ADAM, steps=20)
    report.assert_ok()
    assert report.worst("param/") <= TRAINING_ATOL[torch.float32]


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_clipping_is_active_in_the_grid(kind):
    """CLIP is well below the gradient norm of the grid's first step: clipping does act."""
    make, data = MODULES[kind]
    module, (xs, ys) = make(), data()
    torch.nn.functional.mse_loss(module(xs[0])[0], ys[0]).backward()
    norm = torch.nn.utils.clip_grad_norm_(module.parameters(), math.inf)
    assert norm > 2 * CLIP


# ------------------------------------------------------------------ mismatches must be caught


def _fails(report, from_step: int = 0) -> None:
    assert not report.ok
    assert _first_failing_step(report) >= from_step
    assert any(c.tensor.startswith("param/") or c.tensor == "torch step" for c in report.failures)


def test_adam_eps_inside_the_sqrt_is_caught():
    xs, ys = _lstm_data()
    eps_root = optax.adam(1e-2, b1=0.9, b2=0.999, eps=0.0, eps_root=1e-8)  # sqrt(v + eps)
    _fails(compare_training(_lstm(), xs, ys, optimizer=ADAM, steps=3, jax_optimizer=eps_root))


def test_adam_eps_placed_differently_is_caught_with_a_large_eps():
    """eps squared inside the sqrt is the same magnitude and still caught."""
    xs, ys = _lstm_data()
    spec = ("adam", dict(lr=1e-2, eps=1e-3))
    inside = optax.adam(1e-2, eps=0.0, eps_root=1e-6)
    _fails(compare_training(_lstm(), xs, ys, optimizer=spec, steps=3, jax_optimizer=inside))


def test_carry_not_detached_on_the_torch_side_is_caught():
    """Step 0 agrees; from step 1 torch back-propagates into the previous chunk's (freed) graph."""
    xs, ys = _lstm_data()
    lstm = _lstm()
    stream = torch_impl.StatefulWrapper(lstm, detach=False)
    report = compare_training(stream, xs, ys, optimizer=SGD, steps=3)
    _fails(report, from_step=1)
    assert all(c.ok for c in report.checks if c.run == "step 0")
    assert "torch raised" in report.failures[0].note


def test_sgd_dampened_momentum_is_caught():
    """optax.ema-style momentum ((1-m)*g + m*t) against torch's m*b + g."""
    xs, ys = _lstm_data()
    spec = ("sgd", dict(lr=0.1, momentum=0.9))
    dampened = optax.chain(optax.ema(0.9, debias=False), optax.scale(-0.1))
    _fails(compare_training(_lstm(), xs, ys, optimizer=spec, steps=3, jax_optimizer=dampened))


def test_optax_clip_formula_is_caught():
    """optax.clip_by_global_norm divides by the norm, torch by norm + 1e-6."""
    xs, ys = _lstm_data()
    optax_clip = optax.chain(optax.clip_by_global_norm(CLIP), optax.sgd(0.1))
    _fails(compare_training(_lstm(), xs, ys, optimizer=SGD, clip_norm=CLIP, steps=3,
                            jax_optimizer=optax_clip))


# ------------------------------------------------------------- optimizers alone, exactly


@pytest.mark.parametrize(
    "optimizer, clip_norm",
    [(NESTEROV, None), (("sgd", dict(lr=0.1, momentum=0.5, weight_decay=0.01)), 0.3),
     (ADAM, None), (("adam", dict(lr=1e-2, weight_decay=0.05)), None), (ADAMW, 0.3)],
    ids=["nesterov", "sgd-wd-clip", "adam", "adam-l2", "adamw-clip"],
)
def test_update_rules_match_on_fixed_gradients(optimizer, clip_norm):
    """20 updates from the same gradient sequence: equal to rounding (first step included)."""
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "b": (4,)}
    params_np = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads_np = [{k: rng.normal(size=s) for k, s in shapes.items()} for _ in range(20)]
    make_torch, tx = make_optimizers(optimizer, clip_norm=clip_norm)

    params_t = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params_np.items()}
    opt = make_torch(params_t.values())
    with jax.enable_x64(True):  # scoped to this test, as the harness does
        params_j = {k: jnp.asarray(v) for k, v in params_np.items()}
        state = tx.init(params_j)
        for grads in grads_np:
            for k, p in params_t.items():
                p.grad = torch.tensor(grads[k])
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(params_t.values(), clip_norm)
            opt.step()
            updates, state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, state, params_j)
            params_j = optax.apply_updates(params_j, updates)
            for k in shapes:
                np.testing.assert_allclose(np.asarray(params_j[k]), params_t[k].detach().numpy(),
                                           rtol=1e-13, atol=1e-15)


def test_optimizer_spec_errors():
    with pytest.raises(ValueError, match="one of"):
        make_optimizers(("rmsprop", {}))
    with pytest.raises(ValueError, match="dampening"):
        make_optimizers(("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1)))
    with pytest.raises(ValueError, match="amsgrad"):
        make_optimizers(("adam", dict(amsgrad=True)))
    with pytest.raises(TypeError, match="pair"):
        make_optimizers(0.1)


def test_compare_training_argument_errors():
    xs, ys = _lstm_data()
    with pytest.raises(ValueError, match="equal length"):
        compare_training(_lstm(), xs, ys[:2], optimizer=SGD, steps=1)
    with pytest.raises(ValueError, match="steps"):
        compare_training(_lstm(), xs, ys, optimizer=SGD, steps=0)
    with pytest.raises(TypeError, match="LSTMCell"):
        compare_training(torch.nn.LSTMCell(3, 5), xs, ys, optimizer=SGD, steps=1)


def test_the_jax_module_is_the_converted_one_by_default():
    """The training report names every torch parameter (the conversion covers them all)."""
    xs, ys = _lstm_data()
    lstm = _lstm()
    report = compare_training(lstm, xs, ys, optimizer=SGD, steps=1)
    names = {c.tensor for c in report.checks if c.tensor.startswith("param/")}
    assert names == {f"param/{n}" for n, _ in lstm.named_parameters()}
