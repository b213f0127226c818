"""Training parity: the same TBPTT run in torch and JAX, and the mismatches it must catch.

Every case trains from the same weights over cycling chunks with the carry cut at each chunk
boundary; the report checks the loss and every parameter after every step. Module kinds: the
LSTM and ConvLSTM (carry ``(h, c)``), the GRU and the RNN with relu (carry ``h``). Sizes are tiny
and shared between cases, so the JAX gradient program compiles once per module kind.
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


def _gru(dtype=F64) -> torch.nn.GRU:
    torch.manual_seed(2)
    return torch.nn.GRU(3, 5, batch_first=True, dtype=dtype)


def _rnn_relu(dtype=F64) -> torch.nn.RNN:
    torch.manual_seed(3)
    return torch.nn.RNN(3, 5, nonlinearity="relu", batch_first=True, dtype=dtype)


def _convlstm() -> torch_impl.ConvLSTM2d:
    torch.manual_seed(1)
    return torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True, dtype=F64)


def _convlstm_data():
    return _data((2, 3, 2, 4, 4), (2, 3, 3, 4, 4))


MODULES = {
    "lstm": (_lstm, _lstm_data),
    "gru": (_gru, _lstm_data),
    "rnn_relu": (_rnn_relu, _lstm_data),
    "convlstm": (_convlstm, _convlstm_data),
}
ONE_TENSOR_STATE = {"gru": _gru, "rnn_relu": _rnn_relu}  # the carry is h alone


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


@pytest.mark.parametrize("kind", sorted(ONE_TENSOR_STATE))
@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd", "adam"])
def test_gru_and_rnn_twenty_steps_stay_within_1e_9(kind, optimizer, fused):
    """A GRU and a relu RNN (carry h alone), 20 float64 steps from a random h: the loss, every
    parameter and the final h agree within TRAINING_ATOL, and training does something."""
    xs, ys = _lstm_data()
    module = ONE_TENSOR_STATE[kind]()
    report = compare_training(module, xs, ys, optimizer=optimizer, steps=20, fused=fused,
                              initial_state="random")
    report.assert_ok()
    assert report.worst("param/") <= TRAINING_ATOL[F64] and report.worst("loss") <= TRAINING_ATOL[F64]
    names = {c.tensor for c in report.checks}
    assert {f"param/{n}" for n, _ in module.named_parameters()} <= names
    assert "h_n" in names and "c_n" not in names  # one state tensor, named as torch names it
    assert report.jax_losses[18] < report.jax_losses[0]


@pytest.mark.parametrize("kind", ["lstm", *sorted(ONE_TENSOR_STATE)])
def test_float32_within_its_bound(kind):
    xs, ys = _lstm_data(torch.float32)
    report = compare_training(MODULES[kind][0](torch.float32), xs, ys, optimizer=ADAM, steps=20)
    report.assert_ok()
    assert report.worst("param/") <= TRAINING_ATOL[torch.float32]


@pytest.mark.parametrize(
    "make",
    [lambda: torch_impl.StatefulGRU(3, 5, num_layers=2, dtype=F64),
     lambda: torch_impl.StatefulRNN(3, 5, nonlinearity="relu", bidirectional=True, dtype=F64)],
    ids=["stateful-gru-l2", "stateful-rnn-relu-bi"],
)  # fmt: skip
def test_stateful_gru_and_rnn_start_from_their_live_state(make):
    """A stateful module's live h (one tensor) is the initial state on both sides."""
    torch.manual_seed(4)
    stream = make()
    xs, ys = _data((2, 6, 3), (2, 6, stream.module.hidden_size * (2 if stream.module.bidirectional else 1)))
    with torch.no_grad():
        stream(torch.randn(2, 4, 3, dtype=F64))
    live = stream.get_state().clone()
    report = compare_training(stream, xs, ys, optimizer=ADAM, steps=4)
    report.assert_ok()
    assert torch.equal(stream.get_state(), live)  # a copy was trained
    # the same run from zeros differs at the first step: the live state was used
    zeros = compare_training(stream, xs, ys, optimizer=ADAM, steps=1,
                             initial_state=torch.zeros_like(live))
    assert zeros.torch_losses[0] != report.torch_losses[0]


def test_gru_initial_state_must_be_one_tensor():
    xs, ys = _lstm_data()
    h = torch.zeros(1, 2, 5, dtype=F64)
    with pytest.raises(TypeError, match=r"initial_state must be one tensor h for GRU, got a tuple of 2"):
        compare_training(_gru(), xs, ys, optimizer=SGD, steps=1, initial_state=(h, h))
    with pytest.raises(TypeError, match=r"initial_state must be a pair \(h, c\) for LSTM, got Tensor"):
        compare_training(_lstm(), xs, ys, optimizer=SGD, steps=1, initial_state=h)


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
    with pytest.raises(TypeError, match=r"needs an nn.LSTM, nn.GRU, nn.RNN or ConvLSTM2d, got GRUCell"):
        compare_training(torch.nn.GRUCell(3, 5), xs, ys, optimizer=SGD, steps=1)


@pytest.mark.parametrize("kind", ["lstm", *sorted(ONE_TENSOR_STATE)])
def test_the_jax_module_is_the_converted_one_by_default(kind):
    """The training report names every torch parameter (the conversion covers them all)."""
    xs, ys = _lstm_data()
    module = MODULES[kind][0]()
    report = compare_training(module, xs, ys, optimizer=SGD, steps=1)
    names = {c.tensor for c in report.checks if c.tensor.startswith("param/")}
    assert names == {f"param/{n}" for n, _ in module.named_parameters()}


def _swap_r_z(a):
    """Swaps the GRU's r and z gate blocks on the last axis (3H)."""
    r, z, n = jnp.split(a, 3, axis=-1)
    return jnp.concatenate([z, r, n], axis=-1)


def test_gru_trained_with_its_gates_swapped_is_caught():
    """A GRU port with r and z swapped (its weights permuted) fails from the first step."""
    from parity import to_jax

    xs, ys = _lstm_data()
    gru = _gru()
    with jax.enable_x64(True):
        module, variables = to_jax(gru)
        params = {"layer_0": {k: _swap_r_z(v) for k, v in variables["params"]["layer_0"].items()}}
    report = compare_training(gru, xs, ys, optimizer=SGD, steps=2, jax_module=module,
                              variables={"params": params})
    _fails(report)
    assert any(c.tensor == "loss" and c.run == "step 0" for c in report.failures)
