"""``python -m parity``: the validation run over a grid of configurations.

Prints a table (configuration, chunking, max abs error per tensor, bound, pass/fail). Exit
status: 0 every comparison matches, 1 a mismatch, 2 a usage error (including an ``--only`` that
selects nothing, so a typo cannot pass green). ``--json PATH`` writes a strict JSON report
(``schema_version`` 1, see ``json_report``). ``--quick`` finishes in under a minute on 2 cores.
``--devices N`` validates the JAX side split along the batch over a mesh of N devices (forced
CPU devices where fewer exist). ``--target NAME`` validates another ``to_jax`` target than
carryover's Linen modules (``nnx``, ``flax.linen``, ...), skipping the configurations it cannot
express. ``python -m parity convert ...`` is the checkpoint converter.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import torch_impl

from .harness import compare
from .report import LOW_PRECISION_FLOOR, LOW_PRECISION_RATIO, Report
from .targets import TARGETS

DEVICES_CHILD = "CARRYOVER_PARITY_DEVICES_CHILD"  # set in the re-executed child: no second re-exec
# The JSON report's layout; bumped when a key is renamed, removed or changes type, so a consumer
# can refuse a report it does not understand instead of misreading it.
SCHEMA_VERSION = 1
# docs/design.md's float32 forward bound: the line drawn in the drift plot and its "ok" per curve.
DRIFT_BOUND = 1e-5


@dataclass
class Case:
    """One configuration of the grid: a torch module factory, an input shape, compare options.

    The grid is data: a new module kind (GRU, RNN, ...) needs only a factory like ``_lstm`` and
    its rows in ``CASES`` (plus an entry in ``BATCHED_RANK`` if its port can be split along the
    batch by ``--devices``). Names must be unique: ``--only`` and ``--list`` go by them.

    Attributes:
        name: shown in the table and the JSON report, matched by ``--only``.
        make: builds a fresh torch module (seeded by the caller).
        shape: the input's shape in torch's layout.
        options: keyword arguments for ``parity.compare``.
        quick: part of the ``--quick`` grid.
    """

    name: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    options: dict = field(default_factory=dict)
    quick: bool = False


def _lstm(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: torch.nn.LSTM(8, 16, **kwargs)


def _gru(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: torch.nn.GRU(8, 16, **kwargs)


def _rnn(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: torch.nn.RNN(8, 16, **kwargs)


def _conv(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: torch_impl.ConvLSTM2d(3, 4, **kwargs)


RANDOM_STATE = {"initial_state": "random"}
CASES = [
    # quick: also the one-layer row stock libraries' layers (--target keras, flax.*) can run
    Case("LSTM L1", _lstm(batch_first=True), (4, 24, 8), {"chunks": "random", **RANDOM_STATE, "grads": True},
         quick=True),
    Case("LSTM L1 chunks of 1", _lstm(batch_first=True), (4, 24, 8), {"chunks": 1}),
    Case("LSTM L2 time-major", _lstm(num_layers=2), (24, 4, 8), {"chunks": [8, 16], **RANDOM_STATE, "grads": True}),
    Case("LSTM L3 bidirectional", _lstm(num_layers=3, bidirectional=True, batch_first=True), (4, 24, 8),
         {"chunks": [12, 12], **RANDOM_STATE, "grads": True}),
    Case("LSTM L2 bidirectional proj=5", _lstm(num_layers=2, bidirectional=True, proj_size=5, batch_first=True),
         (4, 24, 8), {"chunks": "random", **RANDOM_STATE, "grads": True}, quick=True),
    Case("LSTM L1 proj=6 no bias", _lstm(proj_size=6, bias=False, batch_first=True), (4, 24, 8),
         {"chunks": [5, 19], **RANDOM_STATE}),
    Case("LSTM L2 bidirectional packed lengths", _lstm(num_layers=2, bidirectional=True, batch_first=True),
         (4, 24, 8), {"seq_lengths": [24, 17, 1, 9], **RANDOM_STATE, "grads": True}, quick=True),
    Case("LSTM L2 unbatched", _lstm(num_layers=2), (24, 8), {"chunks": [10, 14], **RANDOM_STATE}),
    Case("LSTM L1 T=1000", _lstm(batch_first=True), (2, 1000, 8), {"chunks": [300, 700]}),
    Case("LSTMCell", lambda: torch.nn.LSTMCell(8, 16), (12, 4, 8), {"chunks": [5, 7], **RANDOM_STATE, "grads": True}),
    Case("GRU L1", _gru(batch_first=True), (4, 24, 8), {"chunks": "random", **RANDOM_STATE, "grads": True}),
    Case("GRU L2 bidirectional packed lengths", _gru(num_layers=2, bidirectional=True, batch_first=True),
         (4, 24, 8), {"seq_lengths": [24, 17, 1, 9], **RANDOM_STATE, "grads": True}, quick=True),
    Case("GRU L2 unbatched", _gru(num_layers=2), (24, 8), {"chunks": [10, 14], **RANDOM_STATE}),
    Case("GRU L1 T=1000", _gru(batch_first=True), (2, 1000, 8), {"chunks": [300, 700]}),
    Case("GRU L2 dropout masks", _gru(num_layers=2, dropout=0.3, batch_first=True), (4, 24, 8),
         {"dropout_masks": "random", "chunks": [12, 12], **RANDOM_STATE, "grads": True}),
    Case("GRUCell", lambda: torch.nn.GRUCell(8, 16), (12, 4, 8), {"chunks": [5, 7], **RANDOM_STATE, "grads": True}),
    Case("RNN tanh L2 bidirectional", _rnn(num_layers=2, bidirectional=True, batch_first=True), (4, 24, 8),
         {"chunks": [12, 12], **RANDOM_STATE, "grads": True}),
    Case("RNN relu L1 packed lengths", _rnn(nonlinearity="relu", batch_first=True), (4, 24, 8),
         {"seq_lengths": [24, 17, 1, 9], **RANDOM_STATE, "grads": True}),
    Case("RNNCell relu", lambda: torch.nn.RNNCell(8, 16, nonlinearity="relu"), (12, 4, 8),
         {"chunks": [5, 7], **RANDOM_STATE, "grads": True}),
    Case("ConvLSTM L1 k3", _conv(kernel_size=3, batch_first=True), (2, 10, 3, 12, 12),
         {"chunks": "random", **RANDOM_STATE, "grads": True}),
    Case("ConvLSTM L2 k4 (even)", _conv(kernel_size=4, num_layers=2, batch_first=True), (2, 10, 3, 9, 9),
         {"chunks": [3, 7], **RANDOM_STATE, "grads": True}, quick=True),
    Case("ConvLSTM L1 k(3,2) dilation 2 no bias", _conv(kernel_size=(3, 2), dilation=2, bias=False),
         (10, 2, 3, 9, 9), {"chunks": [4, 6], **RANDOM_STATE}),
    Case("ConvLSTM L2 unbatched", _conv(kernel_size=3, num_layers=2), (10, 3, 8, 8), {"chunks": [1, 9]}),
    Case("ConvLSTMCell k2", lambda: torch_impl.ConvLSTMCell(3, 4, 2), (6, 2, 3, 8, 8),
         {"chunks": [2, 4], **RANDOM_STATE, "grads": True}),
]


def _module(case: Case, seed: int) -> torch.nn.Module:
    """The case's torch module as every run of ``seed`` sees it (same weights)."""
    torch.manual_seed(seed)
    return case.make().eval()


def _run(case: Case, dtype: torch.dtype, seed: int, atol: float | None = None, mesh=None,
         target: str = "linen") -> Report:
    module = _module(case, seed)
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1))
    # --devices is refused for other targets (main): the mesh splits carryover's Linen port
    port = {"target": target} if mesh is None else _sharded_port(module, dtype, mesh)
    options = case.options
    if dtype == torch.bfloat16:  # judged against a float64 truth: outputs and states only
        options = {k: v for k, v in options.items() if k not in ("grads", "dropout_masks")}
    report = compare(module, x, dtype=dtype, seed=seed, atol=atol, **port, **options)
    report.config = f"{case.name}" + ("" if mesh is None else f" [{mesh.size} devices]")
    return report


# ------------------------------------------------------------------------- --target NAME


def _inexpressible(cases: list[Case], target: str, seed: int) -> dict[str, str]:
    """Configuration name -> why ``target`` cannot express its module (``to_jax``'s ValueError).

    carryover's own targets express every option. The others refuse by the module's options
    (and flax.nnx by a GRU's b_hn values), never by dtype: one float32 conversion of the module
    the run will use decides for every dtype. ImportError (the target's library is missing)
    propagates.
    """
    if target in ("linen", "nnx"):
        return {}
    from .convert import to_jax

    reasons = {}
    for case in cases:
        try:
            to_jax(_module(case, seed), target=target)
        except ValueError as error:
            reasons[case.name] = str(error)
    return reasons


# ------------------------------------------------------------------------- --devices N


def _sharded_port(module: torch.nn.Module, dtype: torch.dtype, mesh) -> dict:
    """``compare``'s ``jax_module``/``variables``: ``to_jax`` of the module in ``dtype``, its
    apply split along the batch over ``mesh`` (``jax_impl.sharding.with_mesh``)."""
    import jax

    import jax_impl

    from .convert import to_jax

    with jax.enable_x64(dtype == torch.float64):  # float64 weights need x64 to stay float64
        jax_module, variables = to_jax(copy.deepcopy(module).to(dtype))
    return {"jax_module": jax_impl.sharding.with_mesh(jax_module, mesh), "variables": variables}


# Modules whose JAX port ``jax_impl.with_mesh`` can split along the batch, with the rank of
# their batched input; a kind missing here is skipped by --devices with the reason.
BATCHED_RANK: dict[type, int] = {
    torch.nn.LSTM: 3, torch.nn.GRU: 3, torch.nn.RNN: 3, torch_impl.ConvLSTM2d: 5,
}


def _unshardable(case: Case, devices: int) -> str | None:
    """Why ``case`` cannot run split over ``devices`` devices (None: it can)."""
    module = case.make()
    rank = next((r for kind, r in BATCHED_RANK.items() if isinstance(module, kind)), None)
    if rank is None:
        kind = type(module).__name__
        if kind.endswith("Cell"):
            return f"{kind} is a cell (no batch-split module)"
        return f"{kind} has no batch-split port (not in BATCHED_RANK)"
    if len(case.shape) != rank:
        return "unbatched input"
    batch = case.shape[0 if module.batch_first else 1]
    if batch % devices:
        return f"batch {batch} is not divisible by {devices} devices"
    return None


def _reexec_with_devices(argv: list[str], devices: int) -> int:
    """Runs ``python -m parity argv`` again in a child whose JAX sees ``devices`` forced CPU
    devices (the flag is read when JAX starts its backend: too late in this process)."""
    import jax

    env = dict(os.environ)
    env[DEVICES_CHILD] = "1"
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    if jax.default_backend() != "cpu":
        print(f"{jax.default_backend()} has {len(jax.devices())} device(s) < {devices}: "
              f"validating on {devices} forced CPU devices", file=sys.stderr)
    env["JAX_PLATFORMS"] = "cpu"  # forced host devices exist on the CPU platform only
    return subprocess.run([sys.executable, "-m", "parity", *argv], env=env).returncode


def _mesh(devices: int):
    """A one-axis ``("batch",)`` mesh over the first ``devices`` JAX devices."""
    import jax
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()[:devices]), ("batch",))


def _environment() -> dict:
    import flax
    import jax

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
    }


def _table(results: list[Report], target: str = "linen"):
    from rich.table import Table

    table = Table(title=f"carryover parity: JAX (target {target}) vs torch, max abs error",
                  title_justify="left")
    for column in ("configuration", "dtype", "run", "output", "h_n", "c_n", "grads (rel)", "bound", "result"):
        table.add_column(column, justify="right" if column in ("output", "h_n", "c_n", "grads (rel)", "bound") else "left")
    for report in results:
        for run in dict.fromkeys(c.run for c in report.checks):
            checks = {c.tensor: c for c in report.checks if c.run == run}
            grads = [c for t, c in checks.items() if t.startswith("grad/")]
            grad_text = f"{max(c.max_rel for c in grads):.2g}" if grads else ""
            ok = all(c.ok for c in checks.values())
            notes = "; ".join(sorted({c.note for c in checks.values() if c.note}))
            table.add_row(
                report.config, report.dtype.replace("float", "f"),
                run if len(run) <= 20 else f"{run.split()[0]} x{run.count('+') + 1} (random)",
                *(f"{checks[t].max_abs:.2g}" if t in checks else "" for t in ("output", "h_n", "c_n")),
                grad_text,
                f"{checks['output'].bound:.0e}" if "output" in checks else "",
                ("[green]pass[/green]" if ok else "[red]FAIL[/red]") + (f" {notes}" if notes else ""),
            )
    return table


def plot_drift(path: str, steps: int = 2000, seed: int = 0) -> dict:
    """PNG: error of JAX float32 (and torch float32) against a float64 reference, per step, and
    of JAX and torch in bfloat16 against a float64 run of the same bfloat16 values.

    Arguments:
        path: where the PNG goes.
        steps: LSTM sequence length (the ConvLSTM curve runs a tenth of it, at least 10).
        seed: torch seed for the modules and inputs.

    Returns:
        Per curve title: ``jax_max`` and ``torch_max`` (largest error over all steps), ``steps``,
        ``bound`` (``DRIFT_BOUND``; for the bfloat16 curve twice torch's largest error plus
        2^-8) and ``ok`` (``jax_max`` finite and within ``bound``).
    """
    import jax
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .convert import to_jax

    def drift(module, x, time_axis, conv: bool):
        with torch.no_grad():
            reference = module.double()(x.double())[0].numpy()
            torch32 = module.float()(x.float())[0].numpy()
        jax_module, variables = to_jax(module.float())
        xj = x.float().numpy()
        if conv:
            xj = np.moveaxis(xj, -3, -1)
        y = np.asarray(jax.jit(jax_module.apply)(variables, jnp.asarray(xj))[0])
        if conv:
            y = np.moveaxis(y, -1, -3)
        axes = tuple(a for a in range(reference.ndim) if a != time_axis)
        return (np.abs(y - reference).max(axis=axes), np.abs(torch32 - reference).max(axis=axes))

    def drift_bfloat16(module, x, time_axis):
        """JAX and torch in bfloat16 against a float64 run of the same bfloat16 values."""
        low = copy.deepcopy(module).to(torch.bfloat16)
        x_low = x.to(torch.bfloat16)
        with torch.no_grad():
            reference = copy.deepcopy(low).double()(x_low.double())[0].numpy()
            torch16 = low(x_low)[0].float().numpy()
        jax_module, variables = to_jax(low)
        xj = jnp.asarray(x_low.float().numpy(), jnp.bfloat16)
        y = np.asarray(jax.jit(jax_module.apply)(variables, xj)[0].astype(jnp.float32))
        axes = tuple(a for a in range(reference.ndim) if a != time_axis)
        return (np.abs(y - reference).max(axis=axes), np.abs(torch16 - reference).max(axis=axes))

    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(16, 64, num_layers=2, batch_first=True)
    lstm_x = torch.randn(4, steps, 16)
    conv_steps = max(steps // 10, 10)
    conv = torch_impl.ConvLSTM2d(2, 8, 3, batch_first=True)
    conv_x = torch.randn(2, conv_steps, 2, 12, 12)
    curves = {
        "LSTM L2 H64": drift(lstm, lstm_x, 1, False),
        "ConvLSTM 2→8 k3 12×12": drift(conv, conv_x, 1, True),
    }
    low_title = "LSTM L2 H64 bfloat16"
    curves[low_title] = drift_bfloat16(lstm, lstm_x, 1)
    figure, axes = plt.subplots(1, 3, figsize=(16, 4))
    for ax, (title, (jax_err, torch_err)) in zip(axes, curves.items()):
        precision = "bfloat16" if title == low_title else "float32"
        ax.semilogy(np.maximum(jax_err, 1e-12), label=f"JAX {precision}", lw=0.8)
        ax.semilogy(np.maximum(torch_err, 1e-12), label=f"torch {precision}", lw=0.8, alpha=0.7)
        if title == low_title:
            ax.semilogy(np.maximum(LOW_PRECISION_RATIO * torch_err, 1e-12), "k--", lw=0.8,
                        label=f"bound: {LOW_PRECISION_RATIO:g}x torch's error")
        else:
            ax.axhline(DRIFT_BOUND, color="k", ls="--", lw=0.8,
                       label=f"float32 bound {DRIFT_BOUND:g}")
        ax.set_title(f"{title}: max abs error vs float64")
        ax.set_xlabel("time step")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    def bound(title, torch_err):
        if title != low_title:
            return DRIFT_BOUND
        return float(LOW_PRECISION_RATIO * torch_err.max() + LOW_PRECISION_FLOOR)

    return {
        title: {
            "jax_max": float(j.max()), "torch_max": float(t.max()), "steps": len(j),
            "bound": bound(title, t),
            "ok": bool(np.isfinite(j).all() and j.max() <= bound(title, t)),
        }
        for title, (j, t) in curves.items()
    }


# ------------------------------------------------------------------------- selection


def select_cases(only: str | None, quick: bool, cases: list[Case] | None = None) -> list[Case]:
    """The configurations a run covers.

    Arguments:
        only: keep the names containing this text, ignoring case (None or "": all).
        quick: keep the ``--quick`` grid only.
        cases: the grid (default ``CASES``).

    Returns:
        The selected cases in grid order (possibly none: the caller decides what that means).
    """
    cases = CASES if cases is None else cases
    wanted = (only or "").casefold()
    return [c for c in cases if (c.quick or not quick) and wanted in c.name.casefold()]


def _nothing_selected(only: str, quick: bool) -> str:
    """The error for an ``--only`` that matches no configuration: what exists to choose from."""
    grid = select_cases(None, quick)
    message = (f"--only {only!r} matches none of the {len(grid)} "
               f"{'--quick ' if quick else ''}configurations (substring, ignoring case)")
    if quick and select_cases(only, False):
        message += f"; it matches {len(select_cases(only, False))} of the full grid: drop --quick"
    return message + ". Available:\n" + "\n".join(f"  {c.name}" for c in grid)


# ------------------------------------------------------------------------- JSON report


def _package_version() -> str:
    """carryover's version: the installed distribution's, else this checkout's pyproject.toml,
    else "unknown" (a report must be written even from an odd install)."""
    try:
        return importlib.metadata.version("carryover")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    except OSError:
        return "unknown"
    try:
        import tomllib
    except ImportError:  # Python 3.10 (supported) has no tomllib: the [project] table's line
        match = re.search(r'^\[project\]$(?:(?!^\[).)*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
        return match.group(1) if match else "unknown"
    try:
        return str(tomllib.loads(text)["project"]["version"])
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        return "unknown"


def _git(*args: str) -> str | None:
    """``git args`` run in this package's directory: its stdout, or None when git is missing,
    fails or hangs (never an error: the report does not depend on git)."""
    try:
        result = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the checkout this package runs from; ``(None, None)`` outside one.

    The package must be tracked by the repository: an install inside some other project's
    (ignored) virtual environment would otherwise report that project's commit.
    """
    if _git("ls-files", "--error-unmatch", Path(__file__).name) is None:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None or commit is None else bool(status))


def _non_finite_reason(value: float, context: dict) -> str:
    """Why a number could not be written: its token and, from a check's ``note``, the cause."""
    token = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    note = context.get("note") or ""
    if note.startswith("shape "):
        return f"{token}: shape mismatch ({note})"
    return f"{token}: {note}" if note else f"{token}: non-finite"


def strict_json(value: Any, context: dict | None = None) -> tuple[Any, bool]:
    """``value`` made writable as strict JSON (RFC 8259 has no NaN or Infinity).

    Arguments:
        value: dicts, lists, tuples, str, bool, None, ints and floats (numpy scalars included).
        context: the dict holding ``value`` (its ``note`` explains a check's inf).

    Returns:
        ``(clean, replaced)``: ``clean`` has every non-finite float replaced by None, and in
        every dict each key whose value was (or, for a list, held) one gets a sibling
        ``<key>_note`` saying what was there and why; ``replaced`` tells the caller that
        ``value`` itself (a float or a list) held a non-finite number.

    Raises:
        TypeError: for a value JSON cannot represent (names its type).
    """
    if isinstance(value, dict):
        clean = {}
        for key, item in value.items():
            clean[key], replaced = strict_json(item, value)
            if replaced:
                reason = (_non_finite_reason(float(item), value) if not isinstance(item, (list, tuple))
                          else "non-finite entries written as null")
                clean[f"{key}_note"] = reason
        return clean, False
    if isinstance(value, (list, tuple)):
        items = [strict_json(item, context) for item in value]
        return [clean for clean, _ in items], any(replaced for _, replaced in items)
    if isinstance(value, (bool, np.bool_)):
        return bool(value), False
    if isinstance(value, (int, np.integer)):
        return int(value), False
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return (value, False) if math.isfinite(value) else (None, True)
    if value is None or isinstance(value, str):
        return value, False
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to the JSON report; "
                    "expected dict, list, str, int, float, bool or None")


def json_report(summary: dict, arguments: dict, results: list[Report], skipped: dict[str, str],
                environment: dict) -> dict:
    """The ``--json`` document, ready for ``json.dump(..., allow_nan=False)``.

    Arguments:
        summary: ``ok``, ``configurations`` (comparisons run), ``failed``, ``seconds``, and
            ``devices`` / ``drift`` when the run has them.
        arguments: the command's options (dtype, seed, quick, only, atol, devices, plot, target).
        results: one ``Report`` per comparison.
        skipped: configuration name -> why ``--devices`` or ``--target`` left it out.
        environment: ``_environment()``.

    Returns:
        Keys: ``schema_version`` (int, ``SCHEMA_VERSION``), ``ok`` (bool: every comparison
        matched; the exit status is 0 exactly when true), ``configurations``, ``failed`` (int),
        ``seconds`` (float), ``carryover_version`` (str), ``git_commit`` (str or None),
        ``git_dirty`` (bool or None: tracked files modified), ``arguments`` (dict),
        ``skipped`` (list of ``{"config", "reason"}``), ``environment`` (dict), ``reports``
        (``Report.to_dict()`` each), ``devices`` (int, with ``--devices N`` > 1) and ``drift``
        (with ``--plot``: per curve ``jax_max``, ``torch_max``, ``steps``, ``bound``, ``ok``;
        informational, outside ``ok``). Non-finite numbers are null with a ``<key>_note``.
    """
    commit, dirty = _git_state()
    document = {
        "schema_version": SCHEMA_VERSION,
        **summary,
        "carryover_version": _package_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "arguments": arguments,
        "skipped": [{"config": name, "reason": why} for name, why in skipped.items()],
        "environment": environment,
        "reports": [r.to_dict() for r in results],
    }
    return strict_json(document)[0]


def write_json(path: str, document: dict) -> None:
    """Writes ``document`` as strict JSON, atomically: a reader never sees half a report, and a
    value strict JSON cannot hold fails here (ValueError) rather than in the reader."""
    text = json.dumps(document, indent=1, allow_nan=False)
    partial = f"{path}.{os.getpid()}.tmp"  # same directory: os.replace stays a rename
    try:
        with open(partial, "w") as f:
            f.write(text + "\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


# ------------------------------------------------------------------------- command line

EPILOG = """\
--only TEXT selects the configurations whose name contains TEXT, ignoring case; --list shows
the names (of the --quick grid with --quick).

exit status:
  0  every comparison matches
  1  a mismatch (an uncaught error also exits 1, with a traceback)
  2  usage error: a bad option, or --only / --devices / --target leave no configuration to run

--json writes strict JSON (no NaN/Infinity: such numbers are null with a "<key>_note" sibling),
"schema_version": 1. The --plot drift curves are reported but do not change the exit status.

checkpoint conversion: python -m parity convert --help
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid, under a minute on 2 cores")
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "both", "bfloat16"), default="both",
        help="both = float32 and float64 (default); bfloat16 passes when JAX's error against "
        "a float64 run is at most twice torch's own (outputs and final states)",
    )
    parser.add_argument("--json", metavar="PATH", help="write a machine-readable report (strict JSON)")
    parser.add_argument("--plot", metavar="PATH", help="PNG of float32 drift against float64 along a long sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", metavar="TEXT",
                        help="run the configurations whose name contains TEXT (ignoring case); "
                             "exit 2 if none does")
    parser.add_argument("--list", action="store_true",
                        help="print the configuration names (after --quick/--only), one per line, and exit")
    parser.add_argument("--atol", type=float, help="override the forward bound (default: docs/design.md's per dtype)")
    parser.add_argument("--target", choices=TARGETS, default="linen", metavar="NAME",
                        help="the JAX port to validate: to_jax(module, target=NAME), one of "
                             f"{', '.join(TARGETS)} (default linen); configurations it cannot "
                             "express are skipped with the reason")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="run the JAX side split along the batch over a mesh of N devices "
                             "(batched LSTM/ConvLSTM cases whose batch N divides; forced CPU "
                             "devices in a child process where JAX has fewer)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m parity``.

    Arguments:
        argv: the command's arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 every comparison matches, 1 a mismatch, 2 a usage error (argparse's
        own errors raise SystemExit(2) instead).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:
        from .convert_checkpoint import main as convert_main

        return convert_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    if args.atol is not None and not (math.isfinite(args.atol) and args.atol >= 0):
        parser.error(f"--atol must be a finite number >= 0, got {args.atol}")
    if args.devices > 1 and args.target != "linen":
        parser.error(f"--devices {args.devices} splits carryover's Linen port along the batch; "
                     f"it cannot be combined with --target {args.target}")
    cases = select_cases(args.only, args.quick)
    if not cases:  # checked before any JAX start or re-exec: a typo fails fast
        print(f"python -m parity: error: {_nothing_selected(args.only, args.quick)}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0

    mesh = None
    skipped: dict[str, str] = {}
    skipped_by = ""  # the option that skipped them, for the messages
    if args.devices > 1:
        import jax

        if len(jax.devices()) < args.devices:
            if os.environ.get(DEVICES_CHILD):
                print(f"--devices {args.devices}: JAX still sees {len(jax.devices())} device(s)",
                      file=sys.stderr)
                return 2
            return _reexec_with_devices(argv, args.devices)
        mesh = _mesh(args.devices)
        reasons = {c.name: _unshardable(c, args.devices) for c in cases}
        skipped = {name: why for name, why in reasons.items() if why}
        skipped_by = f"--devices {args.devices}"
    elif args.target != "linen":
        try:
            skipped = _inexpressible(cases, args.target, args.seed)
        except ImportError as error:  # the target's library is not installed
            print(f"python -m parity: error: --target {args.target}: {error}", file=sys.stderr)
            return 2
        skipped_by = f"--target {args.target}"
    if skipped and len(skipped) == len(cases):
        print(f"python -m parity: error: {skipped_by}: every selected configuration is skipped:\n"
              + "\n".join(f"  {name}: {why}" for name, why in skipped.items()), file=sys.stderr)
        return 2
    cases = [c for c in cases if c.name not in skipped]

    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=None if sys.stdout.isatty() else 150)
    for name, why in skipped.items():
        console.print(f"{skipped_by}: skipping {name} ({why})")
    dtypes = {"float32": [torch.float32], "float64": [torch.float64], "both": [torch.float32, torch.float64],
              "bfloat16": [torch.bfloat16]}[args.dtype]
    results: list[Report] = []
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("comparing", total=len(cases) * len(dtypes))
        for case in cases:
            for dtype in dtypes:
                progress.update(task, description=f"{case.name} [{str(dtype)[6:]}]")
                results.append(_run(case, dtype, args.seed, args.atol, mesh, args.target))
                progress.advance(task)
    console.print(_table(results, args.target))
    failures = [r for r in results if not r.ok]
    elapsed = time.perf_counter() - started
    summary = {"ok": not failures, "configurations": len(results), "failed": len(failures), "seconds": round(elapsed, 1)}
    if mesh is not None:
        summary["devices"] = args.devices
    if args.plot:
        summary["drift"] = plot_drift(args.plot)
        console.print(f"drift plot written to {args.plot}: {json.dumps(strict_json(summary['drift'])[0])}")
    if args.json:
        arguments = {"dtype": args.dtype, "seed": args.seed, "quick": args.quick, "only": args.only,
                     "atol": args.atol, "devices": args.devices, "plot": args.plot,
                     "target": args.target}
        write_json(args.json, json_report(summary, arguments, results, skipped, _environment()))
        console.print(f"report written to {args.json}")
    verdict = "[green]all match[/green]" if not failures else f"[red]{len(failures)} mismatched[/red]"
    console.print(f"{len(results)} comparisons (target {args.target}), {verdict} ({elapsed:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
