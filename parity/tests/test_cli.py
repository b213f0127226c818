"""`python -m parity`: the table, the JSON report, the exit status and the drift plot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, timeout=600)


def test_passing_run_exits_0_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    result = _run("--quick", "--only", "ConvLSTM L2", "--dtype", "float64", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ConvLSTM L2 k4 (even)" in result.stdout and "pass" in result.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["failed"] == 0 and report["configurations"] == 1
    assert {c["tensor"] for c in report["reports"][0]["checks"]} >= {"output", "h_n", "c_n", "grad/input"}
    assert report["environment"]["jax"] and report["environment"]["torch"]


def test_mismatch_exits_1():
    """A bound nothing can meet (0) makes every float64 comparison fail: the exit status says so."""
    result = _run("--quick", "--only", "packed", "--dtype", "float64", "--atol", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout and "mismatched" in result.stdout


@pytest.mark.slow
def test_drift_plot(tmp_path):
    from parity.__main__ import plot_drift

    path = tmp_path / "drift.png"
    drift = plot_drift(str(path), steps=300)
    assert path.stat().st_size > 10_000
    for curve in drift.values():
        assert 0 < curve["jax_max"] < 1e-3 and curve["steps"] > 0
