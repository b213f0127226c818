"""``python -m benchmarks``: the whole suite, or the cases matching ``--only``.

Case names: ``peak/sgemm``, ``lstm/{cfg1,cfg2,cfg3,cfg1-bidir,cfg1-proj}/{fwd,fwdbwd}``,
``gru/{cfg1,cfg2,cfg3}/{fwd,fwdbwd}``, ``rnn/cfg1/{fwd,fwdbwd}``,
``convlstm/{c1,c2}/{fwd,fwdbwd}``, ``stream/cfg1/fwd``, ``stream/ragged``, ``first_call/cfg1``,
``construct/cfg2``.
The sgemm peak always runs (the "% peak" column needs it), at the start and again at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

# Imported before anything starts JAX's backends, so that --small-loop-kernels (an XLA option
# of the whole process, see jax_impl/_xla_cpu.py) can still take effect.
import jax_impl  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class CaseSpec:
    name: str
    family: str  # "peak", "lstm", "gru", "rnn", "convlstm", "stream"
    config: Any
    pass_name: str
    build: Callable[[], list]
    flops: float
    reference: Optional[str]  # the "ratio vs torch oneDNN" column's denominator
    alt_reference: Optional[str] = None  # a second ratio column (torch on 1 thread)
    # extra named ratios: (num, den), or (a, b, c, d) for the ratio of ratios (a / b) / (c / d)
    pairs: list[tuple[str, ...]] = field(default_factory=list)
    schedule: Any = None
    # competitors measured against their own references: name -> (reference, alt_reference)
    # (the same-shape LSTM rows of a GRU/RNN case against torch's LSTM)
    own_references: dict[str, tuple[str, Optional[str]]] = field(default_factory=dict)


# ------------------------------------------------------------------------------ environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    except OSError:
        pass
    return []


def _loadavg() -> Optional[list[float]]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jaxlib  # noqa: PLC0415
    import numpy  # noqa: PLC0415
    import torch  # noqa: PLC0415

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {
            "torch": torch.__version__,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "numpy": numpy.__version__,
        },
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "torch_mkldnn_available": torch.backends.mkldnn.is_available(),
        "torch_mkldnn_enabled": torch.backends.mkldnn.enabled,
        "torch_parallel_info": torch.__config__.parallel_info(),
        "jax_devices": [str(d) for d in jax.devices()],
        "small_loop_kernels": jax_impl.small_loop_kernels_enabled(),
        "jax_backend": jax.default_backend(),
        "env": {k: os.environ.get(k) for k in (
            "XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
            "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_status": _git("status", "--short"),
        "loadavg_start": _loadavg(),
    }


# ------------------------------------------------------------------------------------ cases


def build_cases(quick: bool) -> list[CaseSpec]:
    from . import competitors as C  # noqa: PLC0415
    from .configs import (  # noqa: PLC0415
        CONVLSTM_CONFIGS,
        GRU_CONFIGS,
        LSTM_CONFIGS,
        PASSES,
        RNN_CONFIGS,
        SGEMM_SIZE,
        STREAM_CHUNK,
        STREAM_CONFIG,
        pass_flops,
    )
    from .streaming import JIT_FULL, STREAM_CHUNKS, STREAM_ONE, stream_competitors  # noqa: PLC0415
    from .timing import Schedule  # noqa: PLC0415

    if quick:
        small = Schedule(warmup=1, min_reps=2, max_reps=3, budget_s=2.0, slow_s=5.0,
                         slow_reps=1, skip_s=5.0)
        big = dataclasses.replace(small, min_reps=1, max_reps=2)
        peak = Schedule(warmup=1, min_reps=3, max_reps=3, budget_s=0.0)
    else:
        small = Schedule(warmup=2, min_reps=7, max_reps=30, budget_s=12.0, slow_s=8.0,
                         slow_reps=2, skip_s=60.0)
        big = Schedule(warmup=1, min_reps=4, max_reps=10, budget_s=45.0, slow_s=20.0,
                       slow_reps=2, skip_s=60.0)
        peak = Schedule(warmup=2, min_reps=10, max_reps=10, budget_s=0.0)

    def with_pilot(schedule: Schedule, flops: float) -> Schedule:
        # Big cases first run a short-sequence pilot to spot competitors too slow to run.
        return dataclasses.replace(schedule, pilot_fraction=0.05) if flops >= 5e9 else schedule

    def shrink(cfg):
        # --quick is a smoke run: the two big configs with fewer steps (FLOPs follow).
        if quick and cfg.name in ("cfg2", "c2"):
            steps = 32 if cfg.name == "cfg2" else 4
            return dataclasses.replace(cfg, steps=steps, note=f"--quick: T={steps}")
        return cfg

    cases = [CaseSpec(
        "peak/sgemm", "peak", SGEMM_SIZE, "fwd",
        lambda steps=None, batch=None: C.sgemm_competitors(SGEMM_SIZE),
        2.0 * SGEMM_SIZE ** 3, C.TORCH_MM, alt_reference=C.TORCH_MM_1T, schedule=peak,
    )]

    def at(cfg, steps, batch):
        if steps is not None:
            cfg = dataclasses.replace(cfg, steps=steps)
        if batch is not None:
            cfg = dataclasses.replace(cfg, batch=batch)
        return cfg

    for family, configs in (("lstm", LSTM_CONFIGS), ("gru", GRU_CONFIGS), ("rnn", RNN_CONFIGS)):
        for cfg0 in configs:
            cfg = shrink(cfg0)
            torch_ref, torch_1t, jax_name, flax_name = C.dense_names(cfg.cell)
            nnx_name, nnx_sm_name = C.dense_nnx_names(cfg.cell)
            for p in PASSES:
                flops = pass_flops(cfg.forward_flops(), p)
                pairs = [(nnx_name, jax_name), (nnx_sm_name, jax_name), (nnx_name, nnx_sm_name)]
                if family != "lstm":
                    pairs.append((jax_name, flax_name))
                    if p == "fwd":  # the same-shape LSTM runs in these rounds (see competitors)
                        pairs += [
                            (jax_name, torch_ref, C.SAME_JAX_LSTM, C.SAME_TORCH_LSTM),
                            (jax_name, torch_1t, C.SAME_JAX_LSTM, C.SAME_TORCH_LSTM_1T),
                            (jax_name, C.SAME_JAX_LSTM),
                            (torch_ref, C.SAME_TORCH_LSTM),
                            (torch_1t, C.SAME_TORCH_LSTM_1T),
                        ]
                cases.append(CaseSpec(
                    f"{family}/{cfg.name}/{p}", family, cfg, p,
                    (lambda steps=None, batch=None, cfg=cfg, p=p:
                     C.dense_competitors(at(cfg, steps, batch), p)),
                    flops, torch_ref, alt_reference=torch_1t, pairs=pairs,
                    schedule=with_pilot(big if cfg.name == "cfg2" else small, flops),
                    own_references={} if family == "lstm" or p != "fwd" else {
                        C.SAME_TORCH_LSTM: (C.SAME_TORCH_LSTM, C.SAME_TORCH_LSTM_1T),
                        C.SAME_TORCH_LSTM_1T: (C.SAME_TORCH_LSTM, C.SAME_TORCH_LSTM_1T),
                        C.SAME_JAX_LSTM: (C.SAME_TORCH_LSTM, C.SAME_TORCH_LSTM_1T),
                    },
                ))
    for cfg0 in CONVLSTM_CONFIGS:
        cfg = shrink(cfg0)
        for p in PASSES:
            flops = pass_flops(cfg.forward_flops(), p)
            cases.append(CaseSpec(
                f"convlstm/{cfg.name}/{p}", "convlstm", cfg, p,
                (lambda steps=None, batch=None, cfg=cfg, p=p:
                 C.convlstm_competitors(at(cfg, steps, batch), p)),
                flops, C.TORCH_CONV, alt_reference=C.TORCH_CONV_1T if p == "fwd" else None,
                pairs=[(C.TORCH_CONV, C.TORCH_NAIVE), (C.JAX_CONV, C.TORCH_NAIVE),
                       (C.JAX_NNX_CONV, C.JAX_CONV), (C.JAX_NNX_CONV_SM, C.JAX_CONV),
                       (C.JAX_NNX_CONV, C.JAX_NNX_CONV_SM)],
                schedule=with_pilot(big if cfg.name == "c2" else small, flops),
            ))
    cases.append(CaseSpec(
        f"stream/{STREAM_CONFIG.name}/fwd", "stream", STREAM_CONFIG, "fwd",
        lambda steps=None, batch=None: stream_competitors(STREAM_CONFIG, STREAM_CHUNK),
        STREAM_CONFIG.forward_flops(), JIT_FULL,
        pairs=[(STREAM_CHUNKS, JIT_FULL), (STREAM_CHUNKS, STREAM_ONE), (STREAM_ONE, JIT_FULL)],
        schedule=small,
    ))
    return cases


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None else 1e3 * x


def _quartiles(values: list[float]) -> Optional[list[float]]:
    """``[q1, q3]`` of paired ratios: how far one round's ratio strays on a shared machine."""
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def pilot(spec: CaseSpec, log=print) -> dict:
    """Times every competitor once (after one warm-up) on a sequence shortened to
    ``pilot_fraction`` of T (at least 1 step), full batch, and predicts the full call as linear
    in T. (Shrinking the batch too was tried: XLA's ConvLSTM backward is relatively much
    faster at batch 1, which hid a 3x slower full call.)"""
    from .timing import Schedule, run_interleaved  # noqa: PLC0415

    steps, batch = spec.config.steps, spec.config.batch
    short = max(1, round(steps * spec.schedule.pilot_fraction))
    small_batch = batch
    competitors = spec.build(steps=short, batch=small_batch)
    ct = run_interleaved(competitors, Schedule(warmup=1, min_reps=1, max_reps=1, budget_s=0),
                         log=log)
    predicted = {}
    for c in competitors:
        med = ct.median(c.name)
        predicted[c.name] = None if med is None else med * steps / short * batch / small_batch
    shown = ", ".join(f"{k} {v:.2f} s" for k, v in predicted.items() if v is not None)
    log(f"    pilot T={short} B={small_batch}: predicted full call {shown}")
    return {"steps": short, "batch": small_batch, "times_s": ct.times, "warmup_s": ct.warmup_times,
            "predicted_s": predicted, "errors": ct.errors}


def summarize(spec: CaseSpec, ct, peak_flops: Optional[float], competitors,
              pilot_info: Optional[dict] = None, skipped: frozenset = frozenset()) -> dict:
    """Medians, GFLOP/s, % of peak and paired ratios of one case."""
    from .configs import pass_flops  # noqa: PLC0415

    reference = spec.reference
    if reference not in ct.times and spec.family == "convlstm":
        from .competitors import TORCH_NAIVE  # noqa: PLC0415
        reference = TORCH_NAIVE  # torch_impl missing: fall back to the naive loop
    rows = []
    for c in competitors:
        med = ct.median(c.name)
        flops = spec.flops
        ref, alt = reference, spec.alt_reference
        if c.name in spec.own_references:
            ref, alt = spec.own_references[c.name]
            flops = pass_flops(dataclasses.replace(spec.config, cell="lstm").forward_flops(),
                               spec.pass_name)
        gflops = flops / med / 1e9 if med else None
        row = {
            "name": c.name,
            "framework": c.framework,
            "note": c.note,
            "times_s": ct.times.get(c.name, []),
            "warmup_s": ct.warmup_times.get(c.name, []),
            "median_s": med,
            "median_ms": _ms(med),
            "min_ms": _ms(min(ct.times[c.name])) if ct.times.get(c.name) else None,
            "gflops": gflops,
            "pct_peak": (100.0 * gflops * 1e9 / peak_flops) if gflops and peak_flops else None,
            "ratio_vs_ref": ct.ratio(c.name, ref) if ref else None,
            "ratio_vs_ref_per_rep": ct.paired_ratios(c.name, ref) if ref else [],
            "ratio_vs_alt": ct.ratio(c.name, alt) if alt else None,
            "error": ct.errors.get(c.name),
            "paired": c.name not in ct.unpaired and c.name not in skipped,
            "skipped": c.name in skipped,
        }
        if c.name in spec.own_references:
            row.update(reference=ref, alt_reference=alt, flops=flops)
        if c.name in skipped:
            est = pilot_info["predicted_s"][c.name]
            ref_med = ct.median(reference) if reference else None
            row["estimate_s"] = est
            row["estimate_from"] = (f"pilot with T={pilot_info['steps']} B={pilot_info['batch']}, "
                                    "scaled linearly in T and B")
            row["ratio_estimate"] = est / ref_med if est and ref_med else None
            row["gflops_estimate"] = spec.flops / est / 1e9 if est else None
        rows.append(row)
    pairs = {}
    for terms in spec.pairs:
        if len(terms) == 4:
            per = ct.paired_ratio_of_ratios(*terms)
            a, b, c, d = terms
            pairs[f"({a} / {b}) / ({c} / {d})"] = {
                "num": f"{a} / {b}", "den": f"{c} / {d}", "terms": list(terms),
                "per_rep": per, "median": statistics.median(per) if per else None,
                "iqr": _quartiles(per), "paired": bool(per)}
            continue
        num, den = terms
        per = ct.paired_ratios(num, den)
        pairs[f"{num} / {den}"] = {"num": num, "den": den, "per_rep": per,
                                   "median": ct.ratio(num, den), "iqr": _quartiles(per),
                                   "paired": bool(per)}
    cfg = spec.config
    return {
        "name": spec.name,
        "family": spec.family,
        "config": getattr(cfg, "name", "sgemm"),
        "config_detail": cfg.as_dict() if hasattr(cfg, "as_dict") else {"n": cfg},
        "describe": cfg.describe() if hasattr(cfg, "describe") else f"{cfg}x{cfg} float32",
        "pass": spec.pass_name,
        "flops": spec.flops,
        "reference": reference,
        "alt_reference": spec.alt_reference,
        "reps": ct.reps,
        "unpaired": ct.unpaired,
        "round_orders": ct.orders,
        "skipped": sorted(skipped),
        "pilot": pilot_info,
        "schedule": dataclasses.asdict(spec.schedule),
        "competitors": rows,
        "pairs": pairs,
        "errors": ct.errors,
    }


# ------------------------------------------------------------------------------------ targets


def evaluate_targets(results: dict) -> list[dict]:
    from . import competitors as C  # noqa: PLC0415
    from .streaming import JIT_FULL, STREAM_CHUNKS  # noqa: PLC0415

    cases = {c["name"]: c for c in results["cases"]}

    def ratio(case: str, num: str, den: str) -> Optional[float]:
        c = cases.get(case)
        if c is None:
            return None
        for pair in c["pairs"].values():
            if pair["num"] == num and pair["den"] == den:
                return pair["median"]
        if c["reference"] == den:
            row = next((r for r in c["competitors"] if r["name"] == num), None)
            if row is None:
                return None
            if row.get("skipped"):
                estimated.add(case)
                return row.get("ratio_estimate")
            return row["ratio_vs_ref"]
        return None

    out = []
    estimated: set = set()

    def vs_one_thread(case, num):
        c = cases.get(case)
        row = c and next((r for r in c["competitors"] if r["name"] == num), None)
        return row.get("ratio_vs_alt") if row else None

    def add(what: str, value, bound, unit="x", case=None, num=None, den=None,
            one_thread=False):
        est = case in estimated
        estimated.discard(case)
        if one_thread is False:
            one_thread = vs_one_thread(case, num) if case else None
        out.append({"target": what, "value": value, "bound": bound, "unit": unit,
                    "case": case, "num": num, "den": den, "estimated": est,
                    "value_vs_torch_1_thread": one_thread,
                    "ok": None if value is None else bool(value <= bound)})

    def pair(case: str, key: str) -> Optional[float]:
        p = cases.get(case, {}).get("pairs", {}).get(key)
        return p["median"] if p else None

    for cfg, p, bound in (("cfg1", "fwd", 1.0), ("cfg2", "fwd", 1.1), ("cfg3", "fwd", 0.5),
                          ("cfg1", "fwdbwd", 1.3), ("cfg2", "fwdbwd", 1.3)):
        case = f"lstm/{cfg}/{p}"
        if case in cases:
            add(f"{case}: {C.JAX_LSTM} / {C.TORCH_LSTM}",
                ratio(case, C.JAX_LSTM, C.TORCH_LSTM), bound,
                case=case, num=C.JAX_LSTM, den=C.TORCH_LSTM)
    # GRU forward: its ratio to torch no worse than the LSTM's at the same shape (both measured
    # in the same rounds: the paired ratio of ratios <= 1), and ahead of Flax's GRUCell.
    for cfg in ("cfg1", "cfg2", "cfg3"):
        case = f"gru/{cfg}/fwd"
        if case not in cases:
            continue
        key = f"({C.JAX_GRU} / {C.TORCH_GRU}) / ({C.SAME_JAX_LSTM} / {C.SAME_TORCH_LSTM})"
        key_1t = (f"({C.JAX_GRU} / {C.TORCH_GRU_1T}) / "
                  f"({C.SAME_JAX_LSTM} / {C.SAME_TORCH_LSTM_1T})")
        add(f"{case}: GRU ratio / LSTM ratio ({C.JAX_GRU} / {C.TORCH_GRU} over "
            f"{C.JAX_LSTM} / {C.TORCH_LSTM}, same shape, same rounds)",
            pair(case, key), 1.0, case=case, num=C.JAX_GRU, den=key,
            one_thread=pair(case, key_1t))
        add(f"{case}: {C.JAX_GRU} / {C.FLAX_GRU}", pair(case, f"{C.JAX_GRU} / {C.FLAX_GRU}"),
            1.0, case=case, num=C.JAX_GRU, den=C.FLAX_GRU, one_thread=None)
    for cfg in ("c1", "c2"):
        for p in ("fwd", "fwdbwd"):
            case = f"convlstm/{cfg}/{p}"
            if case in cases:
                add(f"{case}: {C.JAX_CONV} / {C.TORCH_CONV}",
                    ratio(case, C.JAX_CONV, C.TORCH_CONV), 0.8,
                    case=case, num=C.JAX_CONV, den=C.TORCH_CONV)
                add(f"{case}: {C.TORCH_CONV} / {C.TORCH_NAIVE}",
                    ratio(case, C.TORCH_CONV, C.TORCH_NAIVE), 1.0,
                    case=case, num=C.TORCH_CONV, den=C.TORCH_NAIVE)
    # NNX (nnx.jit) / Linen (jax.jit), same weights, same rounds: in every case that has both
    nnx_pairs = [(f"{nnx} / {linen}", nnx, linen) for nnx, linen in (
        (C.JAX_NNX_LSTM, C.JAX_LSTM), (C.JAX_NNX_GRU, C.JAX_GRU), (C.JAX_NNX_RNN, C.JAX_RNN),
        (C.JAX_NNX_CONV, C.JAX_CONV))]
    for case in cases:
        for key, num, den in nnx_pairs:
            if key in cases[case].get("pairs", {}):
                add(f"{case}: {key}", pair(case, key), 1.05, case=case, num=num, den=den,
                    one_thread=None)
    if "stream/cfg1/fwd" in cases:
        add(f"stream/cfg1/fwd: {STREAM_CHUNKS} (16) / {JIT_FULL}",
            ratio("stream/cfg1/fwd", STREAM_CHUNKS, JIT_FULL), 1.05,
            case="stream/cfg1/fwd", num=STREAM_CHUNKS, den=JIT_FULL)
    rag = results.get("ragged")
    if rag and "max_new" in rag:
        add(f"stream/ragged: new compilations for a ragged last chunk (worst of lengths "
            f"{min(rag['per_length'])}..{max(rag['per_length'])})", rag["max_new"], 0,
            unit="compilations")
    fc = results.get("first_call", {}).get("cold")
    if fc and "median" in fc:
        add("first_call/cfg1: trace + compile + run, fresh process (cold)",
            fc["median"]["first_call_s"], 0.3, unit="s")
    from .construct import NNX_COLD, TARGET_S  # noqa: PLC0415

    built = results.get("construct", {}).get(NNX_COLD)
    if built and "median" in built:
        what = built["what"]
        add(f"construct/cfg2: {what}, first in a fresh process",
            built["median"]["first_s"], TARGET_S, unit="s")
        add(f"construct/cfg2: {what}, again in the same process (warm)",
            built["median"]["warm_s"], TARGET_S, unit="s")
    return out


# ------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="carryover benchmarks: JAX/Flax vs PyTorch LSTM, GRU, RNN and ConvLSTM, "
                    "side by side.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="few repetitions, cfg2/c2 with fewer steps: a ~2 minute smoke run")
    parser.add_argument("--only", metavar="PATTERN", default=None,
                        help="run only cases whose name matches this regular expression "
                             "(re.search), e.g. 'lstm/cfg1', 'fwd$', 'convlstm|stream'")
    parser.add_argument("--out", metavar="DIR", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--first-call-runs", type=int, default=None,
                        help="fresh subprocesses per mode for the first-call and construction "
                             "times (default 3, quick 1)")
    parser.add_argument("--list", action="store_true", help="list the case names and exit")
    parser.add_argument("--small-loop-kernels", action="store_true",
                        help="run with jax_impl.enable_small_loop_kernels() (an opt-in XLA:CPU "
                             "option of the whole process; the first-call children get it too)")
    parser.add_argument("--rerender", action="store_true",
                        help="rewrite results.md and ratios.png (and the targets) from the "
                             "results.json in --out, without running anything")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.small_loop_kernels and not jax_impl.enable_small_loop_kernels():
        raise SystemExit("--small-loop-kernels: could not set the XLA option (see the warning)")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")

    from .configs import STREAM_CHUNK, STREAM_CONFIG  # noqa: PLC0415
    from .report import write_all  # noqa: PLC0415

    if args.rerender:
        results = json.loads((args.out / "results.json").read_text())
        results["targets"] = evaluate_targets(results)
        paths = write_all(results, args.out)
        print(f"wrote {', '.join(str(p) for p in paths)}")
        return 0

    cases = build_cases(args.quick)
    extra = ["stream/ragged", "first_call/cfg1", "construct/cfg2"]
    names = [c.name for c in cases] + extra
    if args.list:
        print("\n".join(names))
        return 0
    only = re.compile(args.only) if args.only else None

    def selected(name: str) -> bool:
        return only is None or bool(only.search(name))

    chosen = [c for c in cases if c.family == "peak" or selected(c.name)]
    if only is not None and not any(selected(n) for n in names):
        print(f"--only {args.only!r} matches no case; cases are:\n  " + "\n  ".join(names),
              file=sys.stderr)
        return 2

    from .timing import run_interleaved  # noqa: PLC0415

    t_start = time.time()
    results: dict = {
        "meta": {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "quick": args.quick,
            "only": args.only,
        },
        "environment": environment(),
        "cases": [],
    }
    env = results["environment"]
    print(f"carryover benchmarks — {env['cpu_model']}, {env['cpu_count']} CPUs, torch "
          f"{env['versions']['torch']} ({env['torch_num_threads']} threads), jax "
          f"{env['versions']['jax']}, load {env['loadavg_start']}", flush=True)

    peak_flops: Optional[float] = None
    peak_case = chosen[0]

    def run_case(spec: CaseSpec) -> dict:
        print(f"\n== {spec.name}  ({getattr(spec.config, 'describe', lambda: spec.config)()})",
              flush=True)
        load_before = _loadavg()
        t0 = time.perf_counter()
        log = lambda s: print(s, flush=True)  # noqa: E731
        pilot_info, skipped = None, frozenset()
        # references of ratios always run in the rounds, whatever their speed
        protect = frozenset(n for n in (spec.reference, spec.alt_reference) if n) | frozenset(
            den for terms in spec.pairs for den in terms[1::2]) | frozenset(
            n for refs in spec.own_references.values() for n in refs if n)
        if spec.schedule.pilot_fraction:
            pilot_info = pilot(spec, log=log)
            skipped = frozenset(
                k for k, v in pilot_info["predicted_s"].items()
                if v is not None and v > spec.schedule.skip_s and k not in protect)
            for k in sorted(skipped):
                log(f"    {k}: predicted {pilot_info['predicted_s'][k]:.0f} s per call > "
                    f"{spec.schedule.skip_s} s: not run at full size (estimate reported)")
        t1 = time.perf_counter()
        competitors = spec.build()
        t_build = time.perf_counter() - t1
        ct = run_interleaved(competitors, spec.schedule, log=log, exclude=skipped,
                             protect=protect)
        summary = summarize(spec, ct, peak_flops, competitors, pilot_info, skipped)
        summary["build_s"] = t_build
        summary["wall_s"] = time.perf_counter() - t0
        summary["loadavg_before"] = load_before
        summary["loadavg_after"] = _loadavg()
        for row in summary["competitors"]:
            if row["skipped"]:
                print(f"   {row['name']:<28} skipped, estimate {1e3 * row['estimate_s']:10.1f} ms"
                      + (f"  ratio ~{row['ratio_estimate']:.2f}" if row["ratio_estimate"] else ""),
                      flush=True)
                continue
            if row["median_ms"] is None:
                print(f"   {row['name']:<28} failed: {row['error']}", flush=True)
                continue
            ratio = row["ratio_vs_ref"]
            print(f"   {row['name']:<28} {row['median_ms']:10.3f} ms  "
                  f"{row['gflops'] or 0:8.2f} GFLOP/s"
                  + (f"  ratio {ratio:6.3f}" if ratio is not None else ""), flush=True)
        for key, pair in summary["pairs"].items():
            if pair["median"] is not None:
                print(f"   {key}: {pair['median']:.3f}", flush=True)
        print(f"   ({ct.reps} reps, {summary['wall_s']:.1f} s)", flush=True)
        return summary

    peak_start = run_case(peak_case)
    peak_flops = peak_start["flops"] / peak_start["competitors"][0]["median_s"]
    for row in peak_start["competitors"]:
        if row["gflops"]:
            row["pct_peak"] = 100.0 * row["gflops"] * 1e9 / peak_flops
    results["cases"].append(peak_start)
    for spec in chosen[1:]:
        summary = run_case(spec)
        results["cases"].append(summary)

    if selected("stream/ragged"):
        from .streaming import ragged_compilations  # noqa: PLC0415

        print("\n== stream/ragged (compilations for a ragged last chunk after warm-up)",
              flush=True)
        lengths = [5, 13] if args.quick else list(range(1, STREAM_CHUNK))
        results["ragged"] = ragged_compilations(STREAM_CONFIG, STREAM_CHUNK, lengths)
    if selected("first_call/cfg1"):
        from .first_call import measure  # noqa: PLC0415

        runs = args.first_call_runs or (1 if args.quick else 3)
        print(f"\n== first_call/cfg1 ({runs} fresh subprocess(es) per mode)", flush=True)
        results["first_call"] = {mode: measure(mode, "cfg1", runs) for mode in
                                 ("cold", "after_init")}
    if selected("construct/cfg2"):
        from .construct import MODES  # noqa: PLC0415
        from .construct import measure as measure_construct  # noqa: PLC0415

        runs = args.first_call_runs or (1 if args.quick else 3)
        print(f"\n== construct/cfg2 (eager construction, {runs} fresh subprocess(es) per mode)",
              flush=True)
        results["construct"] = {mode: measure_construct(mode, "cfg2", runs) for mode in MODES}

    # The peak again at the end: the box is shared, say how much it moved.
    peak_end = run_case(peak_case)
    peak_end["name"] = "peak/sgemm (end)"
    for row in peak_end["competitors"]:
        if row["gflops"]:
            row["pct_peak"] = 100.0 * row["gflops"] * 1e9 / peak_flops
    results["cases"].append(peak_end)
    end_flops = peak_end["flops"] / peak_end["competitors"][0]["median_s"]
    results["peak"] = {
        "what": "torch.mm 2048x2048 float32, default threads, median",
        "gflops": peak_flops / 1e9,
        "gflops_end": end_flops / 1e9,
        "used_for_pct": "start",
    }
    results["targets"] = evaluate_targets(results)
    results["meta"]["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    results["meta"]["wall_s"] = time.time() - t_start
    results["environment"]["loadavg_end"] = _loadavg()

    paths = write_all(results, args.out)
    print("\nTargets:")
    for t in results["targets"]:
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[t["ok"]]
        value = "n/a" if t["value"] is None else (
            f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"]))
        if t.get("estimated"):
            value = f"~{value} (estimate from pilot)"
        print(f"  [{mark}] {t['target']}: {value} (target <= {t['bound']} {t['unit']})")
    print(f"\nwrote {', '.join(str(p) for p in paths)}  ({results['meta']['wall_s']:.0f} s)")
    return 0
