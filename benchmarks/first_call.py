"""First-call time of ``jax_impl.LSTM`` on cfg1 forward, in a fresh process (cold caches).

Run by the suite as ``python -m benchmarks.first_call --mode MODE`` in a subprocess; prints one
JSON line. Modes:

* ``cold``: the variables are built from numpy in the documented parameter layout, so nothing
  at all is traced or compiled before the timed call; the first call pays tracing, lowering,
  XLA compilation (including XLA's one-time start-up) and the run.
* ``after_init``: ``variables = model.init(...)`` first (timed on its own), then the first call
  of the jitted ``apply`` — what a user usually sees.

The persistent compilation cache is switched off in the child (``JAX_ENABLE_COMPILATION_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .configs import LSTMConfig, find_lstm


def _child(mode: str, config: str) -> dict:
    t0 = time.perf_counter()
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import jax_impl  # noqa: PLC0415

    t_import = time.perf_counter() - t0
    cfg: LSTMConfig = find_lstm(config)
    rng = np.random.default_rng(0)
    t1 = time.perf_counter()
    x = jnp.asarray(rng.standard_normal((cfg.batch, cfg.steps, cfg.input_size), dtype=np.float32))
    t_backend = time.perf_counter() - t1
    model = jax_impl.LSTM(cfg.hidden_size, num_layers=cfg.num_layers)

    out = {"mode": mode, "config": config, "import_s": t_import, "backend_init_s": t_backend}
    if mode == "cold":
        h = cfg.hidden_size
        bound = 1.0 / math.sqrt(h)
        params = {}
        in_features = cfg.input_size
        for layer in range(cfg.num_layers):
            shapes = {"ih_kernel": (in_features, 4 * h), "hh_kernel": (h, 4 * h),
                      "ih_bias": (4 * h,), "hh_bias": (4 * h,)}
            params[f"layer_{layer}"] = {
                k: jnp.asarray(rng.uniform(-bound, bound, s).astype(np.float32))
                for k, s in shapes.items()
            }
            in_features = h
        variables = {"params": params}
    else:
        t2 = time.perf_counter()
        variables = jax.block_until_ready(model.init(jax.random.key(0), x))
        out["init_s"] = time.perf_counter() - t2

    apply = jax.jit(model.apply)
    t3 = time.perf_counter()
    jax.block_until_ready(apply(variables, x))
    out["first_call_s"] = time.perf_counter() - t3
    t4 = time.perf_counter()
    jax.block_until_ready(apply(variables, x))
    out["second_call_s"] = time.perf_counter() - t4
    out["jax_version"] = jax.__version__
    return out


def run_fresh(module: str, arguments: list[str], runs: int, describe, log=print):
    """``python -m module *arguments`` in ``runs`` fresh processes (JAX's compilation cache
    off), each printing one JSON line last. Returns ``(samples, error)``: the parsed lines, and
    the stderr tail of the first child that failed (None if none did). ``describe(sample)``
    is logged after each run."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    samples = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-m", module, *arguments], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            return samples, proc.stderr[-2000:]
        samples.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        log(describe(samples[-1]))
    return samples, None


def medians(samples: list[dict], keys) -> dict:
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def measure(mode: str, config: str = "cfg1", runs: int = 3, log=print) -> dict:
    """Runs the child ``runs`` times; returns every run and the medians."""
    samples, error = run_fresh(
        "benchmarks.first_call", ["--mode", mode, "--config", config], runs,
        lambda sample: f"    first call ({mode}): {sample['first_call_s']:.3f} s", log,
    )
    if error is not None:
        return {"mode": mode, "error": error, "samples": samples}
    med = medians(samples, [k for k in samples[0] if k.endswith("_s")])
    return {"mode": mode, "config": config, "runs": runs, "samples": samples, "median": med}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("cold", "after_init"), default="cold")
    parser.add_argument("--config", default="cfg1")
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.mode, args.config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
