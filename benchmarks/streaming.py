"""``jax_impl.Stateful`` cases: chunked streaming against one full call, and recompilations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jax_impl

from .configs import LSTMConfig
from .timing import Competitor

STREAM_CHUNKS = "Stateful, chunks"
STREAM_ONE = "Stateful, one chunk"
JIT_FULL = "jax_impl.LSTM (jit, full)"


def _model_and_input(cfg: LSTMConfig, steps: int | None = None):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(
        (cfg.batch, steps or cfg.steps, cfg.input_size), dtype=np.float32))
    model = jax_impl.LSTM(cfg.hidden_size, num_layers=cfg.num_layers)
    variables = model.init(jax.random.key(0), x)
    return model, variables, x


def stream_competitors(cfg: LSTMConfig, chunk: int) -> list[Competitor]:
    """Forward of ``cfg`` three ways: a Stateful stream fed chunks of ``chunk`` steps, the same
    stream fed the whole sequence at once, and the plain jitted module on the whole sequence.

    The chunked stream dispatches every chunk and blocks once on all outputs at the end (a
    pipeline that consumes outputs asynchronously); chunks are sliced before timing. Streams
    are never reset between repetitions: the carry flows on, which changes no timing.
    """
    model, variables, x = _model_and_input(cfg)
    chunks = [x[:, t:t + chunk] for t in range(0, cfg.steps, chunk)]
    chunked = jax_impl.Stateful(model, variables)
    whole = jax_impl.Stateful(model, variables)
    apply = jax.jit(model.apply)

    def run_chunks():
        return jax.block_until_ready([chunked(c) for c in chunks])

    def run_whole():
        return jax.block_until_ready(whole(x))

    def run_jit():
        return jax.block_until_ready(apply(variables, x))

    n = len(chunks)
    return [
        Competitor(JIT_FULL, "jax", run_jit, note=f"one call, T={cfg.steps}"),
        Competitor(STREAM_CHUNKS, "jax", run_chunks, note=f"{n} chunks of {chunk}"),
        Competitor(STREAM_ONE, "jax", run_whole, note=f"one chunk of {cfg.steps}"),
    ]


def ragged_compilations(cfg: LSTMConfig, chunk: int, ragged: list[int], log=print) -> dict:
    """New compilations of ``Stateful``'s step for a ragged last chunk, after warm-up.

    For each ragged length r: a fresh stream runs two full chunks of ``chunk`` steps (the
    warm-up: the first compiles, the second must not), then one chunk of r steps, then a second
    chunk of r steps; ``stream.compilations`` is read before and after each.
    """
    model, variables, x = _model_and_input(cfg, steps=2 * chunk)
    per_length = {}
    for r in ragged:
        stream = jax_impl.Stateful(model, variables)
        jax.block_until_ready(stream(x[:, :chunk]))
        after_first = stream.compilations
        jax.block_until_ready(stream(x[:, chunk:2 * chunk]))
        warm = stream.compilations
        jax.block_until_ready(stream(x[:, :r]))
        ragged_once = stream.compilations
        jax.block_until_ready(stream(x[:, :r]))
        ragged_twice = stream.compilations
        per_length[r] = {
            "bucket": jax_impl.functional.bucket_length(r),
            "compilations_after_first_chunk": after_first,
            "compilations_after_warmup": warm,
            "new_for_ragged_chunk": ragged_once - warm,
            "new_for_second_ragged_chunk": ragged_twice - ragged_once,
            "new_for_second_full_chunk": warm - after_first,
        }
        log(f"    ragged {r:2d} (bucket {per_length[r]['bucket']:2d}): "
            f"+{per_length[r]['new_for_ragged_chunk']} compilations")
    news = [v["new_for_ragged_chunk"] for v in per_length.values()]
    return {
        "config": cfg.name,
        "chunk": chunk,
        "per_length": per_length,
        "max_new": max(news) if news else None,
        "total_new": sum(news),
        "lengths_that_compile": [r for r, v in per_length.items() if v["new_for_ragged_chunk"]],
    }
