"""Streaming throughput of ``jax_impl.Stateful`` split along the batch: 1 device against 2.

cfg1 (B32, I64, H128, one layer) streams 128 time steps in chunks of 16. Each configuration
runs in a process of its own, since the forced CPU device count is fixed when JAX starts:

* ``1 device``: ``Stateful(lstm, variables)``, no mesh (the baseline);
* ``1 device, mesh``: ``Stateful(..., mesh=)`` over a one-device mesh (the cost of shard_map);
* ``2 devices, mesh``: ``Stateful(..., mesh=)`` over two forced CPU devices.

The workers stay alive side by side and the parent drives them round-robin, one stream per
worker per round (the order rotating), so a shared machine's drift hits all alike; ratios are
medians of per-round (paired) ratios. Chunks are pre-placed on each worker's devices (an input
pipeline delivers them so), so the timing is the step, not a host-to-device copy.

Run: ``python -m benchmarks.sharded_stream [--reps 15] [--json PATH]``; prints a table and
the ratio. On one CPU the "devices" share the cores: the figure says what XLA's CPU backend
makes of them, not what two GPUs would give.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

BATCH, STEPS, CHUNK, INPUT, HIDDEN = 32, 128, 16, 64, 128
CONFIGS = {  # name: (forced devices, mesh?)
    "1 device": (1, False),
    "1 device, mesh": (1, True),
    "2 devices, mesh": (2, True),
}


# ------------------------------------------------------------------------------ the worker


def worker(devices: int, use_mesh: bool, warmup: int = 2) -> None:
    """Builds the stream, warms it up, then times one 128-step stream per ``run`` line read.

    Prints ``ready`` once warm, then one elapsed time (seconds) per stream.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import jax_impl

    assert len(jax.devices()) == devices, jax.devices()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((BATCH, STEPS, INPUT), dtype=np.float32))
    lstm = jax_impl.LSTM(HIDDEN)
    variables = lstm.init(jax.random.key(0), x[:, :CHUNK])
    mesh = Mesh(np.array(jax.devices()), ("batch",)) if use_mesh else None
    stream = jax_impl.Stateful(lstm, variables, mesh=mesh)
    chunks = [x[:, t : t + CHUNK] for t in range(0, STEPS, CHUNK)]
    if mesh is not None:
        chunks = [jax_impl.sharding.shard_batch(c, mesh) for c in chunks]
    jax.block_until_ready(chunks)

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready([stream(c) for c in chunks])
        return time.perf_counter() - start

    for _ in range(warmup):
        run()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(f"{run():.9f}", flush=True)


# ------------------------------------------------------------------------------ the driver


@dataclass
class Worker:
    name: str
    process: subprocess.Popen

    def ask(self) -> float:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return float(self._line())

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name!r} died: {self.process.stderr.read()[-2000:]}")
        return line.strip()

    def wait_ready(self) -> None:
        if self._line() != "ready":
            raise RuntimeError(f"worker {self.name!r} did not start")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _start(name: str, devices: int, use_mesh: bool) -> Worker:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "benchmarks.sharded_stream", "--worker", str(devices)]
    if use_mesh:
        command.append("--mesh")
    process = subprocess.Popen(
        command, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    return Worker(name, process)


def measure(reps: int) -> dict:
    """``reps`` round-robin rounds over the three workers; medians and paired ratios."""
    workers = [_start(name, *CONFIGS[name]) for name in CONFIGS]
    try:
        for w in workers:
            w.wait_ready()
        times: dict[str, list[float]] = {w.name: [] for w in workers}
        for round_ in range(reps):
            shift = round_ % len(workers)
            for w in workers[shift:] + workers[:shift]:
                times[w.name].append(w.ask())
    finally:
        for w in workers:
            w.close()
    base = times["1 device"]
    rows = {}
    for name, ts in times.items():
        median = statistics.median(ts)
        rows[name] = {
            "median_s": median,
            "steps_per_s": STEPS / median,
            "row_steps_per_s": BATCH * STEPS / median,
            "speedup_vs_1_device": statistics.median(b / t for b, t in zip(base, ts)),
            "times_s": ts,
        }
    return {
        "config": f"cfg1 B{BATCH} I{INPUT} H{HIDDEN} L1, {STEPS} steps in chunks of {CHUNK}",
        "reps": reps,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharded_stream",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--worker", type=int, metavar="DEVICES", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.mesh)
        return 0
    result = measure(args.reps)
    print(f"{result['config']}, median of {args.reps} paired rounds")
    print(f"{'configuration':<18} {'ms/stream':>10} {'steps/s':>9} {'row-steps/s':>12} {'vs 1 device':>12}")
    for name, row in result["rows"].items():
        print(f"{name:<18} {row['median_s'] * 1e3:>10.2f} {row['steps_per_s']:>9.0f} "
              f"{row['row_steps_per_s']:>12.0f} {row['speedup_vs_1_device']:>11.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
