"""`python -m parity`: the table, the JSON report, the exit status and the drift plot.

Two runs go through a subprocess (``python -m`` and its exit status end to end; each starts JAX,
several seconds); the rest call ``main`` in this process, with the comparison stubbed where
only the report's shape matters.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

import parity.__main__ as cli
from parity import Check, Report, compare
from parity.targets import TARGETS


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity", *args], capture_output=True, text=True, timeout=600)


def _strict_load(text: str) -> dict:
    """json.loads that fails the test on NaN / Infinity / -Infinity (Python writes and reads them
    by default; strict parsers such as jq, JavaScript or Go reject the file)."""
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"non-strict JSON token {token}"))


# The --json layout (schema_version 1): top-level key -> type(s).
TOP_LEVEL = {
    "schema_version": int,
    "ok": bool,
    "configurations": int,
    "failed": int,
    "seconds": float,
    "carryover_version": str,
    "git_commit": (str, type(None)),
    "git_dirty": (bool, type(None)),
    "arguments": dict,
    "skipped": list,
    "environment": dict,
    "reports": list,
}
ARGUMENTS = {
    "dtype": str, "seed": int, "quick": bool, "only": (str, type(None)),
    "atol": (float, type(None)), "devices": int, "plot": (str, type(None)), "target": str,
}
CHECK = {
    "run": str, "tensor": str, "max_abs": (float, type(None)), "max_rel": (float, type(None)),
    "where": (list, type(None)), "bound": (float, type(None)), "ok": bool, "note": str,
}


def _assert_types(document: dict, expected: dict, what: str) -> None:
    missing = set(expected) - set(document)
    assert not missing, f"{what}: missing keys {sorted(missing)}, got {sorted(document)}"
    for key, types in expected.items():
        assert isinstance(document[key], types), f"{what}[{key!r}]: expected {types}, got {document[key]!r}"


# ------------------------------------------------------------------- through a subprocess


def test_passing_run_exits_0_and_writes_strict_json_with_the_schema(tmp_path):
    out = tmp_path / "report.json"
    result = _run("--quick", "--only", "convlstm l2", "--dtype", "float64", "--json", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ConvLSTM L2 k4 (even)" in result.stdout and "pass" in result.stdout
    report = _strict_load(out.read_text())
    _assert_types(report, TOP_LEVEL, "report")
    assert report["schema_version"] == 1
    assert report["ok"] is True and report["failed"] == 0 and report["configurations"] == 1
    assert report["carryover_version"] and report["carryover_version"] != "unknown"
    assert report["git_commit"] is None or len(report["git_commit"]) == 40  # None outside a checkout
    _assert_types(report["arguments"], ARGUMENTS, "arguments")
    assert report["arguments"] == {"dtype": "float64", "seed": 0, "quick": True, "only": "convlstm l2",
                                   "atol": None, "devices": 1, "plot": None, "target": "linen"}
    assert report["skipped"] == [] and "drift" not in report
    assert report["environment"]["jax"] and report["environment"]["torch"]
    (only,) = report["reports"]
    assert only["config"] == "ConvLSTM L2 k4 (even)" and only["dtype"] == "float64" and only["ok"] is True
    for check in only["checks"]:
        _assert_types(check, CHECK, f"check {check.get('tensor')}")
    assert {c["tensor"] for c in only["checks"]} >= {"output", "h_n", "c_n", "grad/input"}


def test_mismatch_exits_1_and_the_report_says_so(tmp_path):
    """A bound of 0 cannot be met in float32 (the sides round differently, ~1e-8): every
    forward check fails, the exit status is 1 and the JSON agrees."""
    out = tmp_path / "report.json"
    result = _run("--only", "LSTM L1 proj", "--dtype", "float32", "--atol", "0", "--json", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL" in result.stdout and "mismatched" in result.stdout
    report = _strict_load(out.read_text())
    assert report["ok"] is False and report["failed"] == report["configurations"] == 1
    assert report["arguments"]["atol"] == 0.0 and report["arguments"]["dtype"] == "float32"
    forward = [c for c in report["reports"][0]["checks"] if c["tensor"] in ("output", "h_n", "c_n")]
    assert forward and all(c["ok"] is False and c["bound"] == 0.0 for c in forward)


# ------------------------------------------------------------------- in this process


def test_only_that_matches_nothing_exits_2_listing_the_names(capsys):
    assert cli.main(["--only", "LTSM", "--json", "never-written.json"]) == 2
    err = capsys.readouterr().err
    assert "'LTSM'" in err and f"matches none of the {len(cli.CASES)} configurations" in err
    for case in cli.CASES:
        assert f"\n  {case.name}" in err


def test_only_outside_the_quick_grid_says_to_drop_quick(capsys):
    assert cli.main(["--quick", "--only", "T=1000"]) == 2
    err = capsys.readouterr().err
    assert "drop --quick" in err
    assert all(c.name in err for c in cli.CASES if c.quick)


def test_list_prints_one_name_per_line(capsys):
    assert cli.main(["--list"]) == 0
    assert capsys.readouterr().out.splitlines() == [c.name for c in cli.CASES]
    assert cli.main(["--list", "--quick", "--only", "lstm l2"]) == 0  # substring, ignoring case
    assert capsys.readouterr().out.splitlines() == [
        c.name for c in cli.CASES if c.quick and "LSTM L2" in c.name
    ]


def test_help_documents_exit_statuses_and_the_convert_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "0  every comparison matches" in out
    assert "1  a mismatch" in out and "2  usage error" in out
    assert "ignoring case" in out and "python -m parity convert --help" in out


@pytest.mark.parametrize("args", [["--atol", "nan"], ["--atol", "-1"], ["--devices", "0"], ["--dtype", "f16"],
                                  ["--devices", "2", "--target", "nnx"]])
def test_bad_options_exit_2(args, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2
    assert "error" in capsys.readouterr().err


def test_unknown_target_exits_2_naming_the_targets(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--target", "tensorflow", "--json", "never-written.json"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "'tensorflow'" in err and all(f"'{name}'" in err for name in TARGETS)


def test_target_that_expresses_none_of_the_selection_exits_2_with_the_reasons(tmp_path, capsys):
    """Stock NNX has no ConvLSTM: every ConvLSTM row is skipped, which is a usage error (as an
    --only that selects nothing), each reason printed, no report written."""
    out = tmp_path / "report.json"
    assert cli.main(["--target", "flax.nnx", "--only", "ConvLSTM", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--target flax.nnx: every selected configuration is skipped" in err
    for case in cli.select_cases("ConvLSTM", quick=False):
        assert f"  {case.name}: a {type(case.make()).__name__} cannot be expressed by target 'flax.nnx'" in err
    assert not out.exists()


def test_target_whose_library_is_missing_exits_2_naming_the_extra(monkeypatch, capsys):
    """equinox made unimportable for this test (None in sys.modules stops its import)."""
    monkeypatch.delitem(sys.modules, "parity.targets.equinox", raising=False)
    monkeypatch.setitem(sys.modules, "equinox", None)
    assert cli.main(["--target", "equinox", "--only", "LSTMCell"]) == 2
    err = capsys.readouterr().err
    assert "--target equinox: target 'equinox' needs equinox" in err and "carryover[interop]" in err


def test_target_runs_what_it_expresses_and_skips_the_rest(tmp_path, monkeypatch, capsys):
    """--target flax.nnx over the cells: compare converts to that target (seen at the call);
    the GRUCell (its b_hn is not zero) and the ConvLSTMCell are skipped with their reasons, and
    the report records both."""
    targets = []

    def spy(*args, **kwargs):
        targets.append(kwargs.get("target"))
        return compare(*args, **kwargs)

    monkeypatch.setattr(cli, "compare", spy)
    out = tmp_path / "report.json"
    assert cli.main(["--target", "flax.nnx", "--only", "Cell", "--dtype", "float64",
                     "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "--target flax.nnx: skipping GRUCell (a GRU bias b_hn" in stdout
    assert "JAX (target flax.nnx) vs torch" in stdout and "(target flax.nnx), all match" in stdout
    report = _strict_load(out.read_text())
    assert report["arguments"]["target"] == "flax.nnx" and report["ok"] is True
    ran = ["LSTMCell", "RNNCell relu"]
    assert [r["config"] for r in report["reports"]] == ran
    skipped = {s["config"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"GRUCell", "ConvLSTMCell k2"}
    assert "b_hn" in skipped["GRUCell"] and "a ConvLSTMCell cannot be expressed" in skipped["ConvLSTMCell k2"]
    assert targets == ["flax.nnx"] * len(ran)


def test_case_names_are_unique():
    names = [c.name for c in cli.CASES]
    assert len(names) == len(set(names)), "--only and --list go by name"


def test_grid_covers_gru_and_rnn():
    """Every module kind is in the grid, and ``--only GRU`` / ``--only RNN`` select exactly the
    GRU / RNN rows (by module type, not just by name)."""
    import torch

    kinds = {type(c.make()) for c in cli.CASES}
    assert {torch.nn.GRU, torch.nn.GRUCell, torch.nn.RNN, torch.nn.RNNCell} <= kinds
    for text, types in (("GRU", (torch.nn.GRU, torch.nn.GRUCell)),
                        ("RNN", (torch.nn.RNN, torch.nn.RNNCell))):
        selected = cli.select_cases(text, quick=False)
        assert selected and all(isinstance(c.make(), types) for c in selected)
        assert len(selected) == sum(isinstance(c.make(), types) for c in cli.CASES)
    relu = [c for c in cli.CASES if getattr(c.make(), "nonlinearity", "tanh") == "relu"]
    assert {type(c.make()) for c in relu} == {torch.nn.RNN, torch.nn.RNNCell}
    assert any(c.options.get("dropout_masks") for c in cli.select_cases("GRU", quick=False))
    assert any(isinstance(c.make(), torch.nn.GRU) for c in cli.select_cases(None, quick=True))


def test_non_finite_errors_are_null_with_a_note(tmp_path, monkeypatch, capsys):
    """A shape mismatch (inf) and a NaN error reach the JSON as null plus ``<key>_note``, and
    the file parses strictly; the comparison itself is stubbed (the report's shape is the point)."""

    def broken(case, dtype, seed, atol=None, mesh=None, target="linen"):
        return Report(case.name, "float32", [
            Check("full", "output", math.inf, math.inf, None, 1e-5, False, "shape (4, 24, 16) vs torch (4, 24, 8)"),
            Check("full", "h_n", math.nan, math.nan, (0, 1), 1e-5, False),
            Check("full", "c_n", 0.0, 0.0, (0, 0), 1e-5, True),
        ])

    monkeypatch.setattr(cli, "_run", broken)
    out = tmp_path / "report.json"
    assert cli.main(["--only", "LSTM L1 chunks", "--dtype", "float32", "--json", str(out)]) == 1
    capsys.readouterr()
    report = _strict_load(out.read_text())
    assert report["ok"] is False and report["failed"] == 1
    output, h_n, c_n = report["reports"][0]["checks"]
    assert output["max_abs"] is None and output["max_rel"] is None
    assert output["max_abs_note"].startswith("inf: shape mismatch") and "(4, 24, 8)" in output["max_abs_note"]
    assert h_n["max_abs"] is None and h_n["max_abs_note"] == "nan: non-finite"
    assert c_n["max_abs"] == 0.0 and "max_abs_note" not in c_n


def test_strict_json_cleans_numpy_tuples_and_lists():
    np = pytest.importorskip("numpy")
    clean, replaced = cli.strict_json({"a": np.float32(0.5), "b": (np.int64(3), True), "c": [1.0, -math.inf],
                                       "d": {"e": np.float64("nan"), "note": "why"}})
    assert not replaced
    assert clean == {"a": 0.5, "b": [3, True], "c": [1.0, None], "c_note": "non-finite entries written as null",
                     "d": {"e": None, "e_note": "nan: why", "note": "why"}}
    json.dumps(clean, allow_nan=False)
    with pytest.raises(TypeError, match="cannot write set"):
        cli.strict_json({"x": {1}})


def test_version_and_git_never_fail(monkeypatch):
    """No installed metadata: the version comes from pyproject.toml. No git: commit is None."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert re.fullmatch(r"\d+\.\d+\S*", cli._package_version())
    monkeypatch.setattr(cli.subprocess, "run", no_git)
    assert cli._git_state() == (None, None)


def test_drift_curves_carry_bound_and_ok(tmp_path, monkeypatch):
    """--plot's numbers reach the JSON with each curve's bound and ok (plot stubbed: the real one
    is test_drift_plot, slow)."""
    drift = {"LSTM": {"jax_max": 5e-8, "torch_max": 4e-8, "steps": 2000, "bound": 1e-5, "ok": True}}
    monkeypatch.setattr(cli, "plot_drift", lambda path: drift)
    monkeypatch.setattr(cli, "_run", lambda case, dtype, seed, atol=None, mesh=None, target="linen": Report(
        case.name, "float64", [Check("full", "output", 0.0, 0.0, None, 1e-12, True)]))
    out = tmp_path / "report.json"
    assert cli.main(["--only", "LSTMCell", "--dtype", "float64", "--plot", str(tmp_path / "d.png"),
                     "--json", str(out)]) == 0
    report = _strict_load(out.read_text())
    assert report["drift"] == drift and report["configurations"] == 2


@pytest.mark.slow
def test_drift_plot(tmp_path):
    from parity.__main__ import plot_drift

    path = tmp_path / "drift.png"
    drift = plot_drift(str(path), steps=300)
    assert path.stat().st_size > 10_000
    low = drift.pop("LSTM L2 H64 bfloat16")  # judged against twice torch's own bf16 error
    assert low["ok"] and low["bound"] == pytest.approx(2 * low["torch_max"] + 2**-8)
    assert 0 < low["jax_max"] < 0.05
    for curve in drift.values():
        assert 0 < curve["jax_max"] < 1e-3 and curve["steps"] > 0
        assert curve["bound"] == cli.DRIFT_BOUND and curve["ok"] == (curve["jax_max"] <= curve["bound"])
