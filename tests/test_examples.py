"""The examples run end to end (small --steps), their loss goes down and they save a plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOSS_LINE = re.compile(r"^step\s+\d+\s+loss\s+([0-9.eE+-]+)", re.MULTILINE)


def _run(script: str, out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--out", str(out), *args],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize(
    "script, png, args",
    [
        ("forecast_tbptt.py", "forecast_tbptt.png", ("--steps", "12", "--chunks", "4")),
        ("convlstm_moving_shapes.py", "convlstm_moving_shapes.png", ("--steps", "8", "--size", "12")),
        ("nnx_tbptt.py", "nnx_tbptt.png", ("--steps", "12")),
    ],
)
def test_example_trains_and_plots(tmp_path, script, png, args):
    out = _run(script, tmp_path, *args)
    losses = [float(v) for v in LOSS_LINE.findall(out)]
    assert len(losses) >= 2, out
    assert losses[-1] < losses[0], f"loss did not decrease: {losses}"
    assert (tmp_path / png).stat().st_size > 0
    if script == "forecast_tbptt.py":  # torch from the converted weights follows the same curve
        gap = float(re.search(r"max \|loss jax - loss torch\|.*: ([0-9.eE+-]+)", out).group(1))
        assert gap < 1e-4
