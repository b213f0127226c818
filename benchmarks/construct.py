"""Eager construction of ``jax_impl.nnx.LSTM`` at a configuration's sizes (cfg2 in the suite),
against ``torch.nn.LSTM``'s (its uniform initialisation is the reference), in fresh processes.

Run by the suite as ``python -m benchmarks.construct --mode MODE`` in a subprocess; prints one
JSON line. Modes:

* ``nnx``: ``jax_impl.nnx.LSTM(I, H, L, rngs=nnx.Rngs(0))`` right after the imports, nothing
  run by JAX before: the first construction pays what a user's first model does (JAX's
  backend start, the compilation of the key derivation behind ``rngs.params()``); then
  ``--warm`` more constructions in the same process.
* ``nnx_backend_up``: the same after one tiny JAX computation (timed apart as
  ``backend_s``), so the backend's share of the first construction shows.
* ``torch``: ``torch.nn.LSTM(I, H, L, batch_first=True)``, first and warm, the same way.

A construction is timed until its parameters exist: JAX's are blocked on
(``jax.block_until_ready``); torch's ``uniform_`` is synchronous.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from .configs import LSTMConfig, find_lstm
from .first_call import medians, run_fresh

NNX_COLD, NNX_BACKEND_UP, TORCH = "nnx", "nnx_backend_up", "torch"
MODES = (NNX_COLD, NNX_BACKEND_UP, TORCH)
TARGET_S = 0.5  # issue 14: an eager construction at cfg2 under half a second
WARM = 10


def _child(mode: str, config: str, warm: int) -> dict:
    cfg: LSTMConfig = find_lstm(config)
    sizes = (cfg.input_size, cfg.hidden_size, cfg.num_layers)
    out: dict = {"mode": mode, "config": config}
    t0 = time.perf_counter()
    if mode == TORCH:
        import torch  # noqa: PLC0415

        out["import_s"] = time.perf_counter() - t0
        out["what"] = "torch.nn.LSTM({}, {}, {}, batch_first=True)".format(*sizes)

        def build():
            return torch.nn.LSTM(*sizes, batch_first=True)
    else:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
        from flax import nnx  # noqa: PLC0415

        import jax_impl.nnx  # noqa: PLC0415

        out["import_s"] = time.perf_counter() - t0
        out["what"] = "jax_impl.nnx.LSTM({}, {}, {}, rngs=nnx.Rngs(0))".format(*sizes)
        if mode == NNX_BACKEND_UP:
            t1 = time.perf_counter()
            jax.block_until_ready(jnp.zeros(()) + 1)
            out["backend_s"] = time.perf_counter() - t1

        def build():
            module = jax_impl.nnx.LSTM(*sizes, rngs=nnx.Rngs(0))
            jax.block_until_ready(nnx.state(module))
            return module

    t2 = time.perf_counter()
    build()
    out["first_s"] = time.perf_counter() - t2
    times = []
    for _ in range(warm):
        t3 = time.perf_counter()
        build()
        times.append(time.perf_counter() - t3)
    out["warm_all_s"] = times
    out["warm_s"] = statistics.median(times)
    return out


def measure(mode: str, config: str = "cfg2", runs: int = 3, warm: int = WARM,
            log=print) -> dict:
    """Runs the child ``runs`` times; returns every run and the medians over runs."""
    samples, error = run_fresh(
        "benchmarks.construct", ["--mode", mode, "--config", config, "--warm", str(warm)], runs,
        lambda sample: (f"    construct ({mode}): first {sample['first_s']:.3f} s, warm "
                        f"{sample['warm_s']:.4f} s"), log,
    )
    if error is not None:
        return {"mode": mode, "error": error, "samples": samples}
    med = medians(samples, [k for k in samples[0] if k.endswith("_s") and k != "warm_all_s"])
    return {"mode": mode, "config": config, "what": samples[0]["what"], "runs": runs,
            "warm": warm, "samples": samples, "median": med}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, default=NNX_COLD)
    parser.add_argument("--config", default="cfg2")
    parser.add_argument("--warm", type=int, default=WARM,
                        help="constructions after the first, in the same process")
    args = parser.parse_args(argv)
    print(json.dumps(_child(args.mode, args.config, args.warm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
