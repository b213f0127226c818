"""``mesh=``: data parallelism over the batch equals the one-device run, with no collective.

"Equals": bit for bit the one-device program run on each device's rows (the same program on
the same shapes); within rounding the one-device run on the whole batch (other matmul shapes,
so other kernels), float32 and float64.

The multi-device checks run in one subprocess (``tests/sharding_script.py``) with 4 forced CPU
devices: the device count must be set before JAX starts its backend, and the rest of the suite
keeps its single device. The HLO parser and the argument checks are tested here in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jax_impl
from jax_impl.sharding import batch_spec, check_batch, resolve_mesh, with_mesh

from hlo import collectives, loop_collectives

SCRIPT = Path(__file__).with_name("sharding_script.py")
DEVICES = 4


@pytest.fixture(scope="module")
def results() -> dict:
    """The script's JSON results (one run for every test of this module)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(DEVICES)], capture_output=True, text=True, env=env,
        cwd=SCRIPT.parent.parent, timeout=600,
    )
    assert done.returncode == 0, f"sharding script failed:\n{done.stderr[-4000:]}"
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["devices"] == DEVICES
    return results


# What the platform promises (see tests/sharding_script.py): the mesh runs each device's rows
# through the one-device program, so it equals that program run on the same row blocks bit for
# bit. The one-device run on the whole batch multiplies other shapes, and XLA:CPU picks kernels
# by shape and CPU: equal only to rounding (6e-8 in float32 on a 2-core AVX2 EPYC).
F32_ATOL = 1e-5  # docs/design.md's float32 bound, ~40 ulps at the largest values here (~2.7)
F32_GRAD_RTOL = 1e-5  # weight gradients, relative to the largest: ten times below docs/design.md's
F64_RTOL = 1e-14  # float64, relative to the largest value: ~50 ulps


def _equal_to_one_device(result: dict, f32_bound: float, float64: bool = False) -> None:
    """Bitwise against the per-device runs; within ``f32_bound`` (max abs) of the full-batch
    one-device run; with ``float64``, within ``F64_RTOL`` of it in float64 too."""
    per_device, full = result["per_device"], result["full"]
    assert per_device["dtypes_equal"] and full["dtypes_equal"]
    assert per_device["bitwise"], f"not bit for bit: max abs difference {per_device['max_abs']}"
    assert full["max_abs"] <= f32_bound, full
    if float64:
        f64 = result["float64"]
        assert f64["dtypes"] == ["float64"], f64
        assert f64["max_abs"] <= F64_RTOL * max(1.0, f64["scale"]), f64


def test_lstm_on_mesh_equals_one_device(results):
    """2 layers, bidirectional, proj_size, seq_lengths, reset, dropout (given masks in float32,
    the dropout rng in float64: the same masks on the mesh)."""
    result = results["lstm"]
    assert result["draws_dropout"]
    _equal_to_one_device(result, F32_ATOL, float64=True)
    assert result["output_spec"] == ["batch", None, None]  # (B, T, F): split along B
    assert result["carry_specs"] == [[None, "batch", None]] * 2  # (L*D, B, H)


def test_convlstm_on_two_axis_mesh_equals_one_device(results):
    result = results["convlstm"]
    _equal_to_one_device(result, F32_ATOL)
    assert result["output_spec"] == [None, "batch", None, None, None]  # time-major
    assert result["carry_specs"] == [[None, "batch", None, None, None]] * 2  # (L, B, H, W, C)


def test_stateful_stream_on_mesh_equals_one_device_and_keeps_carry_sharded(results):
    result = results["stateful"]
    _equal_to_one_device(result, F32_ATOL)
    # after every chunk and after reset(mask): split along the batch, never gathered
    assert result["carry_specs"] == [[[None, "batch", None]] * 2] * 4
    assert result["output_specs"] == [["batch", None, None]] * 3
    assert result["compilations"] == 1  # bucket 6 (chunks of 5 and 6); the 2 borrows it


@pytest.mark.parametrize("model, program", [("lstm", "hlo"), ("lstm", "hlo_rng"),
                                            ("convlstm", "hlo")])
def test_no_collective_in_the_time_loop(results, model, program):
    hlo = results[model][program]
    assert hlo["while_loops"] >= 1  # the scans were found: the check below saw them
    assert hlo["in_loops"] == []
    assert hlo["anywhere"] == []  # nor anywhere else in the forward program


def test_gradients_on_mesh_equal_one_device_and_are_summed_after_the_loop(results):
    """The input gradient bitwise per device (its rows never mix); the weight gradients, an
    all-reduce over devices in an order XLA picks, within rounding of the one-device run."""
    result = results["backward"]
    _equal_to_one_device(result, F32_GRAD_RTOL * max(1.0, result["full"]["scale"]), float64=True)
    hlo = result["hlo"]
    assert hlo["while_loops"] >= 2  # forward and backward scans
    assert hlo["in_loops"] == []  # no all-reduce per time step
    assert {op for _, op in hlo["anywhere"]} == {"all-reduce"}  # the weight gradients, once


def test_hlo_check_sees_a_collective_inside_a_loop(results):
    hlo = results["detector"]
    assert hlo["while_loops"] == 1
    assert [op for _, op in hlo["in_loops"]] == ["all-reduce"]


def test_batch_the_mesh_cannot_split_is_a_value_error(results):
    errors = results["errors"]
    for name in ("apply_batch", "stateful_batch"):
        assert errors[name] is not None and "batch 5" in errors[name], errors[name]
        assert f"{DEVICES} devices" in errors[name]
    for name in ("apply_unbatched", "stateful_unbatched"):
        assert errors[name] is not None and "unbatched" in errors[name], errors[name]
    assert "batch_axis 'rows'" in errors["bad_axis"]


# ---------------------------------------------------------------------- in-process, 1 device


HLO = """HloModule m

%inner (p: f32[2]) -> f32[2] {
  %p = f32[2]{0} parameter(0)
  ROOT %ar = f32[2]{0} all-reduce(%p), replica_groups={}, to_apply=%add
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (t: (s32[], f32[2])) -> (s32[], f32[2]) {
  %t = (s32[], f32[2]{0}) parameter(0)
  %x = f32[2]{0} get-tuple-element(%t), index=1
  %y = f32[2]{0} fusion(%x), kind=kLoop, calls=%inner
  ROOT %r = (s32[], f32[2]{0}) tuple(%i, %y)
}

%cond (t: (s32[], f32[2])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[2]) -> f32[2] {
  %x = f32[2]{0} parameter(0)
  %all-gather.1 = f32[4]{0} all-gather(%x), dimensions={0}
  %w = (s32[], f32[2]{0}) while(%t0), condition=%cond, body=%body
  ROOT %o = f32[2]{0} get-tuple-element(%w), index=1
}
"""


def test_loop_collectives_follows_calls_out_of_the_loop_body():
    found, loops = loop_collectives(HLO)
    assert loops == 1
    assert found == [("inner", "all-reduce")]  # reached through the fusion's calls=
    assert sorted(op for _, op in collectives(HLO)) == ["all-gather", "all-reduce"]


def test_batch_spec_and_checks():
    assert batch_spec(3, 1) == PartitionSpec(None, "batch")
    assert batch_spec(2, 0, ("data", "fsdp")) == PartitionSpec(("data", "fsdp"))
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    check_batch(3, mesh)  # one device splits any batch
    with pytest.raises(ValueError, match="unbatched"):
        check_batch(None, mesh)
    assert resolve_mesh(NamedSharding(mesh, PartitionSpec())) is mesh
    with pytest.raises(TypeError, match="Mesh"):
        resolve_mesh("batch")
    with pytest.raises(ValueError, match="not an axis"):
        resolve_mesh(mesh, "data")


def test_one_device_mesh_equals_no_mesh_and_with_mesh_is_a_static_port():
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    lstm = jax_impl.LSTM(4)
    x = np.random.default_rng(0).standard_normal((2, 3, 2)).astype(np.float32)
    shapes = jax.eval_shape(lstm.init, jax.random.key(0), x)  # init would compile its draws
    variables = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.1, s.dtype), shapes)
    port = with_mesh(lstm, mesh)
    assert hash(port) == hash(with_mesh(lstm, mesh)) and port.hidden_size == 4
    plain = jax.jit(lstm.apply)(variables, x)
    sharded = jax.jit(port.apply)(variables, x)
    # one device holds the whole batch: the same program on the same shapes, bit for bit
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(sharded)):
        np.testing.assert_array_equal(a, b)
