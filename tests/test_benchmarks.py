"""The benchmark suite runs from a clean clone: ``python -m benchmarks`` as the README says.

Timings are never asserted (speed is measured by the benchmark, not tested); what is checked is
that the command works and writes what its README promises: the case list, and a smoke run of
the smallest LSTM and GRU cases and of the eager construction (``--quick``) writing results.json
(with the rows, the NNX competitors, paired ratios and targets), results.md and ratios.png, and
``--rerender`` rewriting them from the JSON alone; and that an NNX competitor whose result is
not the Linen one's is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
                 "stream/cfg1/fwd", "stream/ragged", "first_call/cfg1", "construct/cfg2"):
        assert name in names


def test_a_quick_run_writes_every_output(tmp_path):
    _benchmarks("--quick", "--only", "(lstm|gru)/cfg3/fwd$|construct", "--out", str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    text = json.dumps(results)
    for competitor in ("torch.nn.LSTM", "jax_impl.LSTM", "flax OptimizedLSTMCell", "torch.mm",
                       "torch.nn.GRU", "jax_impl.GRU", "flax GRUCell",
                       "jax_impl.LSTM (same shape)", "jax_impl.nnx.LSTM",
                       "jax_impl.nnx.LSTM (split/merge, jax.jit)", "jax_impl.nnx.GRU"):
        assert competitor in text
    assert "lstm/cfg3/fwd" in text and "gru/cfg3/fwd" in text
    lstm = next(c for c in results["cases"] if c["name"] == "lstm/cfg3/fwd")
    nnx_pair = lstm["pairs"]["jax_impl.nnx.LSTM / jax_impl.LSTM"]
    assert nnx_pair["median"] > 0 and nnx_pair["paired"] and len(nnx_pair["iqr"]) == 2
    targets = [t["target"] for t in results["targets"]]
    assert any(t.startswith("lstm/cfg3/fwd") for t in targets)
    assert any(t.startswith("gru/cfg3/fwd: GRU ratio / LSTM ratio") for t in targets)
    assert "gru/cfg3/fwd: jax_impl.GRU / flax GRUCell" in targets
    assert "lstm/cfg3/fwd: jax_impl.nnx.LSTM / jax_impl.LSTM" in targets
    assert "gru/cfg3/fwd: jax_impl.nnx.GRU / jax_impl.GRU" in targets
    built = results["construct"]
    assert set(built) == {"nnx", "nnx_backend_up", "torch"}
    assert all(m["median"]["first_s"] > 0 and m["median"]["warm_s"] > 0 for m in built.values())
    assert any(t.startswith("construct/cfg2: jax_impl.nnx.LSTM(128, 256, 2") for t in targets)
    assert results["environment"]["small_loop_kernels"] is False
    markdown = (tmp_path / "results.md").read_text()
    assert "| cfg3 (B1 T1024 I32 H64 L1) | fwd | jax_impl.LSTM |" in markdown
    assert "| cfg3 (B1 T1024 I32 H64 L1) | fwd | jax_impl.nnx.LSTM |" in markdown
    assert "| cfg3 (GRU B1 T1024 I32 H64 L1) | fwd | jax_impl.GRU |" in markdown
    assert "## Eager construction" in markdown
    png = tmp_path / "ratios.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    png.unlink()
    _benchmarks("--rerender", "--out", str(tmp_path))
    assert png.exists() and (tmp_path / "results.md").read_text() == markdown


def test_an_nnx_competitor_with_other_weights_is_refused():
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import jax_impl  # noqa: PLC0415
    import jax_impl.nnx  # noqa: PLC0415
    from benchmarks import competitors as C  # noqa: PLC0415

    x = jnp.ones((2, 3, 4))
    model = jax_impl.LSTM(5)
    variables = model.init(jax.random.key(0), x)
    other = jax.tree.map(lambda a: a + 1e-3, variables)
    for pass_name in ("fwd", "fwdbwd"):
        run = C._jax_runner(model.apply, variables, x, pass_name, output=lambda r: r[0])
        names = (C.JAX_NNX_LSTM, C.JAX_NNX_LSTM_SM)
        built = C.nnx_competitors(jax_impl.nnx.LSTM(4, 5, rngs=nnx.Rngs(0)), variables, x,
                                  pass_name, run, names, "test", output=lambda r: r[0])
        assert [c.name for c in built] == list(names)
        with pytest.raises(RuntimeError, match="differs from the Linen result"):
            C.nnx_competitors(jax_impl.nnx.LSTM(4, 5, rngs=nnx.Rngs(0)), other, x, pass_name,
                              run, names, "test", output=lambda r: r[0])
