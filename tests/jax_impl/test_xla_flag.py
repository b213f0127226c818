"""The opt-in XLA:CPU option of ``jax_impl._xla_cpu``, in fresh processes.

Off by default; ``CARRYOVER_SMALL_LOOP_KERNELS=1`` or ``enable_small_loop_kernels()`` before
JAX starts sets it; never over the user's own ``--xla_backend_extra_options`` nor once the
backends have started (a warning says so). With it, outputs and gradients stay within float32
rounding: it compiles the same loops differently (one kernel instead of op by op), so equal bits
are not promised (the LSTMs' values have come out bitwise where measured; a small ConvLSTM's
convolutions round differently, 4e-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax_impl

ROOT = Path(__file__).resolve().parents[2]

REPORT = """
import json, os, warnings
warnings.simplefilter("error")
{before}
import jax_impl
{after}
print(json.dumps({{"enabled": jax_impl.small_loop_kernels_enabled(),
                   "flags": os.environ.get("XLA_FLAGS", "")}}))
"""

RUN = """
import sys
import jax_impl
if sys.argv[2] == "on":
    assert jax_impl.enable_small_loop_kernels()
import jax, jax.numpy as jnp, numpy as np
out = {}
cases = {"b1": (jax_impl.LSTM(16), (1, 40, 8), {}),
         "bidir": (jax_impl.LSTM(8, num_layers=2, bidirectional=True, proj_size=4), (3, 9, 5),
                   {"seq_lengths": jnp.array([9, 4, 0])}),
         "conv": (jax_impl.ConvLSTM(3, kernel_size=(2, 3), num_layers=2), (3, 4, 5, 6, 2), {})}
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

FLAG = "xla_cpu_small_while_loop_byte_threshold=1048576"


def _python(code: str, *args: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("XLA_FLAGS", "CARRYOVER_SMALL_LOOP_KERNELS")}
    environment.update(env, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


def _report(before: str = "", after: str = "", **env: str) -> dict:
    return json.loads(_python(REPORT.format(before=before, after=after), **env))


def test_off_by_default():
    assert _report() == {"enabled": False, "flags": ""}


def test_the_environment_variable_turns_it_on():
    report = _report(CARRYOVER_SMALL_LOOP_KERNELS="1")
    assert report["enabled"] and FLAG in report["flags"]
    assert _report(CARRYOVER_SMALL_LOOP_KERNELS="0") == {"enabled": False, "flags": ""}


def test_enable_before_jax_starts():
    report = _report(after="assert jax_impl.enable_small_loop_kernels(4096) is True")
    assert report["flags"] == "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=4096"


def test_refused_with_a_warning_once_jax_has_started():
    code = """
import warnings, jax.numpy as jnp, jax_impl
jnp.ones(1).block_until_ready()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(jax_impl.enable_small_loop_kernels(), jax_impl.small_loop_kernels_enabled(),
          "started" in str(caught[0].message))
"""
    assert _python(code) == "False False True"


def test_the_users_own_extra_options_win():
    mine = "--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold=5"
    code = f"""
import os, warnings, jax_impl
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(jax_impl.enable_small_loop_kernels(), os.environ["XLA_FLAGS"] == {mine!r}, len(caught))
"""
    assert _python(code, XLA_FLAGS=mine) == "False True 1"


@pytest.mark.parametrize("bad, error", [(0, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_threshold(bad, error):
    with pytest.raises(error, match="threshold_bytes"):
        jax_impl.enable_small_loop_kernels(bad)


@pytest.fixture(scope="module")
def both_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xla_flag")
    _python(RUN, str(folder / "on.npz"), "on")
    _python(RUN, str(folder / "off.npz"), "off")
    return np.load(folder / "on.npz"), np.load(folder / "off.npz")


@pytest.mark.parametrize("case", ["b1", "bidir", "conv"])
def test_values_with_and_without(case, both_runs):
    on, off = both_runs
    keys = [k for k in on.files if k.startswith(case)]
    assert keys and sorted(on.files) == sorted(off.files)
    for key in keys:
        # another compilation of the same loops (one kernel instead of op by op), not the same
        # program: rounding only (the LSTMs' values have come out bitwise where measured)
        np.testing.assert_allclose(on[key], off[key], rtol=1e-5, atol=1e-6, err_msg=key)
