"""Long streams: 100,000 steps fed chunk by chunk through ``jax_impl.Stateful`` and the torch
stateful modules (tiny sizes: B=2, F=3, H=8), LSTM (carry ``(h, c)``) and GRU (carry ``h``).

- memory stays flat: resident set size (``VmRSS``) and its peak (``VmHWM``, reset after the
  warm-up chunk) measured along the stream; on the torch side the carried state holds no
  graph (``grad_fn is None`` with ``detach=True``);
- chunked equals full where a full run fits (20,000 steps, float64);
- float32 drift against a float64 reference is printed (``pytest -s``) and must stay finite
  and small.

The memory streams run 100,000 steps in the default run (a few seconds each); the 100,000-step
drift and the 20,000-step ConvLSTM stream are ``@pytest.mark.slow`` (``pytest -m slow``), with
shorter versions in the default run.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jax_impl
import torch_impl
from parity import stream_to_jax
from parity.tests.torch_threads import one_torch_thread  # noqa: F401  (autouse)

B, F, H = 2, 3, 8
CHUNK = 1000
# Allowed growth of RSS (and of its peak) between the first and the last mark. A kept torch
# graph costs ~1 KiB per step (tens of MiB over these streams); allocator noise is well
# under 1 MiB here.
GROWTH_MIB = 8.0
# float32 vs float64 drift: measured ~2e-7 at 10k and at 100k steps (these weights are
# contractive, so errors do not accumulate); docs/design.md's 1,000-step float32 bound holds.
DRIFT_BOUND = 1e-5

# The memory streams run 100k steps in the default run (~2 s torch, ~7 s JAX on a busy
# 2-core machine); the longer float32-drift and ConvLSTM streams are marked slow.
STREAM_STEPS = 100_000


# ------------------------------------------------------------------------------ helpers


def _status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def chunk_input(index: int, dtype=np.float32, features: tuple[int, ...] = (F,)) -> np.ndarray:
    """The ``index``-th ``(B, CHUNK, *features)`` chunk of the stream, made on the fly."""
    rng = np.random.default_rng(index)
    return rng.standard_normal((B, CHUNK) + features).astype(dtype)


def measure_stream(
    feed: Callable[[int], None], num_steps: int, marks: list[int]
) -> list[tuple[int, float, float]]:
    """Feeds chunks ``0 .. num_steps/CHUNK - 1`` and samples memory at the ``marks`` (steps).

    The first chunk (compilation, allocator warm-up) comes before the peak is reset.

    Returns:
        ``[(steps, rss_mib, peak_mib), ...]`` at each mark.
    """
    feed(0)
    gc.collect()
    peak_reset = _reset_peak()
    samples = []
    for index in range(1, num_steps // CHUNK):
        feed(index)
        steps = (index + 1) * CHUNK
        if steps in marks:
            gc.collect()
            peak = _status_mib("VmHWM") if peak_reset else float("nan")
            samples.append((steps, _status_mib("VmRSS"), peak))
    return samples


def assert_flat(name: str, samples: list[tuple[int, float, float]]) -> None:
    """Prints the figures; asserts RSS and its peak grew by less than GROWTH_MIB."""
    print(f"\n{name}: " + ", ".join(f"{s // 1000}k steps RSS {r:.1f} MiB peak {p:.1f} MiB" for s, r, p in samples))
    (_, rss0, peak0), (_, rss1, peak1) = samples[0], samples[-1]
    assert rss1 - rss0 < GROWTH_MIB, f"{name}: RSS grew {rss1 - rss0:.1f} MiB"
    if not np.isnan(peak0):
        assert peak1 - peak0 < GROWTH_MIB, f"{name}: peak RSS grew {peak1 - peak0:.1f} MiB"


def marks_for(num_steps: int) -> list[int]:
    return [num_steps // 10, num_steps // 2, num_steps]


JAX_MODULES = {"lstm": jax_impl.LSTM, "gru": jax_impl.GRU}
TORCH_STREAMS = {"lstm": torch_impl.StatefulLSTM, "gru": torch_impl.StatefulGRU}


def parts(state) -> tuple:
    """``(h, c)`` stays; a GRU's one array (tensor) ``h`` becomes ``(h,)``."""
    return tuple(state) if isinstance(state, tuple) else (state,)


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("kind", sorted(JAX_MODULES))
def test_jax_stream_memory_is_flat(kind, num_steps=STREAM_STEPS):
    module = JAX_MODULES[kind](H)
    stream = jax_impl.Stateful(module, jax.jit(module.init)(jax.random.key(0), jnp.ones((B, CHUNK, F))))

    def feed(index: int) -> None:
        stream(chunk_input(index)).block_until_ready()

    assert_flat(f"jax_impl.Stateful {kind.upper()}, {num_steps} steps",
                measure_stream(feed, num_steps, marks_for(num_steps)))  # fmt: skip
    assert stream.compilations == 1  # one bucket, one program, all the way
    assert all(bool(jnp.isfinite(a).all()) for a in parts(stream.carry))


@pytest.mark.parametrize("kind", sorted(TORCH_STREAMS))
def test_torch_stream_memory_is_flat_and_the_graph_is_cut(kind, num_steps=STREAM_STEPS):
    """In grad mode (parameters require grad) each chunk builds a graph; detach=True must cut
    it at the boundary, so nothing accumulates over the stream."""
    torch.manual_seed(0)
    stream = TORCH_STREAMS[kind](F, H, detach=True)
    states_without_graph = []

    def feed(index: int) -> None:
        y = stream(torch.from_numpy(chunk_input(index)))
        assert y.grad_fn is not None  # this chunk's graph exists (and dies with y)
        state = parts(stream.get_state())
        states_without_graph.append(all(t.grad_fn is None and not t.requires_grad for t in state))

    samples = measure_stream(feed, num_steps, marks_for(num_steps))
    assert all(states_without_graph) and len(states_without_graph) == num_steps // CHUNK
    assert_flat(f"{type(stream).__name__} (grad mode), {num_steps} steps", samples)


@pytest.mark.parametrize(
    "chunk, num_chunks",
    [pytest.param(100, 10, id="1k"), pytest.param(1000, 20, id="20k", marks=pytest.mark.slow)],
)
def test_torch_convlstm_stream_memory_is_flat_and_the_graph_is_cut(chunk, num_chunks):
    """The same for StatefulConvLSTM on 2x2 frames; its per-step Python loop runs ~100x slower
    than nn.LSTM's fused kernel, so its streams are shorter."""
    torch.manual_seed(0)
    stream = torch_impl.StatefulConvLSTM(F, 2, 3, detach=True)

    def feed(index: int) -> None:
        x = np.random.default_rng(index).standard_normal((B, chunk, F, 2, 2)).astype(np.float32)
        y = stream(torch.from_numpy(x))
        assert y.grad_fn is not None and all(t.grad_fn is None for t in stream.get_state())

    feed(0)
    gc.collect()
    rss = []
    for index in range(1, num_chunks):
        feed(index)
        if index in (1, num_chunks // 2, num_chunks - 1):
            gc.collect()
            rss.append(_status_mib("VmRSS"))
    print(f"\nStatefulConvLSTM (grad mode), {num_chunks * chunk} steps: RSS "
          + ", ".join(f"{r:.1f}" for r in rss) + " MiB")  # fmt: skip
    assert rss[-1] - rss[0] < GROWTH_MIB


def test_without_detach_the_graph_is_kept():
    """The contrast that makes the test above meaningful: detach=False keeps the graph."""
    stream = torch_impl.StatefulLSTM(F, H, detach=False)
    stream(torch.from_numpy(chunk_input(0)[:, :10]))
    stream(torch.from_numpy(chunk_input(1)[:, :10]))
    assert stream.get_state()[0].grad_fn is not None
    stream.detach_states()
    assert stream.get_state()[0].grad_fn is None


# ------------------------------------------------------------------------------ chunked vs full

FULL_STEPS = 20_000


def _full_input(dtype) -> np.ndarray:
    return np.concatenate([chunk_input(i, dtype) for i in range(FULL_STEPS // CHUNK)], axis=1)


def test_torch_chunked_equals_full_float64():
    torch.manual_seed(0)
    stream = torch_impl.StatefulLSTM(F, H, dtype=torch.float64)
    x = torch.from_numpy(_full_input(np.float64))
    with torch.no_grad():
        y_full, (h_full, c_full) = stream.lstm(x)
        y_chunks = torch.cat([stream(x[:, i : i + CHUNK]) for i in range(0, FULL_STEPS, CHUNK)], dim=1)
    h, c = stream.get_state()
    errors = [float((a - b).abs().max()) for a, b in ((y_chunks, y_full), (h, h_full), (c, c_full))]
    print(f"\ntorch float64, {FULL_STEPS} steps chunked vs full: max abs {max(errors):.3g}, "
          f"bit for bit: {torch.equal(y_chunks, y_full)}")  # fmt: skip
    assert max(errors) <= 1e-12


@pytest.mark.parametrize("kind", sorted(JAX_MODULES))
@pytest.mark.parametrize("dtype, bound", [("float64", 1e-12), ("float32", 1e-5)])
def test_jax_chunked_equals_full(dtype, bound, kind):
    with jax.enable_x64(dtype == "float64"):
        module = JAX_MODULES[kind](H, param_dtype=jnp.dtype(dtype))
        variables = jax.jit(module.init)(jax.random.key(0), jnp.ones((B, 2, F), dtype))
        x = _full_input(dtype)
        y_full, carry_full = jax.jit(module.apply)(variables, x)
        stream = jax_impl.Stateful(module, variables)
        y_chunks = np.concatenate(
            [np.asarray(stream(x[:, i : i + CHUNK])) for i in range(0, FULL_STEPS, CHUNK)], axis=1
        )
        carry = parts(stream.carry)
        assert y_chunks.dtype == np.dtype(dtype) and len(carry) == len(parts(carry_full))
        errors = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                  for a, b in ((y_chunks, y_full), *zip(carry, parts(carry_full)))]  # fmt: skip
    print(f"\njax {kind} {dtype}, {FULL_STEPS} steps chunked vs full: max abs {max(errors):.3g}")
    assert max(errors) <= bound


# ------------------------------------------------------------------------------ drift


@pytest.mark.parametrize("kind", sorted(TORCH_STREAMS))
@pytest.mark.parametrize(
    "num_steps", [pytest.param(10_000, id="10k"), pytest.param(100_000, id="100k", marks=pytest.mark.slow)]
)
def test_float32_drift_against_float64_stays_small(num_steps, kind):
    """torch float32 and JAX float32 streams against a torch float64 stream, same weights."""
    torch.manual_seed(0)
    ref = TORCH_STREAMS[kind](F, H, dtype=torch.float64)
    torch32 = TORCH_STREAMS[kind](F, H)
    torch32.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    jax32 = stream_to_jax(torch32)
    windows: dict[str, list[float]] = {"torch": [], "jax": []}
    with torch.no_grad():
        for index in range(num_steps // CHUNK):
            x = chunk_input(index, np.float64)
            y64 = ref(torch.from_numpy(x)).numpy()
            y32 = {
                "torch": torch32(torch.from_numpy(x.astype(np.float32))).numpy(),
                "jax": np.asarray(jax32(x.astype(np.float32))),
            }
            for side, y in y32.items():
                windows[side].append(float(np.max(np.abs(y.astype(np.float64) - y64))))
    # the last state tensor: c for the LSTM (unbounded, the one that could drift), h for the GRU
    c_drift = float(np.max(np.abs(np.asarray(parts(jax32.carry)[-1], np.float64)
                                  - parts(ref.get_state())[-1].numpy())))  # fmt: skip
    tenth = max(1, len(windows["torch"]) // 10)
    for side, errors in windows.items():
        per_tenth = [max(errors[i : i + tenth]) for i in range(0, len(errors), tenth)]
        print(f"\n{side} float32 vs float64 over {num_steps} steps, max abs per tenth: "
              + " ".join(f"{e:.2g}" for e in per_tenth))  # fmt: skip
        assert np.all(np.isfinite(errors)) and max(errors) < DRIFT_BOUND, side
    print(f"jax float32 final {'c' if kind == 'lstm' else 'h'} vs float64: {c_drift:.2g}")
    assert c_drift < DRIFT_BOUND
