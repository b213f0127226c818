"""The fixed cost of one call of an NNX module under each way of jitting it, against the Linen
module under ``jax.jit``: ``python -m benchmarks.nnx_overhead``.

Each form runs a one-step sequence (B=1, T=1), so that the call is almost all dispatch: what
is left is the Python work each form does around the compiled program. Forms, all with the same
weights (``load_linen_params``) and checked to give the same output:

* ``linen jax.jit``: ``jax.jit(model.apply)(variables, x)``, the suite's Linen competitor;
* ``nnx.jit``: ``nnx.jit(lambda m, x: m(x))(module, x)``, Flax's default graph mode: every call
  flattens the module's object graph into a graph definition and state on the way in, and
  merges the state back into the module on the way out;
* ``nnx.jit(graph=False)``: tree mode (the module handled as a pytree; no shared references);
* ``nnx.cached_partial``: the graph traversal cached across calls (Flax's performance guide);
* ``split/merge + jax.jit``: ``nnx.split`` once, then ``jax.jit`` of a function that merges:
  the state is an ``nnx.State`` pytree, flattened by JAX's C++ dispatch;
* ``split/merge, state out``: the same function returning the state too, as graph-mode
  ``nnx.jit``'s compiled program does (a copy of every parameter per call);
* ``nnx.split(module)`` and ``nnx.merge(graphdef, state)`` alone (no jit): the traversal
  ``nnx.jit`` pays on each call.

Times are per call (call + ``block_until_ready``), median over interleaved rounds of
``--calls`` calls each. Sizes: cfg3's (1 layer) and cfg2's (2 layers) modules.

``--full CONFIG ...`` then times the jitted forms at the configurations' full shapes (forward,
one call per form per round, the order shuffled every round) and prints each form's paired
median ratio to the Linen call with its interquartile range: how the fixed cost above shows in
a real call, e.g. ``--full cfg3 cfg1``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jax_impl
import jax_impl.nnx as jax_nnx

from .configs import find_lstm


def forms(config: str, full: bool = False) -> dict:
    """name -> call, for the module of ``config`` on a (B1, T1) input, or at the full shape."""
    cfg = find_lstm(config)
    shape = (cfg.batch, cfg.steps) if full else (1, 1)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((*shape, cfg.input_size),
                                                             dtype=np.float32))
    linen = jax_impl.LSTM(cfg.hidden_size, num_layers=cfg.num_layers)
    variables = linen.init(jax.random.key(0), x)
    module = jax_nnx.LSTM(cfg.input_size, cfg.hidden_size, cfg.num_layers, rngs=nnx.Rngs(0))
    jax_nnx.load_linen_params(module, variables)

    apply = jax.jit(linen.apply)
    f_graph = nnx.jit(lambda m, xx: m(xx))
    f_tree = nnx.jit(lambda m, xx: m(xx), graph=False)
    cached = nnx.cached_partial(f_graph, module)
    graphdef, state = nnx.split(module)
    f_sm = jax.jit(lambda s, xx: nnx.merge(graphdef, s)(xx))
    f_sm_out = jax.jit(lambda s, xx: (nnx.merge(graphdef, s)(xx), s))
    out = {
        "linen jax.jit": lambda: apply(variables, x),
        "nnx.jit": lambda: f_graph(module, x),
        "nnx.jit(graph=False)": lambda: f_tree(module, x),
        "nnx.cached_partial": lambda: cached(x),
        "split/merge + jax.jit": lambda: f_sm(state, x),
        "split/merge, state out": lambda: f_sm_out(state, x)[0],
        "nnx.split alone": lambda: nnx.split(module),
        "nnx.merge alone": lambda: nnx.merge(graphdef, state),
    }
    reference = jax.block_until_ready(out["linen jax.jit"]())
    for name in ("nnx.jit", "nnx.jit(graph=False)", "nnx.cached_partial",
                 "split/merge + jax.jit", "split/merge, state out"):
        got = jax.block_until_ready(out[name]())
        same = all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(reference), jax.tree.leaves(got)))
        if not same:
            raise RuntimeError(f"{name}: output differs from the Linen module's")
    return out


def measure(config: str, rounds: int, calls: int) -> dict:
    fns = forms(config)
    for fn in fns.values():  # warm-up
        jax.block_until_ready(fn())
    per_call = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                jax.block_until_ready(fn())
            per_call[name].append((time.perf_counter() - t0) / calls)
    return {name: {"median_us": 1e6 * statistics.median(t),
                   "min_us": 1e6 * min(t)} for name, t in per_call.items()}


def measure_full(config: str, rounds: int) -> dict:
    fns = {k: v for k, v in forms(config, full=True).items() if not k.endswith("alone")}
    for fn in fns.values():
        jax.block_until_ready(fn())
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t0)
    base = times["linen jax.jit"]
    out = {}
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, base)]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
        out[name] = {"median_ms": 1e3 * statistics.median(t), "ratio": statistics.median(ratios),
                     "iqr": [q1, q3]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["cfg3", "cfg2"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--full", nargs="*", default=[], metavar="CONFIG",
                        help="also time the forms at these configurations' full shapes")
    parser.add_argument("--full-rounds", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    results = {c: measure(c, args.rounds, args.calls) for c in args.configs}
    full = {c: measure_full(c, args.full_rounds) for c in args.full}
    if args.json:
        print(json.dumps({"overhead": results, "full": full}))
        return 0
    for config, rows in results.items():
        cfg = find_lstm(config)
        print(f"{config} module (I{cfg.input_size} H{cfg.hidden_size} L{cfg.num_layers}), "
              "B1 T1, per call:")
        base = rows["linen jax.jit"]["median_us"]
        for name, row in rows.items():
            # the traversals alone are no jitted call: no difference to the Linen call
            extra = "" if name.endswith("alone") else (
                f"  {row['median_us'] - base:+7.1f} us against linen jax.jit")
            print(f"  {name:<24} {row['median_us']:8.1f} us  (min {row['min_us']:7.1f}){extra}")
    for config, rows in full.items():
        cfg = find_lstm(config)
        print(f"{config} at full shape ({cfg.describe()}), forward, {args.full_rounds} rounds:")
        for name, row in rows.items():
            print(f"  {name:<24} {row['median_ms']:8.3f} ms  paired ratio to linen "
                  f"{row['ratio']:.3f} (IQR {row['iqr'][0]:.3f}-{row['iqr'][1]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
