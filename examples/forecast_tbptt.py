"""Forecast a long noisy signal with a stateful LSTM, trained by truncated BPTT in JAX and torch.

The sequence (a sum of sines plus noise, a few series in a batch) is cut into chunks; each
training step runs one chunk from the state the previous chunk left, back-propagates through
that chunk only, and updates with Adam (clipped). JAX trains with ``jax_impl.make_tbptt_step``
and optax; torch then trains a ``torch_impl.StatefulLSTM`` (state detached between chunks)
from the same initial weights, converted with ``parity.to_torch``, with the matching torch
optimizer (``parity.make_optimizers``). The two loss curves coincide.

    python examples/forecast_tbptt.py                    # 96 steps, plot in the temp dir
    python examples/forecast_tbptt.py --steps 32 --out /tmp/plots
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
import torch  # noqa: E402
from _common import make_signal, plot_losses, save_figure, tbptt_arguments  # noqa: E402

import jax_impl  # noqa: E402
import parity  # noqa: E402
import torch_impl  # noqa: E402


class Forecaster(nn.Module):
    """A jax_impl.LSTM and a linear read-out: ``(B, T, 1) -> (B, T, 1)``, carry passed along."""

    hidden: int

    @nn.compact
    def __call__(self, x, carry=None):
        y, carry = jax_impl.LSTM(self.hidden, name="lstm")(x, carry)  # (B, T, hidden)
        return nn.Dense(1, name="head")(y), carry


def train_jax(model, variables, tx, xs, ys, steps):
    """TBPTT in JAX: returns the per-step losses and the predictions of the last pass."""
    step = jax_impl.make_tbptt_step(model, tx)
    predict = jax.jit(model.apply)  # un-jitted, Flax would run op by op
    opt_state = tx.init(variables["params"])
    losses, preds = [], []
    for k in range(steps):
        i = k % len(xs)
        if i == 0:  # a new pass over the sequence starts from zeros
            carry = jax_impl.LSTM(model.hidden).initialize_carry((xs[0].shape[0],))
            preds = []
        y_now, _ = predict(variables, xs[i], carry)  # for the plot only
        preds.append(np.asarray(y_now))
        variables, opt_state, carry, loss = step(variables, opt_state, carry, xs[i], ys[i])
        losses.append(float(loss))
    return losses, np.concatenate(preds, axis=1)


def train_torch(variables, hidden, make_torch_opt, xs, ys, steps):
    """The same in torch, from the same initial weights."""
    lstm = parity.to_torch(jax_impl.LSTM(hidden), {"params": variables["params"]["lstm"]})
    stream = torch_impl.StatefulLSTM(1, hidden)  # detach=True: truncated BPTT
    stream.lstm.load_state_dict(lstm.state_dict())
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():  # Flax Dense kernel (in, out) is torch's weight transposed
        head.weight.copy_(torch.tensor(np.asarray(variables["params"]["head"]["kernel"]).T))
        head.bias.copy_(torch.tensor(np.asarray(variables["params"]["head"]["bias"])))
    params = list(stream.parameters()) + list(head.parameters())
    opt = make_torch_opt(params)
    losses = []
    for k in range(steps):
        i = k % len(xs)
        if i == 0:
            stream.reset_states()
        loss = torch.nn.functional.mse_loss(head(stream(torch.from_numpy(xs[i]))), torch.from_numpy(ys[i]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        losses.append(float(loss.detach()))
    return losses


CLIP = 1.0


def main(argv=None) -> None:
    args = tbptt_arguments(__doc__, steps=96, chunk=24, chunks=8, hidden=16).parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # a model this small only loses time to thread start-up

    signal = make_signal(args.batch, args.chunk * args.chunks, args.seed)  # (B, N + 1, 1)
    x, y = signal[:, :-1], signal[:, 1:]  # predict the next value
    xs = np.split(x, args.chunks, axis=1)  # chunks (B, chunk, 1)
    ys = np.split(y, args.chunks, axis=1)

    model = Forecaster(args.hidden)
    variables = jax.jit(model.init)(jax.random.key(args.seed), jnp.asarray(xs[0]))
    make_torch_opt, tx = parity.make_optimizers(("adam", dict(lr=1e-2)), clip_norm=CLIP)

    jax_losses, preds = train_jax(model, variables, tx, [jnp.asarray(a) for a in xs],
                                  [jnp.asarray(a) for a in ys], args.steps)
    torch_losses = train_torch(variables, args.hidden, make_torch_opt, xs, ys, args.steps)

    for k in range(0, args.steps, args.chunks):  # one line per pass: its mean loss
        window = slice(k, k + args.chunks)
        print(f"step {k:4d} loss {np.mean(jax_losses[window]):.6f} "
              f"(torch {np.mean(torch_losses[window]):.6f})")
    gap = max(abs(a - b) for a, b in zip(jax_losses, torch_losses))
    print(f"max |loss jax - loss torch| over {args.steps} steps: {gap:.3g}")

    fig, (ax_loss, ax_fit) = plt.subplots(2, 1, figsize=(8, 6))
    plot_losses(ax_loss, {"JAX (make_tbptt_step)": (jax_losses, "-"),
                          "torch (StatefulLSTM)": (torch_losses, "--")})
    seen = preds.shape[1]
    ax_fit.plot(y[0, :seen, 0], label="signal (next value)")
    ax_fit.plot(preds[0, :, 0], label="forecast, last pass")
    ax_fit.set_xlabel("time step")
    ax_fit.legend()
    save_figure(fig, args.out, "forecast_tbptt.png", start)


if __name__ == "__main__":
    main()
