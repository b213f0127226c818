"""``compare``: run torch and JAX on the same weights and inputs, full and chunked, and report.

Everything is compared in torch's layout (so ``where`` indexes the torch tensors).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torch_impl

from .convert import (
    params_tree_as_torch,
    spec_for_torch,
    state_to_jax,
    to_jax,
    torch_options,
)
from .mapping import ModuleSpec

__all__ = [
    "Check", "Report", "compare", "numerics", "bounds_for", "resolve_chunks",
    "split_lstm", "masked_forward", "draw_dropout_masks",
]

# DESIGN.md's numbers: max abs error on outputs and states; gradients relative to the largest.
FORWARD_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def bounds_for(dtype: torch.dtype) -> tuple[float, float]:
    """``(forward atol, gradient bound relative to the largest gradient)`` for a dtype."""
    if dtype not in FORWARD_ATOL:
        raise TypeError(f"dtype {dtype} has no parity bound; expected torch.float32 or torch.float64")
    return FORWARD_ATOL[dtype], GRAD_RTOL[dtype]


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


# ------------------------------------------------------------------------------------ report


@dataclass
class Check:
    """One tensor of one run: its largest errors and whether they are within the bound."""

    run: str  # "full", "chunks 3+5+2", ...
    tensor: str  # "output", "h_n", "c_n", "grad/input", "grad/weight_ih_l0", ...
    max_abs: float
    max_rel: float  # max abs error / max |reference|
    where: Optional[tuple]  # index of the largest abs error, torch layout
    bound: float
    ok: bool
    note: str = ""


@dataclass
class Report:
    """The outcome of ``compare``: a list of ``Check``s."""

    config: str
    dtype: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def worst(self, prefix: str = "") -> float:
        """The largest max abs error among checks whose tensor starts with ``prefix``."""
        values = [c.max_abs for c in self.checks if c.tensor.startswith(prefix)]
        return max(values) if values else float("nan")

    def assert_ok(self) -> None:
        """Raises AssertionError naming each failing tensor, run, error and where."""
        if not self.checks:
            raise AssertionError(f"{self.config} [{self.dtype}]: no checks ran")
        if self.failures:
            lines = [
                f"{c.tensor} ({c.run}): max abs {c.max_abs:.3g} > bound {c.bound:.3g}, "
                f"max rel {c.max_rel:.3g}, at {c.where}" + (f" [{c.note}]" if c.note else "")
                for c in self.failures
            ]
            raise AssertionError(
                f"{self.config} [{self.dtype}] does not match:\n  " + "\n  ".join(lines)
            )

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "dtype": self.dtype,
            "ok": self.ok,
            "checks": [
                {**asdict(c), "where": list(c.where) if c.where is not None else None}
                for c in self.checks
            ],
        }

    def __str__(self) -> str:
        header = f"{self.config} [{self.dtype}]: {'ok' if self.ok else 'MISMATCH'}"
        rows = [("run", "tensor", "max abs", "max rel", "bound", "ok")]
        for c in self.checks:
            rows.append(
                (c.run, c.tensor, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.bound:.3g}",
                 ("ok" if c.ok else "FAIL") + (f" ({c.note})" if c.note else ""))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join([header] + lines)


def check_arrays(
    run: str, tensor: str, got: np.ndarray, ref: np.ndarray, atol: float, rtol: float = 0.0,
    relative_to_max: bool = False,
) -> Check:
    """Compares ``got`` (JAX) with ``ref`` (torch). Non-finite values are never a match.

    With ``relative_to_max`` the bound is ``atol * max|ref|`` (gradients).
    """
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return Check(run, tensor, math.inf, math.inf, None, atol, False,
                     f"shape {got.shape} vs torch {ref.shape}")
    finite = np.isfinite(got) & np.isfinite(ref)
    note = ""
    if not finite.all():
        note = (f"non-finite: torch {int(np.size(ref) - np.isfinite(ref).sum())}, "
                f"jax {int(np.size(got) - np.isfinite(got).sum())}")
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: masked out just below
        err = np.where(finite, np.abs(got - ref), 0.0)
    scale = float(np.max(np.abs(np.where(finite, ref, 0.0)), initial=0.0))
    max_abs = float(err.max(initial=0.0))
    where = tuple(int(i) for i in np.unravel_index(int(err.argmax()), err.shape)) if err.size else None
    bound = atol * scale if relative_to_max else atol
    within = err <= bound + rtol * np.abs(ref) if rtol else err <= bound
    ok = bool(np.all(within)) and not note
    return Check(run, tensor, max_abs, max_abs / scale if scale else max_abs, where, bound, ok, note)


# ------------------------------------------------------------------------------------ runners


def _time_axis(spec: ModuleSpec, module: Any, x: torch.Tensor) -> int:
    """Where time is in a torch input."""
    if spec.kind.endswith("_cell"):
        return 0  # cells are fed a time-major sequence of steps
    batched = x.dim() == (3 if spec.kind == "lstm" else 5)
    return 1 if (batched and module.batch_first) else 0


def _torch_run(spec, module, x, state, lengths, masks=None):
    """torch side: ``(y, (h, c))``; packed sequences for ``lengths``; layer by layer with the
    inter-layer keep ``masks`` (training-mode dropout made reproducible)."""
    if masks is not None:
        return masked_forward(module, x, state, masks, lengths)
    if spec.kind.endswith("_cell"):
        if state is None:
            state = module(x[0])  # shape template
            state = tuple(torch.zeros_like(s) for s in state)
        ys = []
        for step in x:
            state = module(step, state)
            ys.append(state[0])
        return torch.stack(ys), tuple(state)
    if lengths is None:
        y, state = module(x, state)
        return y, tuple(state)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, torch.as_tensor(lengths).cpu(), batch_first=module.batch_first, enforce_sorted=False
    )
    y, state = module(packed, state)
    y, _ = torch.nn.utils.rnn.pad_packed_sequence(
        y, batch_first=module.batch_first, total_length=x.shape[_time_axis(spec, module, x)]
    )
    return y, tuple(state)


def _apply(jax_module, is_cell: bool, variables, x, carry, lengths, masks=None):
    """JAX side: ``(y, carry)``; a cell is scanned over a time-major sequence of steps.

    ``masks``: inter-layer keep masks in the JAX input's layout; given, the module runs in
    training mode (``deterministic=False``) with exactly these masks.
    """
    if is_cell:
        carry, ys = jax.lax.scan(lambda c, xt: jax_module.apply(variables, c, xt), carry, x)
        return ys, carry
    if masks is None:  # no dropout kwargs: a port made elsewhere need not know them
        return jax_module.apply(variables, x, carry, seq_lengths=lengths)
    return jax_module.apply(
        variables, x, carry, seq_lengths=lengths, deterministic=False, dropout_masks=masks
    )


def _loss(jax_module, is_cell, variables, x, carry, lengths, w_y, w_h, w_c, masks=None):
    y, (h, c) = _apply(jax_module, is_cell, variables, x, carry, lengths, masks)
    return jnp.sum(y * w_y) + jnp.sum(h * w_h) + jnp.sum(c * w_c)


# Static on the module, so repeated comparisons of one configuration reuse their programs.
_apply_jit = jax.jit(_apply, static_argnums=(0, 1))
_grads_jit = jax.jit(jax.grad(_loss, argnums=(2, 3, 4)), static_argnums=(0, 1))


def _jax_runner(spec, jax_module):
    """``run(variables, x, carry, lengths, masks=None) -> (y, carry)``, jitted."""
    is_cell = spec.kind.endswith("_cell")
    try:
        hash(jax_module)
        return functools.partial(_apply_jit, jax_module, is_cell)
    except TypeError:  # an unhashable port made elsewhere: jit it on its own
        return jax.jit(functools.partial(_apply, jax_module, is_cell))


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


def _random_like(state, generator) -> tuple:
    return tuple(torch.randn(s.shape, dtype=s.dtype, generator=generator) for s in state)


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
) -> Report:
    """Runs torch and JAX on the same weights and input and reports how far apart they are.

    Arguments:
        torch_module: nn.LSTM, nn.LSTMCell, torch_impl.ConvLSTM2d / ConvLSTMCell, or a torch_impl
            stateful module (its live state is the default initial state).
        x: the input in torch's layout (a cell takes a time-major sequence of steps).
        jax_module, variables: a JAX port to validate; default ``to_jax(torch_module)``.
        chunks: also run chunk by chunk with the state carried on both sides: an int (chunk
            length), a list of lengths, or ``"random"``.
        initial_state: torch ``(h, c)``, ``"random"``, or None (zeros).
        seq_lengths: ``(B,)`` lengths (nn.LSTM only: torch runs a packed sequence).
        grads: also compare gradients of a scalar loss w.r.t. the input, the initial state and
            every parameter (matched by torch name).
        dtype: run both sides in this dtype (default: the module's).
        rtol, atol: override the bounds (atol replaces DESIGN.md's forward bound).
        seed: for random states, chunkings, loss weights and random dropout masks.
        dropout_masks: run both sides in training mode with these inter-layer dropout keep
            masks (``dropout > 0`` and ``num_layers > 1`` only): ``"random"`` draws them from
            ``seed``, or one tensor per gap between layers (bool or 0/1), in the input's layout
            and shaped like that layer's output (``draw_dropout_masks`` shows the shapes).
            Both sides compute ``y * keep / (1 - p)`` like F.dropout; torch runs layer by layer
            (``masked_forward``) since its fused nn.LSTM cannot take a mask. Chunked runs use
            each chunk's slice of the masks. None (default): dropout off on both sides (the
            torch module runs in eval mode, JAX with ``deterministic=True``).
        jax_dropout_masks: other masks for the JAX side only (default: the same); a mismatch
            the report must catch, for testing the harness.

    Returns:
        A ``Report``.

    Example:
        >>> report = compare(torch.nn.LSTM(8, 16, batch_first=True), torch.randn(4, 50, 8),
        ...                  chunks="random", initial_state="random", grads=True)
        >>> report.assert_ok(); print(report)
    """
    if isinstance(torch_module, torch_impl.StatefulWrapper):
        if initial_state is None:
            initial_state = torch_module.get_state()
        torch_module = torch_module.module
    spec = spec_for_torch(torch_module)
    module_dtype = next(torch_module.parameters()).dtype
    dtype = dtype or module_dtype
    if dtype != module_dtype:
        torch_module = copy.deepcopy(torch_module).to(dtype)
    forward_atol, grad_rtol = bounds_for(dtype)
    forward_atol = forward_atol if atol is None else atol
    rtol = rtol or 0.0
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    if seq_lengths is not None:
        if spec.kind != "lstm":
            raise ValueError(f"seq_lengths is supported for nn.LSTM only, got {type(torch_module).__name__}")
        if chunks is not None:
            raise ValueError("seq_lengths and chunks cannot be combined (torch cannot pack a chunk with empty rows)")
        seq_lengths = np.asarray(seq_lengths)
    masks_t, masks_j = _resolve_dropout_masks(
        spec, torch_module, x, dropout_masks, jax_dropout_masks, generator
    )

    report = Report(_describe(torch_module), str(dtype).replace("torch.", ""))
    with numerics(dtype), _deterministic_unless_masked(torch_module, masks_t):
        if jax_module is None:
            jax_module, variables = to_jax(torch_module)
        run_jax = _jax_runner(spec, jax_module)
        to_jax_layout = spec.activation.to_jax

        with torch.no_grad():
            if isinstance(initial_state, str):
                if initial_state != "random":
                    raise ValueError(f'initial_state must be a state pair, "random" or None, got {initial_state!r}')
                template = _torch_run(spec, torch_module, x, None, None)[1]
                initial_state = _random_like(template, generator)
            elif initial_state is None:
                # explicit zeros: the same JAX program then serves every chunk
                template = _torch_run(spec, torch_module, x, None, seq_lengths)[1]
                initial_state = tuple(torch.zeros_like(s) for s in template)
            initial_state = tuple(t.to(dtype) for t in initial_state)

            # full sequence
            y_t, state_t = _torch_run(spec, torch_module, x, initial_state, seq_lengths, masks_t)
            xj = jnp.asarray(np.ascontiguousarray(to_jax_layout(x.numpy())))
            lengths_j = None if seq_lengths is None else jnp.asarray(seq_lengths)
            y_j, carry_j = run_jax(
                variables, xj, state_to_jax(spec, initial_state), lengths_j,
                _masks_to_jax(spec, masks_j),
            )
            _add_forward_checks(report, spec, "full", y_t, state_t, y_j, carry_j, forward_atol, rtol)

            # chunked, the state carried on both sides
            time_axis = _time_axis(spec, torch_module, x)
            lengths = resolve_chunks(chunks, x.shape[time_axis], seed)
            if lengths is not None:
                state_t, carry_j, ys_t, ys_j, start = initial_state, state_to_jax(spec, initial_state), [], [], 0
                for n in lengths:
                    chunk = x.narrow(time_axis, start, n)
                    y, state_t = _torch_run(
                        spec, torch_module, chunk, state_t, None,
                        _narrow_masks(masks_t, time_axis, start, n),
                    )
                    ys_t.append(y)
                    y, carry_j = run_jax(
                        variables, jnp.asarray(np.ascontiguousarray(to_jax_layout(chunk.numpy()))),
                        carry_j, None, _masks_to_jax(spec, _narrow_masks(masks_j, time_axis, start, n)),
                    )
                    ys_j.append(y)
                    start += n
                run = "chunks " + "+".join(map(str, lengths))
                y_t = torch.cat(ys_t, time_axis)
                y_j = jnp.concatenate(ys_j, axis=time_axis)
                _add_forward_checks(report, spec, run, y_t, state_t, y_j, carry_j, forward_atol, rtol)

        if grads:
            _add_grad_checks(
                report, spec, torch_module, jax_module, variables, x, initial_state, seq_lengths,
                grad_rtol, generator, masks_t, masks_j,
            )
    return report


def _add_forward_checks(report, spec, run, y_t, state_t, y_j, carry_j, atol, rtol):
    to_torch_layout = spec.activation.to_torch
    pairs = [("output", y_j, y_t), ("h_n", carry_j[0], state_t[0]), ("c_n", carry_j[1], state_t[1])]
    for name, got, ref in pairs:
        report.checks.append(
            check_arrays(run, name, to_torch_layout(np.asarray(got)), ref.detach().numpy(), atol, rtol)
        )


def _add_grad_checks(
    report, spec, torch_module, jax_module, variables, x, initial_state, seq_lengths,
    grad_rtol, generator, masks_t=None, masks_j=None,
):
    """Gradients of ``Σ y·a + Σ h_n·b + Σ c_n·d`` (a, b, d random) on both sides."""
    x_t = x.detach().clone().requires_grad_(True)
    state0 = tuple(s.detach().clone().requires_grad_(True) for s in initial_state)
    torch_module.zero_grad(set_to_none=True)
    y_t, (h_t, c_t) = _torch_run(spec, torch_module, x_t, state0, seq_lengths, masks_t)
    weights = _random_like((y_t, h_t, c_t), generator)
    loss = sum((t * w).sum() for t, w in zip((y_t, h_t, c_t), weights))
    loss.backward()
    torch_grads = {name: p.grad for name, p in torch_module.named_parameters()}

    to_jax_layout = spec.activation.to_jax
    as_jax = lambda t: jnp.asarray(np.ascontiguousarray(to_jax_layout(t.detach().numpy())))
    w_y, w_h, w_c = (as_jax(w) for w in weights)
    lengths_j = None if seq_lengths is None else jnp.asarray(seq_lengths)

    args = (variables, as_jax(x), state_to_jax(spec, state0), lengths_j, w_y, w_h, w_c,
            _masks_to_jax(spec, masks_j))
    is_cell = spec.kind.endswith("_cell")
    try:
        hash(jax_module)
        g_vars, g_x, g_carry = _grads_jit(jax_module, is_cell, *args)
    except TypeError:
        g_vars, g_x, g_carry = jax.grad(functools.partial(_loss, jax_module, is_cell), (0, 1, 2))(*args)
    run = "full"
    to_torch_layout = spec.activation.to_torch
    report.checks.append(check_arrays(run, "grad/input", to_torch_layout(np.asarray(g_x)),
                                      x_t.grad.numpy(), grad_rtol, relative_to_max=True))
    for name, g, s in zip(("h_0", "c_0"), g_carry, state0):
        report.checks.append(check_arrays(run, f"grad/{name}", to_torch_layout(np.asarray(g)),
                                          s.grad.numpy(), grad_rtol, relative_to_max=True))
    try:  # a port made elsewhere is expected to follow jax_impl's parameter structure
        jax_grads = params_tree_as_torch(spec, torch_options(torch_module), g_vars)
    except (ValueError, TypeError) as error:
        report.checks.append(Check(run, "grad/params", math.inf, math.inf, None, grad_rtol, False,
                                   f"parameters do not match torch's: {error}"))
        return
    for name, ref in torch_grads.items():
        if name not in jax_grads:
            report.checks.append(Check(run, f"grad/{name}", math.inf, math.inf, None, grad_rtol,
                                       False, "no such parameter in the JAX port"))
            continue
        report.checks.append(check_arrays(run, f"grad/{name}", jax_grads[name], ref.numpy(),
                                          grad_rtol, relative_to_max=True))


# ------------------------------------------------------------------------------------ dropout
# nn.LSTM's fused kernel draws its own inter-layer dropout masks and cannot take given ones, so
# with masks the torch side runs layer by layer: single-layer nn.LSTMs sharing the original
# Parameters (gradients land on the original names), ``y * keep / (1 - p)`` between layers.


def split_lstm(lstm: torch.nn.LSTM) -> list[torch.nn.LSTM]:
    """One single-layer nn.LSTM per layer of ``lstm``, sharing its Parameter objects.

    Arguments:
        lstm: any nn.LSTM (bidirectional, proj_size, bias, batch_first are kept).

    Returns:
        ``num_layers`` modules; layer ``k``'s ``weight_ih_l0[_reverse]`` *is*
        ``lstm.weight_ih_l{k}[_reverse]`` (and so on), so backward through them fills
        ``lstm``'s own ``.grad``s.

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
        >>> first, second = split_lstm(lstm)
        >>> y, _ = second(first(torch.randn(2, 5, 3))[0])   # == lstm(x) in eval mode
        >>> first.weight_ih_l0 is lstm.weight_ih_l0
        True
    """
    if not isinstance(lstm, torch.nn.LSTM):
        raise TypeError(f"split_lstm needs an nn.LSTM, got {type(lstm).__name__}")
    directions = 2 if lstm.bidirectional else 1
    out_size = lstm.proj_size or lstm.hidden_size
    layers = []
    for k in range(lstm.num_layers):
        layer = torch.nn.LSTM(
            lstm.input_size if k == 0 else directions * out_size, lstm.hidden_size, 1,
            bias=lstm.bias, batch_first=lstm.batch_first, bidirectional=lstm.bidirectional,
            proj_size=lstm.proj_size, device="meta", dtype=lstm.weight_ih_l0.dtype,
        )  # meta: no memory, no init; every parameter is replaced below
        for name in [n for n, _ in layer.named_parameters()]:
            # RNNBase.__setattr__ keeps its flat weight list in step with the new Parameter
            setattr(layer, name, getattr(lstm, name.replace("_l0", f"_l{k}")))
        layers.append(layer)
    return layers


def draw_dropout_masks(
    torch_module: torch.nn.Module, x: torch.Tensor, generator: Optional[torch.Generator] = None
) -> list[torch.Tensor]:
    """Random inter-layer keep masks (bool, P(keep) = 1 - dropout) for ``torch_module`` on ``x``.

    Arguments:
        torch_module: an nn.LSTM or torch_impl.ConvLSTM2d with ``num_layers > 1``.
        x: its input, torch layout.
        generator: torch random generator (None: the global one).

    Returns:
        ``num_layers - 1`` bool tensors, each shaped like a layer's output in the input's
        layout: ``(B, T, D*H_out)`` (batch_first nn.LSTM), ``(B, T, hidden, H, W)`` (ConvLSTM2d).

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=3, dropout=0.5, batch_first=True)
        >>> [m.shape for m in draw_dropout_masks(lstm, torch.randn(2, 5, 3))]
        [torch.Size([2, 5, 4]), torch.Size([2, 5, 4])]
    """
    shape = _layer_output_shape(torch_module, x)
    keep = torch.full(shape, 1.0 - torch_module.dropout, dtype=torch.float64)
    return [torch.bernoulli(keep, generator=generator).bool()
            for _ in range(torch_module.num_layers - 1)]


def masked_forward(
    torch_module: torch.nn.Module,
    x: torch.Tensor,
    state: Optional[tuple] = None,
    masks: Optional[Sequence[torch.Tensor]] = None,
    lengths: Any = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``torch_module(x, state)`` computed layer by layer, with given inter-layer dropout masks.

    Arguments:
        torch_module: an nn.LSTM or torch_impl.ConvLSTM2d.
        x: input in the module's layout (batched or unbatched).
        state: ``(h_0, c_0)`` in the module's layout, or None for zeros.
        masks: ``num_layers - 1`` keep masks shaped like each layer's output (see
            ``draw_dropout_masks``); layer ``k + 1`` reads ``y_k * keep_k / (1 - p)``, F.dropout's
            formula. None: no dropout (eval mode).
        lengths: ``(B,)`` valid lengths (nn.LSTM only): each layer runs a packed sequence.

    Returns:
        ``(output, (h_n, c_n))`` like the module's own forward.

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5)
        >>> x = torch.randn(5, 2, 3)
        >>> y, (h, c) = masked_forward(lstm, x, None, draw_dropout_masks(lstm, x))
    """
    masks = _check_masks(torch_module, x, masks)
    if isinstance(torch_module, torch.nn.LSTM):
        return _masked_lstm(torch_module, x, state, masks, lengths)
    if isinstance(torch_module, torch_impl.ConvLSTM2d):
        if lengths is not None:
            raise ValueError("lengths are supported for nn.LSTM only, got a ConvLSTM2d")
        return _masked_convlstm(torch_module, x, state, masks)
    raise TypeError(
        f"masked_forward needs an nn.LSTM or torch_impl.ConvLSTM2d, got {type(torch_module).__name__}"
    )


def _dropped(y: torch.Tensor, keep: torch.Tensor, rate: float) -> torch.Tensor:
    # F.dropout's order: the mask is scaled first (keep / (1 - p)), then multiplied in
    return y * (keep.to(y.dtype) / (1.0 - rate))


def _layer_output_shape(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Shape of one layer's output (input layout) for input ``x``."""
    if isinstance(module, torch.nn.LSTM):
        features = (2 if module.bidirectional else 1) * (module.proj_size or module.hidden_size)
        return tuple(x.shape[:-1]) + (features,)
    if isinstance(module, torch_impl.ConvLSTM2d):
        return tuple(x.shape[:-3]) + (module.hidden_channels,) + tuple(x.shape[-2:])
    raise TypeError(
        f"dropout masks need an nn.LSTM or torch_impl.ConvLSTM2d, got {type(module).__name__}"
    )


def _check_masks(module, x, masks) -> Optional[list]:
    if masks is None:
        return None
    expected = _layer_output_shape(module, x)
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
        raise TypeError(f"dropout masks must be a list of tensors, got {type(masks).__name__}")
    if len(masks) != module.num_layers - 1:
        raise ValueError(
            f"dropout masks has {len(masks)} entries, expected {module.num_layers - 1} "
            f"(num_layers - 1: one per gap between layers)"
        )
    checked = []
    for k, mask in enumerate(masks):
        mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"dropout mask {k} has shape {tuple(mask.shape)}, expected {expected} "
                f"(layer {k}'s output for this input)"
            )
        checked.append(mask)
    return checked


def _masked_lstm(lstm, x, state, masks, lengths):
    directions = 2 if lstm.bidirectional else 1
    h0, c0 = (None, None) if state is None else state
    final_h, final_c = [], []
    for k, layer in enumerate(split_lstm(lstm)):
        if k > 0 and masks is not None:
            x = _dropped(x, masks[k - 1], lstm.dropout)
        rows = slice(k * directions, (k + 1) * directions)
        hx = None if h0 is None else (h0[rows], c0[rows])
        if lengths is None:
            x, (h, c) = layer(x, hx)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                x, torch.as_tensor(lengths).cpu(), batch_first=lstm.batch_first,
                enforce_sorted=False,
            )
            y, (h, c) = layer(packed, hx)
            # padded positions come back as zeros, and zero * keep stays zero
            x, _ = torch.nn.utils.rnn.pad_packed_sequence(
                y, batch_first=lstm.batch_first, total_length=x.shape[1 if lstm.batch_first else 0]
            )
        final_h.append(h)
        final_c.append(c)
    return x, (torch.cat(final_h, 0), torch.cat(final_c, 0))


def _masked_convlstm(module, x, state, masks):
    from torch_impl.convlstm import same_padding  # the module's own padding rule

    batched = x.dim() == 5

    def time_major(t):  # -> (T, B, ...)
        if not batched:
            return t.unsqueeze(1)
        return t.transpose(0, 1) if module.batch_first else t

    xs = time_major(x)
    steps, batch, _, height, width = xs.shape
    if state is None:
        zeros = xs.new_zeros(module.num_layers, batch, module.hidden_channels, height, width)
        h0, c0 = zeros, zeros
    else:
        h0, c0 = (s.unsqueeze(1) if not batched else s for s in state)
    padding = same_padding(module.kernel_size, module.dilation)
    final_h, final_c = [], []
    for k in range(module.num_layers):
        if k > 0 and masks is not None:
            xs = _dropped(xs, time_major(masks[k - 1]), module.dropout)
        h, c, outputs = h0[k], c0[k], []
        for x_t in xs.unbind(0):
            h, c = torch_impl.convlstm_step(
                x_t, h, c, *module.layer_parameters(k), padding, padding, module.dilation
            )
            outputs.append(h)
        xs = torch.stack(outputs)
        final_h.append(h)
        final_c.append(c)
    h_n, c_n = torch.stack(final_h), torch.stack(final_c)
    if not batched:
        return xs.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return (xs.transpose(0, 1) if module.batch_first else xs), (h_n, c_n)


def _resolve_dropout_masks(spec, module, x, masks, jax_masks, generator):
    """``(torch masks, JAX-side masks)`` (torch layout, checked) or ``(None, None)``."""
    if masks is None:
        if jax_masks is not None:
            raise ValueError("jax_dropout_masks needs dropout_masks for the torch side too")
        return None, None
    if spec.kind not in ("lstm", "convlstm") or not getattr(module, "dropout", 0.0):
        raise ValueError(
            f"dropout_masks needs an nn.LSTM or ConvLSTM2d with dropout > 0, got "
            f"{_describe(module)}"
        )
    if module.num_layers < 2:
        raise ValueError("dropout_masks needs num_layers >= 2 (dropout acts between layers), got 1")
    if isinstance(masks, str):
        if masks != "random":
            raise ValueError(f'dropout_masks must be a list of masks, "random" or None, got {masks!r}')
        masks = draw_dropout_masks(module, x, generator)
    masks = _check_masks(module, x, masks)
    jax_masks = masks if jax_masks is None else _check_masks(module, x, jax_masks)
    return masks, jax_masks


def _masks_to_jax(spec, masks) -> Optional[list]:
    if masks is None:
        return None
    return [jnp.asarray(np.ascontiguousarray(spec.activation.to_jax(m.numpy()))) for m in masks]


def _narrow_masks(masks, time_axis: int, start: int, length: int) -> Optional[list]:
    return None if masks is None else [m.narrow(time_axis, start, length) for m in masks]


@contextlib.contextmanager
def _deterministic_unless_masked(module: torch.nn.Module, masks) -> Iterator[None]:
    """Without masks the torch module runs in eval mode (no random dropout: JAX's default is
    deterministic); the module's own mode is restored after."""
    training = module.training
    if masks is None and getattr(module, "dropout", 0.0):
        module.eval()
    try:
        yield
    finally:
        module.train(training)
