"""``python -m parity --devices N``: the JAX side split along the batch still matches torch.

The run re-executes itself with forced CPU devices (this process's JAX has one), so the test
exercises that path too. One comparison (two-layer bidirectional LSTM, packed lengths, full run
and gradients through the split program) keeps it under half a minute; the whole quick grid
(``--quick --devices 2 --dtype float64``) passes as well but takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from parity.__main__ import CASES, _unshardable


def test_devices_2_matches_torch_in_float64(tmp_path):
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"  # one CPU device here: the CLI must re-exec with two
    result = subprocess.run(
        [sys.executable, "-m", "parity", "--only", "LSTM L2 bidirectional packed", "--devices", "2",
         "--dtype", "float64", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["devices"] == 2 and report["configurations"] == 1
    assert len(report["environment"]["devices"]) == 2
    (only,) = report["reports"]
    assert only["config"].endswith("[2 devices]") and only["dtype"] == "float64"
    tensors = {c["tensor"] for c in only["checks"]}
    assert {"output", "h_n", "c_n", "grad/input", "grad/weight_ih_l1_reverse"} <= tensors
    assert max(c["max_abs"] for c in only["checks"] if not c["tensor"].startswith("grad/")) <= 1e-12


def test_cases_that_cannot_be_split_say_why():
    reasons = {case.name: _unshardable(case, 4) for case in CASES}
    assert reasons["LSTM L1"] is None  # batch 4 over 4 devices
    assert "cell" in reasons["LSTMCell"]
    assert reasons["LSTM L2 unbatched"] == "unbatched input"
    assert reasons["ConvLSTM L1 k3"] == "batch 2 is not divisible by 4 devices"
