"""``jax_impl`` at an older commit against the working tree's, paired in one process.

    python -m benchmarks.before_after --before 9705e97            # LSTM cfg1-3, ConvLSTM c1-c2
    python -m benchmarks.before_after --before 9705e97 --only 'cfg1|c1' --json /tmp/ba.json

The old package is extracted with ``git archive REV jax_impl`` into a temporary folder, imported
first (every submodule), and its ``sys.modules`` entries renamed ``jax_impl_before*``; then the
working tree's ``jax_impl`` is imported as usual. Both modules are built with their default
options, the *new* module's ``init`` gives the variables that both apply (the parameter trees
must be the same: checked), and both are jitted as the suite does (``benchmarks.competitors``:
forward returns output and carry; forward+backward the gradients of sum(output) with respect to
every parameter and the input). Before timing, the two are compared: outputs and gradients,
bitwise and by the largest difference relative to the largest magnitude, and XLA's optimized
programs (``program_text``, ``compare_programs``: same, reordered, or differs): when both
revisions compile to the same program, any timing difference is the machine's noise, whatever
the load.

Timing is the suite's interleaved runner (``benchmarks.timing``): warm-up, then rounds that
call old and new once each, the order alternating, and the median of the per-round ratios
new / old (< 1: the new code is faster), with its interquartile range; also the ratio of the
two fastest calls (on a contended machine the minimum is the call least disturbed) and the
paired median of the process CPU time per call (``time.process_time``, all threads: the work
done, less sensitive than wall time to being descheduled on a loaded machine). Each case's
load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import pkgutil
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OLD_NAME = "jax_impl_before"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=False).stdout


def import_before(rev: str):
    """Imports ``jax_impl`` as of ``rev`` under the name ``jax_impl_before`` and returns it.

    Must run before anything imports the working tree's ``jax_impl``.
    """
    if any(k == "jax_impl" or k.startswith("jax_impl.") for k in sys.modules):
        raise RuntimeError("jax_impl is already imported: import the old one first")
    tmp = tempfile.mkdtemp(prefix="carryover-before-")
    with tarfile.open(fileobj=BytesIO(_git("archive", rev, "jax_impl"))) as tar:
        tar.extractall(tmp, filter="data")
    sys.path.insert(0, tmp)
    try:
        pkg = importlib.import_module("jax_impl")
        for info in pkgutil.walk_packages(pkg.__path__, "jax_impl."):
            importlib.import_module(info.name)
    finally:
        sys.path.remove(tmp)
    for key in [k for k in sys.modules if k == "jax_impl" or k.startswith("jax_impl.")]:
        module = sys.modules.pop(key)
        new_key = OLD_NAME + key[len("jax_impl"):]
        sys.modules[new_key] = module
        # relative imports run later (inside functions) must resolve to the old package
        package = module.__dict__.get("__package__") or ""
        if package == "jax_impl" or package.startswith("jax_impl."):
            module.__package__ = OLD_NAME + package[len("jax_impl"):]
    return sys.modules[OLD_NAME]


def _compare(a, b) -> dict:
    """Bitwise equality and the largest |a - b| / max|b| over the leaves of two trees."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    if len(la) != len(lb):
        return {"bitwise_equal": False, "max_rel_diff": None, "error": "different trees"}
    worst, equal = 0.0, True
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if x.shape != y.shape:
            return {"bitwise_equal": False, "max_rel_diff": None, "error": "different shapes"}
        equal = equal and bool(np.array_equal(x, y))
        scale = float(np.max(np.abs(y))) or 1.0
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return {"bitwise_equal": equal, "max_rel_diff": worst}


def program_text(fn, *args) -> str:
    """XLA's optimized program for ``jax.jit(fn)(*args)``, normalized for comparison: metadata
    (source lines, op names) dropped and every ``%name`` renamed by order of appearance, so two
    revisions that compile to the same program give the same text."""
    import jax  # noqa: PLC0415

    text = jax.jit(fn).lower(*args).compile().as_text()
    names: dict[str, str] = {}

    def rename(m):
        return names.setdefault(m.group(0), f"%v{len(names)}")

    lines = []
    for line in text.splitlines():
        if not re.match(r"^\s*(ROOT\s+)?%|^ENTRY|^\}", line):
            continue  # the header, and the tables of file and function names
        line = re.sub(r", metadata=\{[^{}]*\}", "", line)
        lines.append(re.sub(r"%[\w.\-]+", rename, line))
    return "\n".join(lines)


def compare_programs(a: str, b: str) -> str:
    """``"same"``; ``"reordered"``: the same instructions (names aside) in another order, e.g.
    two independent weight-gradient matmuls after the loop swapped; else ``"differs"``."""
    if a == b:
        return "same"

    def bag(text):
        return sorted(re.sub(r"%v\d+", "%", line) for line in text.splitlines())
    return "reordered" if bag(a) == bag(b) else "differs"


def build_case(old, new, family: str, cfg, pass_name: str):
    """The two competitors of a case, and how their results compare."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from .competitors import _jax_runner  # noqa: PLC0415
    from .timing import Competitor  # noqa: PLC0415

    rng = np.random.default_rng(0)
    if family == "lstm":
        x = jnp.asarray(rng.standard_normal((cfg.batch, cfg.steps, cfg.input_size),
                                            dtype=np.float32))
        make = lambda pkg: pkg.LSTM(cfg.hidden_size, num_layers=cfg.num_layers)  # noqa: E731
    else:
        x = jnp.asarray(rng.standard_normal(
            (cfg.batch, cfg.steps, cfg.height, cfg.width, cfg.in_channels), dtype=np.float32))
        make = lambda pkg: pkg.ConvLSTM(cfg.hidden_channels, cfg.kernel,  # noqa: E731
                                        num_layers=cfg.num_layers)
    m_old, m_new = make(old), make(new)
    variables = m_new.init(jax.random.key(0), x)
    old_shapes = jax.eval_shape(m_old.init, jax.random.key(0), x)
    same_tree = (jax.tree_util.tree_structure(old_shapes)
                 == jax.tree_util.tree_structure(variables)) and all(
        a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(old_shapes),
                                           jax.tree_util.tree_leaves(variables)))
    if not same_tree:
        raise ValueError(f"{family}/{cfg.name}: the parameter trees differ between revisions")
    run_old = _jax_runner(m_old.apply, variables, x, pass_name, output=lambda r: r[0])
    run_new = _jax_runner(m_new.apply, variables, x, pass_name, output=lambda r: r[0])
    check = _compare(run_new(), run_old())

    def traced(apply):
        if pass_name == "fwd":
            return apply
        return jax.grad(lambda v, xx: jnp.sum(apply(v, xx)[0]), argnums=(0, 1))

    check["program"] = compare_programs(program_text(traced(m_old.apply), variables, x),
                                        program_text(traced(m_new.apply), variables, x))
    cpu: dict[str, list[float]] = {"before": [], "after": []}

    def with_cpu_time(fn, store):
        def run():
            c0 = time.process_time()
            fn()
            store.append(time.process_time() - c0)
        return run

    competitors = [Competitor("before", "jax", with_cpu_time(run_old, cpu["before"])),
                   Competitor("after", "jax", with_cpu_time(run_new, cpu["after"]))]
    return competitors, check, cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.before_after",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="REV",
                        help="the older commit (any git revision)")
    parser.add_argument("--only", metavar="PATTERN", default=None,
                        help="cases whose name matches (re.search), e.g. 'lstm/cfg1/'")
    parser.add_argument("--json", type=Path, default=None, help="write everything as JSON")
    parser.add_argument("--programs-only", action="store_true",
                        help="compare outputs and compiled programs, time nothing")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the time budget and repetition bounds (0.2: a smoke run)")
    args = parser.parse_args(argv)

    before_commit = _git("rev-parse", args.before).decode().strip()
    old = import_before(args.before)
    import jax_impl as new  # noqa: PLC0415

    from .configs import CONVLSTM_CONFIGS, LSTM_CONFIGS  # noqa: PLC0415
    from .timing import Schedule, run_interleaved  # noqa: PLC0415

    assert new is not old and new.__file__ != old.__file__
    after_commit = _git("rev-parse", "HEAD").decode().strip()
    dirty = bool(_git("status", "--short", "jax_impl").strip())

    def sched(big: bool) -> Schedule:
        s = args.scale
        if big:
            return Schedule(warmup=1, min_reps=max(2, round(6 * s)), max_reps=max(2, round(16 * s)),
                            budget_s=60.0 * s)
        return Schedule(warmup=2, min_reps=max(3, round(15 * s)), max_reps=max(3, round(60 * s)),
                        budget_s=20.0 * s)

    cases = []
    for cfg in LSTM_CONFIGS:
        if cfg.name in ("cfg1", "cfg2", "cfg3"):
            cases += [("lstm", cfg, p) for p in ("fwd", "fwdbwd")]
    for cfg in CONVLSTM_CONFIGS:
        cases += [("convlstm", cfg, p) for p in ("fwd", "fwdbwd")]
    only = re.compile(args.only) if args.only else None

    def load():
        return [round(v, 2) for v in os.getloadavg()]

    results = {"before": before_commit, "after": after_commit, "after_dirty": dirty,
               "started": dt.datetime.now().isoformat(timespec="seconds"),
               "loadavg_start": load(), "cases": []}
    print(f"before {before_commit[:10]} vs after {after_commit[:10]}"
          f"{' + uncommitted jax_impl changes' if dirty else ''}; load {load()}", flush=True)
    if not args.programs_only:
        print(f"{'case':<22} {'before ms':>10} {'after ms':>10} {'new/old':>8} {'IQR':>13} "
              f"{'min/min':>8} {'cpu n/o':>8} {'reps':>5}  outputs  program  load", flush=True)
    for family, cfg, pass_name in cases:
        name = f"{family}/{cfg.name}/{pass_name}"
        if only is not None and not only.search(name):
            continue
        load_before = load()
        competitors, check, cpu = build_case(old, new, family, cfg, pass_name)
        same = "bitwise" if check["bitwise_equal"] else f"{check['max_rel_diff']:.1e}"
        if args.programs_only:
            print(f"{name:<22} outputs {same:<8} compiled program: {check['program']}",
                  flush=True)
            results["cases"].append({"case": name, "outputs": check})
            continue
        big = cfg.name in ("cfg2", "c2")
        ct = run_interleaved(competitors, sched(big), log=lambda s: print(s, flush=True))
        per = ct.paired_ratios("after", "before")
        for who in cpu:  # drop the warm-up calls
            del cpu[who][: len(ct.warmup_times[who])]
        cpu_per = [a / b for a, b in zip(cpu["after"], cpu["before"]) if b > 0]
        q = statistics.quantiles(per, n=4) if len(per) >= 2 else [float("nan")] * 3
        row = {
            "case": name, "describe": cfg.describe(), "pass": pass_name,
            "before_ms": 1e3 * ct.median("before"), "after_ms": 1e3 * ct.median("after"),
            "ratio_new_over_old": statistics.median(per), "ratio_q1": q[0], "ratio_q3": q[2],
            "ratio_of_minimums": min(ct.times["after"]) / min(ct.times["before"]),
            "cpu_ratio_new_over_old": statistics.median(cpu_per) if cpu_per else None,
            "cpu_per_rep": cpu_per, "cpu_s": cpu,
            "per_rep": per, "reps": ct.reps, "times_s": ct.times, "warmup_s": ct.warmup_times,
            "outputs": check, "loadavg_before": load_before, "loadavg_after": load(),
        }
        results["cases"].append(row)
        print(f"{name:<22} {row['before_ms']:10.3f} {row['after_ms']:10.3f} "
              f"{row['ratio_new_over_old']:8.3f} {q[0]:6.3f}-{q[2]:6.3f} "
              f"{row['ratio_of_minimums']:8.3f} {row['cpu_ratio_new_over_old'] or 0:8.3f} "
              f"{ct.reps:5d}  {same:<8} {check['program']:<9} "
              f"{row['loadavg_after']}", flush=True)
    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    results["loadavg_end"] = load()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
