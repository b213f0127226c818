"""``python -m parity``: the validation run over a grid of configurations.

Prints a table (configuration, chunking, max abs error per tensor, bound, pass/fail) and exits 1
on any mismatch. ``--quick`` finishes in under a minute on 2 cores. ``--devices N`` validates the
JAX side split along the batch over a mesh of N devices (forced CPU devices where fewer exist).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import torch_impl

from .harness import Report, compare

DEVICES_CHILD = "CARRYOVER_PARITY_DEVICES_CHILD"  # set in the re-executed child: no second re-exec


@dataclass
class Case:
    """One configuration of the grid: a torch module factory, an input shape, compare options."""

    name: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]
    options: dict = field(default_factory=dict)
    quick: bool = False


def _lstm(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: torch.nn.LSTM(8, 16, **kwargs)


def _conv(**kwargs) -> Callable[[], torch.nn.Module]:
    return lambda: torch_impl.ConvLSTM2d(3, 4, **kwargs)


RANDOM_STATE = {"initial_state": "random"}
CASES = [
    Case("LSTM L1", _lstm(batch_first=True), (4, 24, 8), {"chunks": "random", **RANDOM_STATE, "grads": True}),
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


def _run(case: Case, dtype: torch.dtype, seed: int, atol: float | None = None, mesh=None) -> Report:
    torch.manual_seed(seed)
    module = case.make().eval()
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(seed + 1))
    port = {} if mesh is None else _sharded_port(module, dtype, mesh)
    report = compare(module, x, dtype=dtype, seed=seed, atol=atol, **port, **case.options)
    report.config = f"{case.name}" + ("" if mesh is None else f" [{mesh.size} devices]")
    return report


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


def _unshardable(case: Case, devices: int) -> str | None:
    """Why ``case`` cannot run split over ``devices`` devices (None: it can)."""
    module = case.make()
    if not isinstance(module, (torch.nn.LSTM, torch_impl.ConvLSTM2d)):
        return f"{type(module).__name__} is a cell (no batch-split module)"
    if len(case.shape) != (3 if isinstance(module, torch.nn.LSTM) else 5):
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


def _table(results: list[Report]):
    from rich.table import Table

    table = Table(title="carryover parity: JAX vs torch, max abs error", title_justify="left")
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
    """PNG: error of JAX float32 (and torch float32) against a float64 reference, per step."""
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
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, (jax_err, torch_err)) in zip(axes, curves.items()):
        ax.semilogy(np.maximum(jax_err, 1e-12), label="JAX float32", lw=0.8)
        ax.semilogy(np.maximum(torch_err, 1e-12), label="torch float32", lw=0.8, alpha=0.7)
        ax.axhline(1e-5, color="k", ls="--", lw=0.8, label="float32 bound 1e-5")
        ax.set_title(f"{title}: max abs error vs float64")
        ax.set_xlabel("time step")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return {title: {"jax_max": float(j.max()), "torch_max": float(t.max()), "steps": len(j)}
            for title, (j, t) in curves.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small grid, under a minute on 2 cores")
    parser.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    parser.add_argument("--json", metavar="PATH", help="write a machine-readable report")
    parser.add_argument("--plot", metavar="PATH", help="PNG of float32 drift against float64 along a long sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", metavar="TEXT", help="run the configurations whose name contains TEXT")
    parser.add_argument("--atol", type=float, help="override the forward bound (default: DESIGN.md's per dtype)")
    parser.add_argument("--devices", type=int, default=1, metavar="N",
                        help="run the JAX side split along the batch over a mesh of N devices "
                             "(batched LSTM/ConvLSTM cases whose batch N divides; forced CPU "
                             "devices in a child process where JAX has fewer)")
    args = parser.parse_args(argv)
    mesh = None
    if args.devices < 1:
        parser.error(f"--devices must be >= 1, got {args.devices}")
    if args.devices > 1:
        import jax

        if len(jax.devices()) < args.devices:
            if os.environ.get(DEVICES_CHILD):
                print(f"--devices {args.devices}: JAX still sees {len(jax.devices())} device(s)",
                      file=sys.stderr)
                return 2
            return _reexec_with_devices(sys.argv[1:] if argv is None else list(argv), args.devices)
        mesh = _mesh(args.devices)

    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=None if sys.stdout.isatty() else 150)
    dtypes = {"float32": [torch.float32], "float64": [torch.float64], "both": [torch.float32, torch.float64]}[args.dtype]
    cases = [c for c in CASES if (c.quick or not args.quick) and (not args.only or args.only in c.name)]
    if mesh is not None:
        skipped = {c.name: _unshardable(c, args.devices) for c in cases}
        for name, why in skipped.items():
            if why:
                console.print(f"--devices {args.devices}: skipping {name} ({why})")
        cases = [c for c in cases if not skipped[c.name]]
    results: list[Report] = []
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("comparing", total=len(cases) * len(dtypes))
        for case in cases:
            for dtype in dtypes:
                progress.update(task, description=f"{case.name} [{str(dtype)[6:]}]")
                results.append(_run(case, dtype, args.seed, args.atol, mesh))
                progress.advance(task)
    console.print(_table(results))
    failures = [r for r in results if not r.ok]
    elapsed = time.perf_counter() - started
    summary = {"ok": not failures, "configurations": len(results), "failed": len(failures), "seconds": round(elapsed, 1)}
    if mesh is not None:
        summary["devices"] = args.devices
    if args.plot:
        summary["drift"] = plot_drift(args.plot)
        console.print(f"drift plot written to {args.plot}: {json.dumps(summary['drift'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**summary, "environment": _environment(), "reports": [r.to_dict() for r in results]}, f, indent=1)
        console.print(f"report written to {args.json}")
    verdict = "[green]all match[/green]" if not failures else f"[red]{len(failures)} mismatched[/red]"
    console.print(f"{len(results)} comparisons, {verdict} ({elapsed:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
