"""The outcome of a comparison: ``Check`` (one tensor of one run) and ``Report`` (all of them),
and the bounds that decide "matches" (docs/design.md)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

__all__ = [
    "Check", "Report", "check_arrays", "check_against_truth", "bounds_for", "FORWARD_ATOL",
    "GRAD_RTOL", "LOW_PRECISION_RATIO", "LOW_PRECISION_FLOOR",
]

# docs/design.md's numbers: max abs error on outputs and states; gradients relative to the
# largest gradient.
FORWARD_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


# bfloat16 has no fixed bound: both sides are measured against a float64 run of the same weights
# and inputs, and JAX passes when its error is at most this many times torch's own (plus a
# floor, so that an exact torch result does not demand an exact JAX one).
LOW_PRECISION_RATIO = 2.0
LOW_PRECISION_FLOOR = 2.0**-8  # bfloat16's unit roundoff is 2^-8


def bounds_for(dtype: torch.dtype) -> tuple[float, float]:
    """``(forward atol, gradient bound relative to the largest gradient)`` for a dtype."""
    if dtype not in FORWARD_ATOL:
        raise TypeError(
            f"dtype {dtype} has no fixed parity bound; expected torch.float32 or torch.float64 "
            "(torch.bfloat16 is compared against a float64 truth instead)"
        )
    return FORWARD_ATOL[dtype], GRAD_RTOL[dtype]


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


def check_against_truth(
    run: str, tensor: str, got: np.ndarray, ref: np.ndarray, truth: np.ndarray
) -> Check:
    """Low-precision criterion: JAX's largest error against the float64 ``truth`` is at most
    ``LOW_PRECISION_RATIO`` times torch's own plus ``LOW_PRECISION_FLOOR`` times the truth's
    scale; the note gives torch's error."""
    got, ref, truth = (np.asarray(a, dtype=np.float64) for a in (got, ref, truth))
    if got.shape != truth.shape:
        return Check(run, tensor, math.inf, math.inf, None, 0.0, False,
                     f"shape {got.shape} vs torch {truth.shape}")
    finite = np.isfinite(got) & np.isfinite(ref) & np.isfinite(truth)
    jax_error = np.where(finite, np.abs(got - truth), 0.0)
    torch_error = float(np.max(np.where(finite, np.abs(ref - truth), 0.0), initial=0.0))
    scale = float(np.max(np.abs(np.where(finite, truth, 0.0)), initial=0.0))
    max_abs = float(jax_error.max(initial=0.0))
    where = (tuple(int(i) for i in np.unravel_index(int(jax_error.argmax()), jax_error.shape))
             if jax_error.size else None)
    bound = LOW_PRECISION_RATIO * torch_error + LOW_PRECISION_FLOOR * scale
    note = f"torch error {torch_error:.3g}"
    if not finite.all():
        note += ", non-finite values"
    ok = max_abs <= bound and bool(finite.all())
    return Check(run, tensor, max_abs, max_abs / scale if scale else max_abs, where, bound, ok,
                 note)
