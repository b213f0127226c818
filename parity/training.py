"""``compare_training``: the same truncated-BPTT training run in torch and in JAX, step by step.

Works for nn.LSTM, nn.GRU, nn.RNN and torch_impl.ConvLSTM2d (and the torch_impl stateful modules
around them). Both sides start from the same weights, see the same chunks, carry the state
(``(h, c)``, or ``h`` alone for a GRU / RNN) from chunk to chunk with the graph cut at each
boundary (torch: ``StatefulWrapper`` with ``detach=True``;
JAX: ``jax_impl.functional.stream_step``'s ``stop_gradient``), and update with matching optimizers
(``make_optimizers``). The report checks the loss and every parameter (torch names) after
every step, in ``compare``'s ``Report``/``Check`` format.

How the optimizers correspond (checked by ``parity/tests/test_training.py``):

- SGD: torch's momentum buffer starts as the first gradient and then is ``m*b + g`` (dampening
  0); optax.trace starts from zeros and is ``g + m*t``: the first step gives ``g`` too, so the
  two agree from the first step, nesterov (``g + m*b``) included. weight_decay adds ``wd*p`` to
  the gradient first in both (optax.add_decayed_weights ahead of the trace).
- Adam: both divide by ``sqrt(v_hat) + eps`` (optax.adam's ``eps``; its ``eps_root`` would sit
  inside the square root and must stay 0). Mathematically identical; the order of the
  operations differs (torch: lerp for m, ``sqrt(v)/sqrt(bc2)``, ``lr/bc1`` folded into the
  step), so the results differ by rounding only.
- AdamW: torch multiplies the parameter by ``1 - lr*wd`` before the Adam step; optax.adamw adds
  ``wd*p`` (the parameter before the step) to the Adam update and scales the sum by ``-lr``:
  ``p - lr*wd*p - lr*u`` either way, equal to rounding.
- Clipping: torch's ``min(max_norm / (norm + 1e-6), 1)`` differs from optax.clip_by_global_norm
  by ``1e-6/norm`` relative, so the JAX side uses ``jax_impl.clip_by_global_norm_torch``.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_impl
import torch_impl

from .convert import jax_params_as_torch, spec_for_torch, state_to_jax, to_jax
from .harness import _is_hashable, numerics
from .report import Check, Report, check_arrays

__all__ = ["compare_training", "make_optimizers", "TrainingReport", "TRAINING_ATOL"]

# Largest abs difference of the loss and of any parameter, at any step.
TRAINING_ATOL = {torch.float64: 1e-9, torch.float32: 1e-4}

OptimizerSpec = Union[str, tuple[str, Mapping[str, Any]]]
TorchOptimizerFactory = Callable[[Any], torch.optim.Optimizer]

_TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# flags that change nothing numerically (implementation choices)
_NEUTRAL = {"foreach", "fused", "capturable", "differentiable"}


# ------------------------------------------------------------------------------- optimizers


def make_optimizers(
    optimizer: OptimizerSpec, *, clip_norm: Optional[float] = None
) -> tuple[TorchOptimizerFactory, optax.GradientTransformation]:
    """The torch optimizer and the optax transformation that follow the same update rule.

    Arguments:
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, or a pair ``(name, kwargs)`` with
            torch's keyword arguments, e.g. ``("sgd", dict(lr=0.1, momentum=0.9,
            nesterov=True))``, ``("adam", dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8))``,
            ``("adamw", dict(lr=1e-3, weight_decay=0.01))``. Missing values take torch's
            defaults (read from torch itself, so both sides always use the same numbers).
        clip_norm: clip gradients by global norm first (torch.nn.utils.clip_grad_norm_ on
            the torch side, ``jax_impl.clip_by_global_norm_torch`` in the optax chain).

    Returns:
        ``(torch_factory, optax_transformation)``; ``torch_factory(module.parameters())``
        builds the torch optimizer. Clipping is not part of the torch optimizer: call
        clip_grad_norm_ before ``step()``.

    Example:
        >>> make_torch, tx = make_optimizers(("adamw", dict(lr=1e-3, weight_decay=0.01)))
        >>> opt = make_torch(torch.nn.LSTM(3, 8).parameters())
        >>> opt_state = tx.init({"w": jnp.zeros(3)})
    """
    name, kwargs = _parse_spec(optimizer)
    torch_class = _TORCH_OPTIMIZERS[name]
    probe = torch.zeros(1, requires_grad=True)
    try:
        hyper = dict(torch_class([probe], **kwargs).defaults)  # torch's defaults filled in
    except TypeError as error:
        raise TypeError(f"optimizer {name!r}: {error}") from None
    hyper = {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in hyper.items()}
    _reject_unsupported(name, hyper)

    lr, wd = float(hyper["lr"]), float(hyper.get("weight_decay", 0.0))
    parts: list[optax.GradientTransformation] = []
    if clip_norm is not None:
        parts.append(jax_impl.clip_by_global_norm_torch(float(clip_norm)))
    decoupled = name == "adamw" or bool(hyper.get("decoupled_weight_decay", False))
    if name == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd))  # torch: g + wd*p before the momentum
        momentum = float(hyper["momentum"])
        parts.append(optax.sgd(lr, momentum=momentum or None, nesterov=bool(hyper["nesterov"])))
    else:
        b1, b2 = (float(b) for b in hyper["betas"])
        eps = float(hyper["eps"])
        if decoupled:
            parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, eps_root=0.0, weight_decay=wd))
        else:
            if wd:
                parts.append(optax.add_decayed_weights(wd))  # Adam's L2: into the gradient
            parts.append(optax.adam(lr, b1=b1, b2=b2, eps=eps, eps_root=0.0))
    tx = parts[0] if len(parts) == 1 else optax.chain(*parts)
    return functools.partial(torch_class, **kwargs), tx


def _parse_spec(optimizer: OptimizerSpec) -> tuple[str, dict]:
    if isinstance(optimizer, str):
        name, kwargs = optimizer, {}
    elif isinstance(optimizer, (tuple, list)) and len(optimizer) == 2 and isinstance(optimizer[0], str):
        name, kwargs = optimizer[0], dict(optimizer[1] or {})
    else:
        raise TypeError(
            f'optimizer must be a name or a pair (name, kwargs), e.g. ("adam", dict(lr=1e-3)), '
            f"got {optimizer!r}"
        )
    name = name.lower()
    if name not in _TORCH_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(_TORCH_OPTIMIZERS)}, got {name!r}")
    return name, kwargs


def _reject_unsupported(name: str, hyper: dict) -> None:
    """Options with no optax counterpart here: an error rather than a silent mismatch."""
    if hyper.get("maximize"):
        raise ValueError(f"optimizer {name!r}: maximize=True is not supported")
    if hyper.get("amsgrad"):
        raise ValueError(f"optimizer {name!r}: amsgrad=True is not supported")
    if name == "sgd" and hyper.get("dampening", 0.0):
        raise ValueError(
            f"optimizer 'sgd': dampening={hyper['dampening']} is not supported (torch's first "
            "step ignores it, optax.trace has no such rule); expected 0"
        )
    if name == "sgd" and hyper.get("nesterov") and not hyper.get("momentum"):
        raise ValueError("optimizer 'sgd': nesterov=True needs momentum > 0")


# ----------------------------------------------------------------------------------- report


@dataclass
class TrainingReport(Report):
    """``compare_training``'s outcome: the checks, and both loss curves."""

    torch_losses: list[float] = field(default_factory=list)
    jax_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "torch_losses": self.torch_losses, "jax_losses": self.jax_losses}


# ----------------------------------------------------------------------------------- losses


def _torch_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(output, target)


def _resolve_loss(loss) -> tuple[Callable, Callable]:
    if isinstance(loss, str):
        if loss != "mse":
            raise ValueError(f'loss must be "mse" or a pair (torch_fn, jax_fn), got {loss!r}')
        return _torch_mse, jax_impl.mse_loss
    if isinstance(loss, (tuple, list)) and len(loss) == 2 and all(map(callable, loss)):
        return loss[0], loss[1]
    raise TypeError(f'loss must be "mse" or a pair of callables (torch_fn, jax_fn), got {loss!r}')


# ---------------------------------------------------------------------------------- JAX side


def _chunk_objective(module, loss_fn, params, carry, x, y):
    """The loss of one chunk from a carry cut from the graph (``stream_step``)."""
    out, carry = jax_impl.functional.stream_step(module, {"params": params}, carry, x)
    return loss_fn(out, y), carry


# Static on the module and the loss: every comparison of one configuration reuses the program,
# whatever the optimizer (the optimizer's update is a small separate program).
_value_and_grad = jax.jit(
    jax.value_and_grad(_chunk_objective, argnums=2, has_aux=True), static_argnums=(0, 1)
)


def _split_step(module, loss_fn, tx):
    """``step(variables, opt_state, carry, x, y)`` in two parts: the cached gradient program,
    then the optimizer's update (op by op)."""

    # not jitted: a few elementwise ops per parameter run at once, faster than compiling them
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if _is_hashable(module) and _is_hashable(loss_fn):
        # one program per configuration, reused by every comparison of it
        value_and_grad = functools.partial(_value_and_grad, module, loss_fn)
    else:  # decided up front: an error inside the step must never select another path
        value_and_grad = jax.jit(jax.value_and_grad(
            functools.partial(_chunk_objective, module, loss_fn), has_aux=True
        ))

    def step(variables, opt_state, carry, x, y):
        (loss, carry), grads = value_and_grad(variables["params"], carry, x, y)
        params, opt_state = update(grads, opt_state, variables["params"])
        return {**variables, "params": params}, opt_state, carry, loss

    return step


# ------------------------------------------------------------------------------- comparison


def _as_tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t.detach().to(dtype)


def _describe_run(module: torch.nn.Module, optimizer: OptimizerSpec, clip_norm, steps: int) -> str:
    name, kwargs = _parse_spec(optimizer)
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    clip = f" clip_norm={clip_norm}" if clip_norm is not None else ""
    return f"{type(module).__name__}({module.extra_repr()}) {name}({args}){clip} x{steps} steps"


def compare_training(
    torch_module: torch.nn.Module,
    chunks: Sequence[Any],
    targets: Sequence[Any],
    *,
    optimizer: OptimizerSpec,
    steps: int,
    loss: Union[str, tuple[Callable, Callable]] = "mse",
    clip_norm: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    initial_state: Any = None,
    jax_module: Any = None,
    variables: Any = None,
    jax_optimizer: Optional[optax.GradientTransformation] = None,
    reset_each_cycle: bool = True,
    fused: bool = False,
    atol: Optional[float] = None,
    seed: int = 0,
) -> TrainingReport:
    """Trains a copy of ``torch_module`` and its JAX port side by side and reports the drift.

    Each step takes the next chunk (cycling through ``chunks``/``targets``), runs it from the
    carried state, takes the loss against the target, back-propagates through that chunk only
    (the state is detached / stop_gradient-ed at the chunk boundary), clips if asked, and
    updates the parameters. Dropout is off on both sides (torch in eval mode).

    Arguments:
        torch_module: nn.LSTM, nn.GRU, nn.RNN or torch_impl.ConvLSTM2d, or a torch_impl
            stateful module around one (StatefulLSTM, StatefulGRU, StatefulRNN, ...; its live
            state is the default initial state; its ``detach`` setting is kept, so
            ``detach=False`` shows what an uncut carry does). Not modified: a copy is trained.
        chunks: input chunks in the torch module's layout (tensors or arrays), consecutive
            pieces of one sequence.
        targets: one target per chunk, shaped like the module's output for it.
        optimizer: a spec for ``make_optimizers``, e.g. ``("adam", dict(lr=1e-3))``.
        steps: training steps (one chunk each).
        loss: ``"mse"`` or a pair ``(torch_fn, jax_fn)``, each ``fn(output, target) -> scalar``
            in its own framework and layout (JAX: channels-last for the ConvLSTM).
        clip_norm: gradient clipping by global norm (torch's formula on both sides).
        dtype: run both sides in this dtype (default: the module's); float64 scopes JAX's x64.
        initial_state: torch's state (``(h, c)``, or the tensor ``h`` for a GRU / RNN),
            ``"random"`` or None (zeros): the state at step 0 and after each reset.
        jax_module, variables: a JAX port to train instead of ``to_jax(torch_module)``.
        jax_optimizer: an optax transformation for the JAX side instead of the one matching
            ``optimizer`` (clipping included): for checking that a mismatch is caught.
        reset_each_cycle: start again from ``initial_state`` each time the chunks start over.
        fused: run the JAX side with ``jax_impl.make_tbptt_step`` (one jitted program per
            step, what a JAX training loop runs); default: the same step in two parts, a
            gradient program cached per module and the optimizer's update op by op, so a
            series of comparisons compiles once.
        atol: the bound on the loss and the parameters (default ``TRAINING_ATOL[dtype]``).
        seed: for a random initial state.

    Returns:
        A ``TrainingReport``: checks ``loss`` and ``param/<torch name>`` at every step (run
        ``"step k"``), ``h_n`` (and ``c_n``) after the last step, and both loss curves. An exception
        in a torch step (e.g. backward through a freed graph when the carry is not detached)
        is a failing check of that step, and the run stops there.

    Example:
        >>> lstm = torch.nn.LSTM(3, 8, batch_first=True, dtype=torch.float64)
        >>> xs = [torch.randn(2, 10, 3, dtype=torch.float64) for _ in range(4)]
        >>> ys = [torch.randn(2, 10, 8, dtype=torch.float64) for _ in range(4)]
        >>> report = compare_training(lstm, xs, ys, optimizer=("adam", dict(lr=1e-2)), steps=20)
        >>> report.assert_ok()
        >>> report.worst("param/") < 1e-12
        True
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if len(chunks) == 0 or len(chunks) != len(targets):
        raise ValueError(
            f"chunks and targets must be non-empty and of equal length, got {len(chunks)} chunks "
            f"and {len(targets)} targets"
        )
    stateful = isinstance(torch_module, torch_impl.StatefulWrapper)
    spec = spec_for_torch(torch_module.module if stateful else torch_module)
    if spec.is_cell:
        raise TypeError(
            "compare_training needs an nn.LSTM, nn.GRU, nn.RNN or ConvLSTM2d, got "
            f"{type(torch_module).__name__}"
        )
    if stateful:
        stream = copy.deepcopy(torch_module)
        if initial_state is None:
            initial_state = stream.get_state()
    else:
        stream = torch_impl.StatefulWrapper(copy.deepcopy(torch_module), detach=True)
    model = stream.module
    dtype = dtype or next(model.parameters()).dtype
    if dtype not in TRAINING_ATOL:
        raise TypeError(f"dtype {dtype} has no training bound; expected torch.float32 or torch.float64")
    model.to(dtype).eval()  # eval: no dropout on either side; gradients are unaffected
    bound = TRAINING_ATOL[dtype] if atol is None else atol
    torch_loss, jax_loss = _resolve_loss(loss)
    make_torch_opt, tx = make_optimizers(optimizer, clip_norm=clip_norm)
    tx = jax_optimizer if jax_optimizer is not None else tx
    xs = [_as_tensor(c, dtype) for c in chunks]
    ys = [_as_tensor(t, dtype) for t in targets]
    initial_state = _initial_state(spec, model, xs[0], initial_state, dtype, seed)
    module_state = initial_state if spec.cell_state else initial_state[0]  # (h, c) or h

    report = TrainingReport(_describe_run(model, optimizer, clip_norm, steps), str(dtype).replace("torch.", ""))
    with numerics(dtype):
        if jax_module is None:
            jax_module, variables = to_jax(model)
        to_jax_layout = spec.activation.to_jax
        as_jax = lambda t: jnp.asarray(np.ascontiguousarray(to_jax_layout(t.numpy())))
        xs_j, ys_j = [as_jax(x) for x in xs], [as_jax(y) for y in ys]
        if fused:
            step_j = jax_impl.make_tbptt_step(jax_module, tx, jax_loss)
        else:
            step_j = _split_step(jax_module, jax_loss, tx)
        opt_state = tx.init(variables["params"])
        torch_opt = make_torch_opt(model.parameters())

        carry, final = None, None
        for k in range(steps):
            i = k % len(xs)
            run = f"step {k}"
            if k == 0 or (i == 0 and reset_each_cycle):
                stream.set_state(module_state)
                carry = state_to_jax(spec, module_state)  # fresh arrays: the step donates them
            # torch: one TBPTT step
            try:
                out = stream(xs[i])
                value = torch_loss(out, ys[i])
                torch_opt.zero_grad(set_to_none=True)
                value.backward()
                if clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                torch_opt.step()
            except Exception as error:  # a torch training loop that cannot run is a mismatch
                report.checks.append(Check(run, "torch step", math.inf, math.inf, None, bound, False,
                                           f"torch raised {type(error).__name__}: {str(error)[:200]}"))
                break
            # JAX: the same step
            variables, opt_state, carry, value_j = step_j(variables, opt_state, carry, xs_j[i], ys_j[i])
            report.torch_losses.append(float(value.detach()))
            report.jax_losses.append(float(value_j))
            report.checks.append(check_arrays(run, "loss", np.asarray(value_j), value.detach().numpy(), bound))
            jax_params = jax_params_as_torch(jax_module, variables)
            for name, p in model.named_parameters():
                report.checks.append(check_arrays(run, f"param/{name}", jax_params[name],
                                                  p.detach().numpy(), bound))
            final = (run, _as_tuple(stream.get_state()), jax.tree_util.tree_leaves(carry))

        if final is not None:
            run, state_t, carry_j = final
            to_torch_layout = spec.activation.to_torch
            if len(carry_j) != len(state_t):
                report.checks.append(Check(run, "carry", math.inf, math.inf, None, bound, False,
                                           f"the port carries {len(carry_j)} arrays, torch "
                                           f"{len(state_t)}"))
            for name, got, ref in zip(spec.state_names, carry_j, state_t):
                report.checks.append(check_arrays(run, f"{name}_n", to_torch_layout(np.asarray(got)),
                                                  ref.detach().numpy(), bound))
    return report


def _as_tuple(state: Any) -> tuple:
    """A torch state as a tuple: ``(h, c)`` stays, the one tensor ``h`` becomes ``(h,)``."""
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _initial_state(spec, model, x0: torch.Tensor, initial_state, dtype, seed: int) -> tuple:
    """The state at step 0 as a tuple (``(h, c)`` or ``(h,)``), explicit (zeros for None) so
    both sides start from the same one."""
    if initial_state is not None and not isinstance(initial_state, str):
        if spec.cell_state and not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise TypeError(
                f"initial_state must be a pair (h, c) for {type(model).__name__}, got "
                f"{type(initial_state).__name__}"
            )
        if not spec.cell_state and isinstance(initial_state, (tuple, list)):
            raise TypeError(
                f"initial_state must be one tensor h for {type(model).__name__}, got a "
                f"{type(initial_state).__name__} of {len(initial_state)} (an LSTM's (h, c)?)"
            )
        return tuple(_as_tensor(s, dtype) for s in _as_tuple(initial_state))
    with torch.no_grad():
        _, template = model(x0)
    template = _as_tuple(template)
    if initial_state is None:
        return tuple(torch.zeros_like(s) for s in template)
    if initial_state != "random":
        raise ValueError(f'initial_state must be a state, "random" or None, got {initial_state!r}')
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s.shape, dtype=dtype, generator=generator) for s in template)
