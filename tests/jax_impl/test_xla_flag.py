"""The XLA:CPU option ``jax_impl`` sets on import (``jax_impl._xla_cpu``), in fresh processes.

It is set only before JAX starts its backends, never over the user's own
``--xla_backend_extra_options``, never with ``CARRYOVER_NO_XLA_FLAGS`` set; and it changes no
value: a batch-1 LSTM (the loop it speeds up) and a bidirectional one with lengths give
bitwise the same outputs and gradients with and without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]

REPORT = """
import json, os
{before}
import jax_impl
print(json.dumps({{"set": jax_impl._xla_cpu.SMALL_LOOP_FLAG_SET,
                   "flags": os.environ.get("XLA_FLAGS", "")}}))
"""

RUN = """
import sys
import jax, jax.numpy as jnp, numpy as np
import jax_impl
out = {}
cases = {"b1": (jax_impl.LSTM(16), (1, 40, 8), {}),
         "bidir": (jax_impl.LSTM(8, num_layers=2, bidirectional=True, proj_size=4), (3, 9, 5),
                   {"seq_lengths": jnp.array([9, 4, 0])})}
for name, (module, shape, options) in cases.items():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    variables = jax.jit(module.init)(jax.random.key(0), x)
    loss = lambda v, x: module.apply(v, x, **options)[0].sum()
    y = jax.jit(lambda v, x: module.apply(v, x, **options))(variables, x)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
    for i, leaf in enumerate(jax.tree_util.tree_leaves((y, grads))):
        out[f"{name}_{i}"] = np.asarray(leaf)
np.savez(sys.argv[1], **out)
"""


def _python(code: str, *args: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("XLA_FLAGS", "CARRYOVER_NO_XLA_FLAGS")}
    environment.update(env, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def _report(before: str = "", **env: str) -> dict:
    return json.loads(_python(REPORT.format(before=before), **env))


def test_set_on_import_before_the_backends_start():
    report = _report()
    assert report["set"] is True
    assert "xla_cpu_small_while_loop_byte_threshold=1048576" in report["flags"]


def test_not_set_when_opted_out():
    assert _report(CARRYOVER_NO_XLA_FLAGS="1") == {"set": False, "flags": ""}


def test_the_users_own_extra_options_win():
    mine = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=5"
    assert _report(XLA_FLAGS=mine) == {"set": False, "flags": mine}


def test_not_set_once_jax_has_started():
    report = _report(before="import jax.numpy as jnp; jnp.ones(1).block_until_ready()")
    assert report == {"set": False, "flags": ""}


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xla_flag")
    _python(RUN, str(folder / "with.npz"))
    _python(RUN, str(folder / "without.npz"), CARRYOVER_NO_XLA_FLAGS="1")
    return np.load(folder / "with.npz"), np.load(folder / "without.npz")


@pytest.mark.parametrize("case", ["b1", "bidir"])
def test_values_are_bitwise_the_same_with_and_without(case, both_runs):
    a, b = both_runs
    keys = [k for k in a.files if k.startswith(case)]
    assert keys and sorted(a.files) == sorted(b.files)
    for key in keys:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
