"""The outputs: ``results.json`` (everything), ``results.md`` (the table), ``ratios.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

JAX_FAMILIES = ("lstm", "gru", "rnn", "convlstm")


def _fresh_process_table(section, title: str, columns: list[str], cells) -> list[str]:
    """A markdown table with a row per mode of a fresh-process measurement (``first_call``,
    ``construct``): ``cells(entry, medians)``, or "failed" where the child failed."""
    if not section:
        return []
    out = ["", f"## {title}", "", "| mode | " + " | ".join(columns) + " |",
           "|---|" + "---:|" * len(columns)]
    for mode, m in section.items():
        row = cells(m, m["median"]) if "median" in m else ["failed"] + [""] * (len(columns) - 1)
        out.append(f"| {mode} | " + " | ".join(str(c) for c in row) + " |")
    return out


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown_table(results: dict, families=("peak", "lstm", "gru", "rnn", "convlstm"),
                   ratio_header: str = "ratio vs torch default threads",
                   alt_header: str = "ratio vs torch 1 thread", footnotes: bool = True) -> str:
    """One row per case and competitor."""
    lines = [
        f"| config | pass | competitor | median ms | GFLOP/s | % peak | {ratio_header} "
        f"| {alt_header} | reps |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for case in results["cases"]:
        if case["family"] == "peak" and case["name"] != "peak/sgemm":
            continue
        if case["family"] not in families:
            continue
        config = f"{case['config']} ({case['describe']})"
        for row in case["competitors"]:
            # a row may have its own references (the same-shape LSTM rows of a GRU/RNN case)
            ref = row["name"] == row.get("reference", case["reference"])
            ratio = "1 (ref)" if ref else _f(row["ratio_vs_ref"], ".3f")
            alt = "1 (ref)" if row["name"] == row.get(
                "alt_reference", case.get("alt_reference")) else _f(row["ratio_vs_alt"], ".3f")
            if row.get("skipped"):
                est = row.get("estimate_s")
                lines.append(
                    f"| {config} | {case['pass']} | {row['name']} | ≈{_f(est and 1e3 * est, '.0f')}"
                    f" (est.)‡ | ≈{_f(row.get('gflops_estimate'), '.1f')} | | "
                    f"≈{_f(row.get('ratio_estimate'), '.2f')}‡ | | 0 |")
                continue
            if row["median_ms"] is None:
                lines.append(f"| {config} | {case['pass']} | {row['name']} | failed: "
                             f"{(row['error'] or '')[:60]} | | | | | |")
                continue
            dagger = "" if row.get("paired", True) else "†"
            if dagger and not ref:
                ratio = ratio + dagger
                alt = alt + dagger
            reps = case["reps"] if row.get("paired", True) else f"{len(row['times_s'])}†"
            lines.append(
                f"| {config} | {case['pass']} | {row['name']} | {_f(row['median_ms'], '.3f')} "
                f"| {_f(row['gflops'], '.1f')} | {_f(row['pct_peak'], '.1f')} | {ratio} "
                f"| {alt} | {reps} |"
            )
    if not footnotes:
        return "\n".join(lines)
    lines += [
        "",
        "† unpaired: the competitor's first warm-up call exceeded the case's slow threshold, so "
        "it was timed on its own after the round-robin rounds; its ratio is a ratio of medians.  ",
        "‡ not run at full size: a pilot on a shortened sequence predicted a call longer than the "
        "case's skip threshold; time and ratio are that prediction (linear in T).",
    ]
    return "\n".join(lines)


def targets_table(results: dict) -> str:
    lines = ["| target | measured | bound | met | same vs torch on 1 thread |",
             "|---|---:|---:|:---:|---:|"]
    for t in results.get("targets", []):
        unit = {"x": "", "s": " s", "compilations": ""}[t["unit"]]
        value = "—" if t["value"] is None else (
            f"{t['value']:.3f}{unit}" if isinstance(t["value"], float) else f"{t['value']}{unit}")
        met = {True: "yes", False: "**no**", None: "n/a"}[t["ok"]]
        if t.get("estimated"):
            value = f"≈{value} (pilot estimate)"
        one = t.get("value_vs_torch_1_thread")
        lines.append(f"| {t['target']} | {value} | ≤ {t['bound']}{unit} | {met} | "
                     f"{_f(one, '.3f') if one is not None else ''} |")
    return "\n".join(lines)


def pairs_table(results: dict) -> str:
    lines = ["| case | ratio (paired median) | IQR |", "|---|---:|---|"]
    for case in results["cases"]:
        for key, pair in case.get("pairs", {}).items():
            mark = "" if pair.get("paired", True) else " (ratio of medians†)"
            iqr = pair.get("iqr")
            iqr = f"{iqr[0]:.3f}-{iqr[1]:.3f}" if iqr else ""
            lines.append(f"| {case['name']}: {key} | {_f(pair['median'], '.3f')}{mark} | {iqr} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    env = results["environment"]
    meta = results["meta"]
    peak = results.get("peak", {})
    out = [
        "# carryover benchmarks",
        "",
        f"{meta['started']} → {meta.get('finished', '?')}  ·  {env['cpu_model']}, "
        f"{env['cpu_count']} CPUs (affinity {env['cpu_affinity']})  ·  torch "
        f"{env['versions']['torch']} ({env['torch_num_threads']} threads)  ·  jax "
        f"{env['versions']['jax']}  ·  flax {env['versions']['flax']}  ·  float32"
        + ("  ·  **--quick** (cfg2/c2 with fewer steps)" if meta.get("quick") else ""),
        "",
        f"sgemm peak (torch.mm 2048², default threads, median): "
        f"{_f(peak.get('gflops'), '.1f')} GFLOP/s at the start, "
        f"{_f(peak.get('gflops_end'), '.1f')} at the end; load average "
        f"{env.get('loadavg_start')} → {env.get('loadavg_end')}.",
        "",
        markdown_table(results),
        "",
        "## Streaming (jax_impl.Stateful)",
        "",
        markdown_table(results, families=("stream",), ratio_header="ratio vs one full jit call",
                       alt_header="—", footnotes=False),
        "",
        "## Targets",
        "",
        targets_table(results),
        "",
        "## Other paired ratios",
        "",
        pairs_table(results),
    ]
    rag = results.get("ragged")
    if rag:
        out += ["", f"## Ragged last chunk ({rag['config']}, chunks of {rag['chunk']})", "",
                "| ragged length | bucket | new compilations | again (same length) |",
                "|---:|---:|---:|---:|"]
        for r, v in rag["per_length"].items():
            out.append(f"| {r} | {v['bucket']} | {v['new_for_ragged_chunk']} | "
                       f"{v['new_for_second_ragged_chunk']} |")
    out += _fresh_process_table(
        results.get("first_call"), "First call (fresh process, cfg1 forward)",
        ["first call s", "second call s", "import s", "init s", "runs"],
        lambda m, med: [f"{med['first_call_s']:.3f}", f"{med['second_call_s']:.4f}",
                        f"{med['import_s']:.2f}", _f(med.get("init_s"), ".3f"), m["runs"]],
    )
    out += _fresh_process_table(
        results.get("construct"), "Eager construction (fresh process, cfg2 sizes)",
        ["what", "first s", "warm s (median)", "backend start s", "import s", "runs"],
        lambda m, med: [f"`{m['what']}`", f"{med['first_s']:.3f}", f"{med['warm_s']:.4f}",
                        _f(med.get("backend_s"), ".3f"), f"{med['import_s']:.2f}", m["runs"]],
    )
    errors = [(c["name"], k, v) for c in results["cases"] for k, v in c.get("errors", {}).items()]
    if errors:
        out += ["", "## Errors", ""] + [f"- {c} / {k}: `{v}`" for c, k, v in errors]
    return "\n".join(out) + "\n"


def ratios_png(results: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    palette = {"jax_impl": "#1f77b4", "flax": "#ff7f0e", "nnx": "#2ca02c"}
    bars = []  # (case, row, ratio, estimated)
    for case in results["cases"]:
        if case["family"] not in JAX_FAMILIES:
            continue
        for row in case["competitors"]:
            if row["framework"] != "jax" or "reference" in row:
                continue
            if row["ratio_vs_ref"] is not None:
                bars.append((case, row, row["ratio_vs_ref"], False))
            elif row.get("ratio_estimate") is not None:
                bars.append((case, row, row["ratio_estimate"], True))
    labels = [f"{c['config']} {c['pass']} · {r['name']}" + (" (est.)" if e else "")
              for c, r, _, e in bars]
    values = [v for _, _, v, _ in bars]
    colors = [palette["flax" if r["name"].startswith("flax") else
                      "nnx" if r["name"].startswith("jax_impl.nnx") else "jax_impl"]
              for _, r, _, _ in bars]
    targets = {(t["case"], t["num"], t["den"]): t["bound"] for t in results.get("targets", [])
               if t.get("case")}
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(labels), 4) + 1.5))
    y = list(range(len(labels)))[::-1]
    hatches = ["//" if e else "" for _, _, _, e in bars]
    ax.barh(y, values, color=colors, hatch=hatches, edgecolor="white")
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.2f}", va="center", fontsize=7)
    # target bounds as ticks on the bars they apply to
    for yi, (case, row, _, _) in zip(y, bars):
        bound = targets.get((case["name"], row["name"], case["reference"]))
        if bound is not None:
            ax.plot([bound, bound], [yi - 0.4, yi + 0.4], color="red", lw=1.5)
    ax.axvline(1.0, color="black", lw=1)
    if values:
        # an explicit left end: bars start at 0, which a log axis would otherwise stretch to
        # its smallest float, drawing every bar the same length
        ax.set_xlim(left=min(min(values), 1.0) / 2.0, right=max(max(values), 1.0) * 2.0)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("time ratio JAX / torch reference (paired median; < 1: JAX faster; log scale)")
    ax.set_title("JAX / torch (torch.nn.LSTM oneDNN, torch.nn.GRU / RNN native ATen, default "
                 "threads; ConvLSTM: torch_impl.ConvLSTM2d)\n"
                 "red ticks: targets; hatched: estimated from a short pilot", fontsize=9)
    from matplotlib.patches import Patch  # noqa: PLC0415

    ax.legend(handles=[Patch(color=palette["jax_impl"], label="jax_impl"),
                       Patch(color=palette["nnx"], label="jax_impl.nnx"),
                       Patch(color=palette["flax"], label="Flax Linen")], fontsize=7,
              loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_all(results: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "results.json", out_dir / "results.md", out_dir / "ratios.png"]
    paths[0].write_text(json.dumps(results, indent=1, default=str))
    paths[1].write_text(markdown(results))
    ratios_png(results, paths[2])
    return paths
