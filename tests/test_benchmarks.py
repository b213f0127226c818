"""The benchmark suite runs from a clean clone: ``python -m benchmarks`` as the README says.

Timings are never asserted (speed is measured by the benchmark, not tested); what is checked is
that the command works and writes what its README promises: the case list, and a smoke run of
the smallest LSTM and GRU cases (``--quick``) writing results.json (with the rows, paired ratios
and targets), results.md and ratios.png, and ``--rerender`` rewriting them from the JSON alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _benchmarks(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_case_list():
    names = _benchmarks("--list").stdout.split()
    for name in ("lstm/cfg1/fwd", "lstm/cfg2/fwdbwd", "lstm/cfg3/fwd", "convlstm/c2/fwdbwd",
                 "gru/cfg1/fwd", "gru/cfg2/fwdbwd", "gru/cfg3/fwd", "rnn/cfg1/fwdbwd",
                 "stream/cfg1/fwd", "stream/ragged", "first_call/cfg1"):
        assert name in names


def test_a_quick_run_writes_every_output(tmp_path):
    _benchmarks("--quick", "--only", "(lstm|gru)/cfg3/fwd$", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    text = json.dumps(results)
    for competitor in ("torch.nn.LSTM", "jax_impl.LSTM", "flax OptimizedLSTMCell", "torch.mm",
                       "torch.nn.GRU", "jax_impl.GRU", "flax GRUCell",
                       "jax_impl.LSTM (same shape)"):
        assert competitor in text
    assert "lstm/cfg3/fwd" in text and "gru/cfg3/fwd" in text
    targets = [t["target"] for t in results["targets"]]
    assert any(t.startswith("lstm/cfg3/fwd") for t in targets)
    assert any(t.startswith("gru/cfg3/fwd: GRU ratio / LSTM ratio") for t in targets)
    assert "gru/cfg3/fwd: jax_impl.GRU / flax GRUCell" in targets
    assert results["environment"]["small_loop_kernels"] is False
    markdown = (tmp_path / "results.md").read_text()
    assert "| cfg3 (B1 T1024 I32 H64 L1) | fwd | jax_impl.LSTM |" in markdown
    assert "| cfg3 (GRU B1 T1024 I32 H64 L1) | fwd | jax_impl.GRU |" in markdown
    png = tmp_path / "ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    png.unlink()
    _benchmarks("--rerender", "--out", str(tmp_path))
    assert png.exists() and (tmp_path / "results.md").read_text() == markdown
