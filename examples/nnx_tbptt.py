"""Forecast a noisy signal with a Flax NNX GRU, trained by truncated BPTT (``jax_impl.nnx``).

The model is an NNX module built eagerly: a ``jax_impl.nnx.GRU`` (torch's GRU, torch's init)
and an ``nnx.Linear`` read-out. The sequence is cut into chunks; each step runs one chunk from
the carry the previous chunk left, back-propagates through that chunk only, and updates with
``nnx.Optimizer`` (Adam): ``jax_impl.nnx.make_tbptt_step``. A pass over the signal starts from
zeros; the loss is printed once per pass and plotted.

    python examples/nnx_tbptt.py                      # 48 steps, plot in the temp dir
    python examples/nnx_tbptt.py --steps 12 --out /tmp/plots
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import make_signal, plot_losses, save_figure, tbptt_arguments  # noqa: E402
from flax import nnx  # noqa: E402

import jax_impl.nnx as jnnx  # noqa: E402


class Forecaster(nnx.Module):
    """A GRU and a linear read-out: ``(B, T, 1) -> (B, T, 1)``, the carry passed along."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.gru = jnnx.GRU(1, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x, carry=None):
        y, carry = self.gru(x, carry)  # (B, T, hidden)
        return self.head(y), carry


def main(argv=None) -> None:
    args = tbptt_arguments(__doc__, steps=48, chunk=16, chunks=4, hidden=16).parse_args(argv)
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

    fig, ax = plt.subplots(figsize=(7, 3))
    plot_losses(ax, {"jax_impl.nnx.GRU + nnx.Linear": (losses, "-")})
    save_figure(fig, args.out, "nnx_tbptt.png", start)


if __name__ == "__main__":
    main()
