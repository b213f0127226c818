"""``compare``: run torch and JAX on the same weights and inputs, full and chunked, and report.

Everything is compared in torch's layout (so ``where`` indexes the torch tensors). Internally a
torch state is a tuple, ``(h, c)`` or ``(h,)``, and so is a JAX carry in torch's order; a
``Port`` says how to drive one JAX implementation with it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torch_impl

from .convert import (
    is_nnx,
    params_tree_as_torch,
    spec_for_torch,
    tensor_to_numpy,
    to_jax,
    torch_options,
)
from .custom import CustomPort
from .dropout import (
    deterministic_unless_masked,
    masked_forward,
    masks_to_jax,
    narrow_masks,
    resolve_dropout_masks,
)
from .mapping import ModuleSpec
from .report import Check, Report, bounds_for, check_against_truth, check_arrays
from .targets import TARGETS, target_of

__all__ = ["compare", "numerics", "resolve_chunks", "Port", "port_for"]


@contextlib.contextmanager
def numerics(dtype: torch.dtype) -> Iterator[None]:
    """Full-precision arithmetic on both sides for the duration of a comparison.

    x64 on the JAX side for float64 (scoped, restored after); highest matmul/conv precision in
    JAX and TF32 off in torch (both matter on GPU/TPU only; restored after).
    """
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            if dtype == torch.float64:
                stack.enter_context(jax.enable_x64(True))
            stack.enter_context(jax.default_matmul_precision("highest"))
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ------------------------------------------------------------------------------------ torch


def _time_axis(spec: ModuleSpec, module: Any, x: torch.Tensor) -> int:
    """Where time is in a torch input."""
    if spec.is_cell:
        return 0  # cells are fed a time-major sequence of steps
    batched = x.dim() == 2 + spec.feature_rank
    return 1 if (batched and module.batch_first) else 0


def _as_module_state(spec: ModuleSpec, state: Optional[tuple]) -> Any:
    """Our tuple state as the torch module takes it: ``(h, c)`` or the tensor ``h``."""
    if state is None or spec.cell_state:
        return state
    return state[0]


def _as_tuple(state: Any) -> tuple:
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def _torch_run(spec, module, x, state, lengths, masks=None) -> tuple[torch.Tensor, tuple]:
    """torch side: ``(y, state tuple)``; packed sequences for ``lengths``; layer by layer with
    the inter-layer keep ``masks`` (training-mode dropout made reproducible)."""
    if masks is not None:
        y, state = masked_forward(module, x, _as_module_state(spec, state), masks, lengths)
        return y, _as_tuple(state)
    if spec.is_cell:
        state = _as_module_state(spec, state)
        ys = []
        for step in x:
            state = module(step, state)
            ys.append(_as_tuple(state)[0])
        return torch.stack(ys), _as_tuple(state)
    if lengths is None:
        y, state = module(x, _as_module_state(spec, state))
        return y, _as_tuple(state)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, torch.as_tensor(lengths).cpu(), batch_first=module.batch_first, enforce_sorted=False
    )
    y, state = module(packed, _as_module_state(spec, state))
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(
        y, batch_first=module.batch_first, total_length=x.shape[_time_axis(spec, module, x)]
    )
    return y, _as_tuple(state)


# ------------------------------------------------------------------------------------ JAX


@dataclasses.dataclass(frozen=True)
class Port:
    """How the harness drives one JAX implementation of a torch module.

    Arguments:
        run: ``run(variables, x, carry, lengths, masks) -> (y, carry)``, pure and jittable:
            ``x`` in the JAX layout (channels-last for a ConvLSTM), ``carry`` a tuple in
            torch's order (``(h, c)`` or ``(h,)``), ``lengths`` ``(B,)`` or None, ``masks``
            inter-layer keep masks or None (dropout off).
        grads_as_torch: a gradient pytree of ``variables`` -> ``{torch name: array}`` in torch's
            layout; raises ValueError/TypeError when the port's parameters do not match.
    """

    run: Callable[..., tuple[Any, tuple]]
    grads_as_torch: Callable[[Any], dict[str, np.ndarray]]


def _apply_module(jax_module, is_cell: bool, variables, x, carry, lengths, masks=None):
    """A carryover Linen module (or a port with its ``apply`` signature) as ``Port.run``."""
    if is_cell:
        carry = carry if len(carry) == 2 else carry[0]
        carry, ys = jax.lax.scan(lambda c, xt: jax_module.apply(variables, c, xt), carry, x)
        return ys, _leaves(carry)
    carry = carry if len(carry) == 2 else carry[0]
    if masks is None:  # no dropout kwargs: a port made elsewhere need not know them
        y, carry = jax_module.apply(variables, x, carry, seq_lengths=lengths)
    else:
        y, carry = jax_module.apply(
            variables, x, carry, seq_lengths=lengths, deterministic=False, dropout_masks=masks
        )
    return y, _leaves(carry)


def _leaves(carry) -> tuple:
    return tuple(jax.tree_util.tree_leaves(carry))


def _is_hashable(obj) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def port_for(spec: ModuleSpec, torch_module: Any, jax_module: Any, variables: Any) -> tuple[Port, Any]:
    """``(port, variables)`` for a carryover module: a Linen one (``apply`` signature,
    carryover's parameter paths) with its variables, or a ``jax_impl.nnx`` one (its
    ``nnx.Param`` state becomes the variables)."""
    if isinstance(jax_module, CustomPort):
        return jax_module.port(spec, torch_module), variables
    foreign = target_of(jax_module)
    if foreign is not None:
        return foreign.port(spec, torch_module, jax_module, variables)
    options = torch_options(torch_module)
    if is_nnx(jax_module):
        return _nnx_port(spec, options, jax_module)
    run = functools.partial(_apply_module, jax_module, spec.is_cell)
    return Port(run, lambda grads: params_tree_as_torch(spec, options, grads)), variables


def _nnx_port(spec: ModuleSpec, options: dict, module: Any) -> tuple[Port, Any]:
    """An NNX module called as itself: ``nnx.merge`` of its graph, its parameters (the
    differentiated variables) and its other state, inside the jitted function."""
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def call(params, x, carry, lengths, masks):
        model = nnx.merge(graphdef, params, rest)
        carry = carry if len(carry) == 2 else carry[0]
        if spec.is_cell:
            carry, ys = jax.lax.scan(lambda c, xt: model(c, xt), carry, x)
            return ys, _leaves(carry)
        y, carry = model(x, carry, seq_lengths=lengths, deterministic=masks is None,
                         dropout_masks=masks)
        return y, _leaves(carry)

    def grads_as_torch(grads):
        return params_tree_as_torch(spec, options, nnx.to_pure_dict(grads))

    return Port(call, grads_as_torch), params


def _jitted(port: Port) -> tuple[Callable, Callable]:
    """``(run, loss_grads)`` jitted once per port: decided up front, not by catching errors
    from the call (which would hide a real error in the port)."""
    run = port.run
    if isinstance(run, functools.partial) and _is_hashable(run.args):
        # a hashable module: one program per configuration, reused across comparisons
        return (functools.partial(_run_jit, run.func, run.args),
                functools.partial(_grads_jit, run.func, run.args))
    return jax.jit(run), jax.jit(jax.grad(functools.partial(_loss, run), argnums=(0, 1, 2)))


def _call(func, args, *rest):
    return func(*args, *rest)


def _loss(run, variables, x, carry, lengths, weights, masks=None):
    y, final = run(variables, x, carry, lengths, masks)
    total = jnp.sum(y * weights[0])
    for state, w in zip(final, weights[1:]):
        total = total + jnp.sum(state * w)
    return total


_run_jit = jax.jit(_call, static_argnums=(0, 1))
_grads_jit = jax.jit(
    jax.grad(lambda func, args, *rest: _loss(functools.partial(func, *args), *rest),
             argnums=(2, 3, 4)),
    static_argnums=(0, 1),
)



def resolve_chunks(chunks: Union[None, int, str, Sequence[int]], num_steps: int, seed: int = 0):
    """A chunking as a list of lengths summing to ``num_steps`` (None: no chunked run)."""
    if chunks is None:
        return None
    if isinstance(chunks, str):
        if chunks != "random":
            raise ValueError(f'chunks must be an int, a list of lengths or "random", got {chunks!r}')
        rng = np.random.default_rng(seed)
        lengths, left = [], num_steps
        while left:
            n = int(rng.integers(1, max(2, num_steps // 3) + 1))
            lengths.append(min(n, left))
            left -= lengths[-1]
        return lengths
    if isinstance(chunks, (int, np.integer)) and not isinstance(chunks, bool):
        chunks = int(chunks)
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        return [chunks] * (num_steps // chunks) + ([num_steps % chunks] if num_steps % chunks else [])
    if not isinstance(chunks, (Sequence, np.ndarray)) or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in chunks
    ):
        raise TypeError(
            f'chunks must be an int, a list of int lengths or "random", got {chunks!r}'
        )
    lengths = [int(n) for n in chunks]
    if not lengths or sum(lengths) != num_steps or min(lengths) < 1:
        raise ValueError(
            f"chunk lengths {lengths} must be >= 1 and sum to the sequence length {num_steps}, "
            f"got sum {sum(lengths)}"
        )
    return lengths


def _describe(module: torch.nn.Module) -> str:
    return f"{type(module).__name__}({module.extra_repr()})"


def _random_like(state: tuple, generator) -> tuple:
    return tuple(torch.randn(s.shape, dtype=s.dtype, generator=generator) for s in state)


def _to_jax_layout(spec: ModuleSpec, tensor: torch.Tensor) -> jax.Array:
    return jnp.asarray(np.ascontiguousarray(spec.activation.to_jax(tensor_to_numpy(tensor))))


def _to_torch_layout(spec: ModuleSpec, array: Any) -> np.ndarray:
    return np.asarray(spec.activation.to_torch(np.asarray(array)))


def compare(
    torch_module: torch.nn.Module,
    x: Any,
    *,
    jax_module: Any = None,
    variables: Any = None,
    chunks: Union[None, int, str, Sequence[int]] = None,
    initial_state: Any = None,
    seq_lengths: Any = None,
    grads: bool = False,
    dtype: Optional[torch.dtype] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    seed: int = 0,
    dropout_masks: Union[None, str, Sequence[Any]] = None,
    jax_dropout_masks: Optional[Sequence[Any]] = None,
    target: str = "linen",
) -> Report:
    """Runs torch and JAX on the same weights and input and reports how far apart they are.

    Arguments:
        torch_module: nn.LSTM, nn.GRU, nn.RNN, their cells, torch_impl.ConvLSTM2d /
            ConvLSTMCell, or a torch_impl stateful module (its live state is the default
            initial state).
        x: the input in torch's layout (a cell takes a time-major sequence of steps).
        jax_module, variables: a JAX port to validate; default ``to_jax(torch_module,
            target=target)``, converted in ``dtype``. A ``jax_impl.nnx`` module needs no
            variables (it holds them).
        chunks: also run chunk by chunk with the state carried on both sides: an int (chunk
            length), a list of lengths, or ``"random"``.
        initial_state: torch's state (``(h, c)``, or ``h`` for a GRU / RNN), ``"random"``, or
            None (zeros).
        seq_lengths: ``(B,)`` lengths (nn.LSTM / GRU / RNN: torch runs a packed sequence).
        grads: also compare gradients of a scalar loss w.r.t. the input, the initial state and
            every parameter (matched by torch name).
        dtype: run both sides in this dtype (default: the module's). ``torch.bfloat16`` has
            no fixed bound: a float64 run of the same (bfloat16) weights and inputs is the
            truth, and each tensor passes when JAX's largest error against it is at most twice
            torch's own plus 2^-8 of its scale ("JAX bf16 is no worse than torch bf16"); the
            note of each check gives torch's error. Outputs and final states only.
        rtol, atol: override the bounds (atol replaces the forward bound).
        seed: for random states, chunkings, loss weights and random dropout masks.
        dropout_masks: run both sides in training mode with these inter-layer dropout keep
            masks (``dropout > 0`` and ``num_layers > 1`` only): ``"random"`` draws them from
            ``seed``, or one tensor per gap between layers (bool or 0/1), in the input's layout
            and shaped like that layer's output (``draw_dropout_masks`` shows the shapes).
            Both sides compute ``y * keep / (1 - p)`` like F.dropout; torch runs layer by layer
            (``masked_forward``) since its fused kernels cannot take a mask. Chunked runs use
            each chunk's slice of the masks. None (default): dropout off on both sides (the
            torch module runs in eval mode, JAX with ``deterministic=True``).
        jax_dropout_masks: other masks for the JAX side only (default: the same); a mismatch
            the report must catch, for testing the harness.
        target: the port to validate when ``jax_module`` is None: a ``to_jax`` target name
            (``parity.targets.TARGETS``; default ``"linen"``). A target that cannot express the
            module raises ``to_jax``'s ValueError.

    Returns:
        A ``Report``.

    Example:
        >>> report = compare(torch.nn.LSTM(8, 16, batch_first=True), torch.randn(4, 50, 8),
        ...                  chunks="random", initial_state="random", grads=True)
        >>> report.assert_ok()
        >>> report.ok
        True
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if jax_module is not None and target != "linen":
        raise ValueError(
            f"pass jax_module or target, not both: jax_module is the port to validate, "
            f"target={target!r} names one for compare to convert"
        )
    if isinstance(torch_module, torch_impl.StatefulWrapper):
        if initial_state is None:
            initial_state = torch_module.get_state()
        torch_module = torch_module.module
    spec = spec_for_torch(torch_module)
    module_dtype = next(torch_module.parameters()).dtype
    tensor_to_numpy(next(torch_module.parameters()))  # a meta module: say so before running it
    dtype = dtype or module_dtype
    if dtype != module_dtype:
        torch_module = copy.deepcopy(torch_module).to(dtype)
    low_precision = dtype == torch.bfloat16
    truth_module = None
    if low_precision:
        if grads or dropout_masks is not None:
            raise ValueError(
                "dtype=torch.bfloat16 compares outputs and final states against a float64 "
                "truth; grads and dropout_masks are not supported in bfloat16"
            )
        truth_module = copy.deepcopy(torch_module).to(torch.float64)
        forward_atol, grad_rtol = 0.0, 0.0
    else:
        forward_atol, grad_rtol = bounds_for(dtype)
    forward_atol = forward_atol if atol is None else atol
    rtol = rtol or 0.0
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    if seq_lengths is not None:
        if spec.is_cell or spec.feature_rank != 1:
            raise ValueError(
                "seq_lengths is supported for nn.LSTM, nn.GRU and nn.RNN, got "
                f"{type(torch_module).__name__}"
            )
        if chunks is not None:
            raise ValueError("seq_lengths and chunks cannot be combined (torch cannot pack a chunk with empty rows)")
        seq_lengths = np.asarray(seq_lengths)
    masks_t, masks_j = resolve_dropout_masks(
        spec, torch_module, x, dropout_masks, jax_dropout_masks, generator
    )

    report = Report(_describe(torch_module), str(dtype).replace("torch.", ""))
    with numerics(dtype), deterministic_unless_masked(torch_module, masks_t):
        if jax_module is None:  # inside numerics: float64 weights convert with x64 on
            jax_module, variables = to_jax(torch_module, target=target)
        port, variables = port_for(spec, torch_module, jax_module, variables)
        run, loss_grads = _jitted(port)

        def run_jax(x_t, carry, lengths, masks):
            lengths = None if lengths is None else jnp.asarray(lengths)
            return run(variables, _to_jax_layout(spec, x_t), carry, lengths,
                       masks_to_jax(spec, masks))

        with torch.no_grad():
            if isinstance(initial_state, str):
                if initial_state != "random":
                    raise ValueError(f'initial_state must be a state, "random" or None, got {initial_state!r}')
                template = _torch_run(spec, torch_module, x, None, None)[1]
                initial_state = _random_like(template, generator)
            elif initial_state is None:
                # explicit zeros: the same JAX program then serves every chunk
                template = _torch_run(spec, torch_module, x, None, seq_lengths)[1]
                initial_state = tuple(torch.zeros_like(s) for s in template)
            else:
                initial_state = _state_tuple(spec, initial_state)
            initial_state = tuple(t.to(dtype) for t in initial_state)
            carry0 = tuple(_to_jax_layout(spec, s) for s in initial_state)

            truth = None
            if truth_module is not None:  # float64 on the same bfloat16 values
                truth = _torch_run(spec, truth_module, x.double(),
                                   tuple(s.double() for s in initial_state), seq_lengths)

            def add_checks(run_name, y_t, state_t, y_j, carry_j):
                _add_forward_checks(report, spec, run_name, y_t, state_t, y_j, carry_j,
                                    forward_atol, rtol, truth)

            # full sequence
            y_t, state_t = _torch_run(spec, torch_module, x, initial_state, seq_lengths, masks_t)
            y_j, carry_j = run_jax(x, carry0, seq_lengths, masks_j)
            add_checks("full", y_t, state_t, y_j, carry_j)

            # chunked, the state carried on both sides
            time_axis = _time_axis(spec, torch_module, x)
            lengths = resolve_chunks(chunks, x.shape[time_axis], seed)
            if lengths is not None:
                state_t, carry_j, ys_t, ys_j, start = initial_state, carry0, [], [], 0
                for n in lengths:
                    chunk = x.narrow(time_axis, start, n)
                    y, state_t = _torch_run(
                        spec, torch_module, chunk, state_t, None,
                        narrow_masks(masks_t, time_axis, start, n),
                    )
                    ys_t.append(y)
                    y, carry_j = run_jax(chunk, carry_j, None,
                                         narrow_masks(masks_j, time_axis, start, n))
                    ys_j.append(y)
                    start += n
                run_name = "chunks " + "+".join(map(str, lengths))
                y_t = torch.cat(ys_t, time_axis)
                y_j = jnp.concatenate(ys_j, axis=time_axis)
                add_checks(run_name, y_t, state_t, y_j, carry_j)

        if grads:
            _add_grad_checks(
                report, spec, torch_module, port, loss_grads, variables, x, initial_state,
                seq_lengths, grad_rtol, generator, masks_t, masks_j,
            )
    return report


def _state_tuple(spec: ModuleSpec, state: Any) -> tuple:
    """A user's torch state as our tuple, checked to be the module's kind."""
    if spec.cell_state:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"initial_state must be a pair (h, c), got {type(state).__name__}")
        return tuple(torch.as_tensor(s) for s in state)
    if isinstance(state, (tuple, list)):
        raise TypeError(
            f"initial_state must be one tensor h, got a {type(state).__name__} of {len(state)} "
            "(an LSTM's (h, c)?)"
        )
    return (torch.as_tensor(state),)


def _add_forward_checks(report, spec, run, y_t, state_t, y_j, carry_j, atol, rtol, truth=None):
    """Output and final-state checks: within ``atol`` of torch, or (``truth``, a float64 run
    ``(y, state)``) no worse than torch against the truth."""
    if truth is not None:
        got = [y_j, *carry_j]
        refs = [y_t, *state_t]
        exact = [truth[0], *truth[1]]
        names = ["output"] + [f"{n}_n" for n in spec.state_names]
        for name, g, r, t in zip(names, got, refs, exact):
            report.checks.append(check_against_truth(
                run, name, _to_torch_layout(spec, np.asarray(g, np.float64)),
                tensor_to_numpy(r.double()), tensor_to_numpy(t)))
        return
    pairs = [("output", y_j, y_t)]
    if len(carry_j) != len(state_t):
        report.checks.append(Check(run, "carry", math.inf, math.inf, None, atol, False,
                                   f"the port returned {len(carry_j)} carry arrays, torch "
                                   f"{len(state_t)}"))
    pairs += [(f"{name}_n", got, ref)
              for name, got, ref in zip(spec.state_names, carry_j, state_t)]
    for name, got, ref in pairs:
        report.checks.append(
            check_arrays(run, name, _to_torch_layout(spec, got), tensor_to_numpy(ref), atol, rtol)
        )


def _add_grad_checks(
    report, spec, torch_module, port, loss_grads, variables, x, initial_state, seq_lengths,
    grad_rtol, generator, masks_t=None, masks_j=None,
):
    """Gradients of ``Σ y·a + Σ h_n·b (+ Σ c_n·d)`` (a, b, d random) on both sides."""
    x_t = x.detach().clone().requires_grad_(True)
    state0 = tuple(s.detach().clone().requires_grad_(True) for s in initial_state)
    torch_module.zero_grad(set_to_none=True)
    y_t, final_t = _torch_run(spec, torch_module, x_t, state0, seq_lengths, masks_t)
    weights = _random_like((y_t, *final_t), generator)
    loss = sum((t * w).sum() for t, w in zip((y_t, *final_t), weights))
    loss.backward()
    torch_grads = {name: p.grad for name, p in torch_module.named_parameters()}

    lengths_j = None if seq_lengths is None else jnp.asarray(seq_lengths)
    g_vars, g_x, g_carry = loss_grads(
        variables, _to_jax_layout(spec, x), tuple(_to_jax_layout(spec, s) for s in state0),
        lengths_j, tuple(_to_jax_layout(spec, w) for w in weights), masks_to_jax(spec, masks_j),
    )
    run = "full"
    report.checks.append(check_arrays(run, "grad/input", _to_torch_layout(spec, g_x),
                                      tensor_to_numpy(x_t.grad), grad_rtol, relative_to_max=True))
    for name, g, s in zip(spec.state_names, g_carry, state0):
        report.checks.append(check_arrays(run, f"grad/{name}_0", _to_torch_layout(spec, g),
                                          tensor_to_numpy(s.grad), grad_rtol,
                                          relative_to_max=True))
    try:
        jax_grads = port.grads_as_torch(g_vars)
    except (ValueError, TypeError) as error:  # the port's parameters are not torch's
        report.checks.append(Check(run, "grad/params", math.inf, math.inf, None, grad_rtol, False,
                                   f"parameters do not match torch's: {error}"))
        return
    for name, ref in torch_grads.items():
        if name not in jax_grads:
            report.checks.append(Check(run, f"grad/{name}", math.inf, math.inf, None, grad_rtol,
                                       False, "no such parameter in the JAX port"))
            continue
        report.checks.append(check_arrays(run, f"grad/{name}", jax_grads[name],
                                          tensor_to_numpy(ref), grad_rtol, relative_to_max=True))
