"""Next-frame prediction of moving squares with a ConvLSTM, trained by truncated BPTT in JAX.

Each sequence shows a small square bouncing around a 16x16 frame. A ``jax_impl.ConvLSTM``
and a 1x1 convolution read-out predict frame t+1 from frames up to t. Training runs chunk by
chunk with ``jax_impl.make_tbptt_step`` (state carried, graph cut at each chunk) and Adam.

    python examples/convlstm_moving_shapes.py                 # 48 steps, plot in the temp dir
    python examples/convlstm_moving_shapes.py --steps 16 --out /tmp/plots
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _common import save_figure, tbptt_arguments  # noqa: E402

import jax_impl  # noqa: E402


class FramePredictor(nn.Module):
    """ConvLSTM then a 1x1 conv: ``(B, T, S, S, 1) -> (B, T, S, S, 1)`` next-frame logits."""

    hidden: int = 8

    @nn.compact
    def __call__(self, x, carry=None):
        h, carry = jax_impl.ConvLSTM(self.hidden, 3, name="convlstm")(x, carry)  # (B, T, S, S, hid)
        return nn.Conv(1, (1, 1), name="readout")(h), carry


def moving_squares(batch: int, frames: int, size: int, seed: int) -> np.ndarray:
    """``(batch, frames, size, size, 1)`` float32: a 4x4 square bouncing off the borders."""
    rng = np.random.default_rng(seed)
    side = 4
    video = np.zeros((batch, frames, size, size, 1), np.float32)
    for b in range(batch):
        pos = rng.integers(0, size - side, size=2).astype(float)
        vel = rng.choice([-1.0, 1.0], size=2) * rng.uniform(0.7, 1.5, size=2)
        for t in range(frames):
            r, c = np.round(pos).astype(int)
            video[b, t, r : r + side, c : c + side, 0] = 1.0
            pos += vel
            for axis in range(2):  # bounce
                if not 0 <= pos[axis] <= size - side:
                    vel[axis] = -vel[axis]
                    pos[axis] = np.clip(pos[axis], 0, size - side)
    return video


def bce_logits(logits, target):
    """Mean binary cross-entropy on logits: the frames are 0/1 pixels."""
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, target))


def main(argv=None) -> None:
    parser = tbptt_arguments(__doc__, steps=48, chunk=6, chunks=4, hidden=8,
                             chunk_help="frames per chunk (TBPTT window)",
                             chunks_help="chunks per sequence")
    parser.add_argument("--size", type=int, default=16, help="frame height and width")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    video = moving_squares(args.batch, args.chunk * args.chunks + 1, args.size, args.seed)
    xs = np.split(video[:, :-1], args.chunks, axis=1)  # chunks (B, chunk, S, S, 1)
    ys = np.split(video[:, 1:], args.chunks, axis=1)  # the next frames
    xs, ys = [jnp.asarray(a) for a in xs], [jnp.asarray(a) for a in ys]

    model = FramePredictor(args.hidden)
    variables = jax.jit(model.init)(jax.random.key(args.seed), xs[0])
    tx = optax.chain(jax_impl.clip_by_global_norm_torch(1.0), optax.adam(0.1))  # high lr: past "all background" fast
    step = jax_impl.make_tbptt_step(model, tx, bce_logits)
    opt_state = tx.init(variables["params"])
    new_carry = lambda: jax_impl.ConvLSTM(args.hidden, 3).initialize_carry(
        (args.batch, args.size, args.size)
    )

    losses = []
    for k in range(args.steps):
        i = k % args.chunks
        if i == 0:  # a new pass over the sequences starts from zeros
            carry = new_carry()
        variables, opt_state, carry, loss = step(variables, opt_state, carry, xs[i], ys[i])
        losses.append(float(loss))
    for k in range(0, args.steps, args.chunks):  # one line per pass: its mean loss
        print(f"step {k:4d} loss {np.mean(losses[k : k + args.chunks]):.6f}")

    # predictions over the first chunk of sequence 0, from zeros, with the trained weights
    logits, _ = jax.jit(model.apply)(variables, xs[0], new_carry())
    predicted = np.asarray(jax.nn.sigmoid(logits))[0, ..., 0]  # (chunk, S, S)
    shown = min(args.chunk, 6)
    fig, axes = plt.subplots(3, shown, figsize=(1.6 * shown, 5.2), squeeze=False)
    for t in range(shown):
        axes[0, t].imshow(np.asarray(ys[0])[0, t, ..., 0], cmap="gray", vmin=0, vmax=1)
        axes[1, t].imshow(predicted[t], cmap="gray", vmin=0, vmax=1)
        axes[0, t].set_title(f"t+{t + 1}", fontsize=8)
        for row in range(2):
            axes[row, t].axis("off")
        axes[2, t].axis("off")
    axes[0, 0].set_ylabel("true")
    loss_ax = fig.add_subplot(3, 1, 3)
    loss_ax.plot(losses)
    loss_ax.set_xlabel("step (one chunk)")
    loss_ax.set_ylabel("BCE")
    fig.suptitle("next frame: true (top), predicted (middle)", fontsize=9)
    save_figure(fig, args.out, "convlstm_moving_shapes.png", start)


if __name__ == "__main__":
    main()
