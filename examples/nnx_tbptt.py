"""Forecast a noisy sine with a Flax NNX GRU, trained by truncated BPTT (``jax_impl.nnx``).

The model is an NNX module built eagerly: a ``jax_impl.nnx.GRU`` (torch's GRU, torch's init)
and an ``nnx.Linear`` read-out. The sequence is cut into chunks; each step runs one chunk from
the carry the previous chunk left, back-propagates through that chunk only, and updates with
``nnx.Optimizer`` (Adam): ``jax_impl.nnx.make_tbptt_step``. A pass over the signal starts from
zeros; the loss is printed once per pass and plotted.

    python examples/nnx_tbptt.py                      # 48 steps, plot in the temp dir
    python examples/nnx_tbptt.py --steps 12 --out /tmp/plots
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jax_impl.nnx as jnnx  # noqa: E402

DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "carryover-examples")


class Forecaster(nnx.Module):
    """A GRU and a linear read-out: ``(B, T, 1) -> (B, T, 1)``, the carry passed along."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.gru = jnnx.GRU(1, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x, carry=None):
        y, carry = self.gru(x, carry)  # (B, T, hidden)
        return self.head(y), carry


def make_signal(batch: int, length: int, seed: int) -> np.ndarray:
    """``(batch, length + 1, 1)`` float32: a sine with random phases plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length + 1)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 1))
    s = np.sin(2 * np.pi * t / 16 + phase) + 0.05 * rng.normal(size=(batch, length + 1))
    return s[..., None].astype(np.float32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48, help="training steps (one chunk each)")
    parser.add_argument("--chunk", type=int, default=16, help="chunk length (TBPTT window)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks per pass over the signal")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    signal = make_signal(args.batch, args.chunk * args.chunks, args.seed)  # (B, N + 1, 1)
    xs = [jnp.asarray(a) for a in np.split(signal[:, :-1], args.chunks, axis=1)]
    ys = [jnp.asarray(a) for a in np.split(signal[:, 1:], args.chunks, axis=1)]  # next value

    model = Forecaster(args.hidden, rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    step = jnnx.make_tbptt_step()  # nnx.jit: one compilation, reused by every chunk

    losses = []
    for k in range(args.steps):
        i = k % args.chunks
        if i == 0:  # a new pass over the signal starts from zeros
            carry = model.gru.initialize_carry((args.batch,))
        carry, loss = step(model, optimizer, carry, xs[i], ys[i])
        losses.append(float(loss))
    for k in range(0, args.steps, args.chunks):  # one line per pass: its mean loss
        print(f"step {k:4d} loss {np.mean(losses[k : k + args.chunks]):.6f}")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "nnx_tbptt.png")
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.semilogy(losses, label="jax_impl.nnx.GRU + nnx.Linear")
    ax.set_xlabel("step (one chunk)")
    ax.set_ylabel("MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
