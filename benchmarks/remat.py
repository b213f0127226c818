"""Compiled memory of one TBPTT training step with and without ``remat`` (``jax.checkpoint``).

Reports XLA's ``memory_analysis()`` of the compiled step (no run needed): ``temp`` is the
scratch memory the step needs, where the activations kept for the backward pass live.

    python -m benchmarks.remat                 # LSTM and ConvLSTM, T=512
    python -m benchmarks.remat --steps 128 --batch 8 --hidden 64
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import optax

import jax_impl


def compiled_memory(module: Any, x: jax.Array, y: jax.Array, remat: bool) -> dict[str, int]:
    """Bytes XLA reserves for one jitted ``make_tbptt_step`` step on ``(x, y)``.

    Arguments:
        module: a jax_impl.LSTM or ConvLSTM.
        x, y: one chunk and its target, in the module's layout.
        remat: wrap the cell step in ``jax.checkpoint``.

    Returns:
        ``{"temp": ..., "argument": ..., "output": ...}`` in bytes.

    Example:
        >>> compiled_memory(jax_impl.LSTM(32), jnp.ones((4, 512, 8)), jnp.ones((4, 512, 32)), True)
    """
    variables = jax.eval_shape(module.init, jax.random.key(0), x)  # shapes only: nothing runs
    tx = optax.adam(1e-3)
    opt_state = jax.eval_shape(tx.init, variables["params"])
    batch_shape = (x.shape[0],) + tuple(x.shape[2:-1])
    carry = jax.eval_shape(lambda: module.initialize_carry(batch_shape, x.dtype))
    step = jax_impl.make_tbptt_step(module, tx, remat=remat)
    stats = step.lower(variables, opt_state, carry, x, y).compile().memory_analysis()
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=512, help="chunk length T")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--size", type=int, default=16, help="ConvLSTM frame height and width")
    args = parser.parse_args(argv)

    B, T, F, H = args.batch, args.steps, args.features, args.hidden
    cases = {
        f"LSTM(hidden={H}, 2 layers) x (B={B}, T={T}, F={F})": (
            jax_impl.LSTM(H, num_layers=2),
            jax.ShapeDtypeStruct((B, T, F), jnp.float32),
            jax.ShapeDtypeStruct((B, T, H), jnp.float32),
        ),
        f"ConvLSTM(hidden=8, k=3) x (B={B}, T={T}, {args.size}x{args.size}x1)": (
            jax_impl.ConvLSTM(8, 3),
            jax.ShapeDtypeStruct((B, T, args.size, args.size, 1), jnp.float32),
            jax.ShapeDtypeStruct((B, T, args.size, args.size, 8), jnp.float32),
        ),
    }
    print(f"{'configuration':<52} {'temp (remat off)':>17} {'temp (remat on)':>16} {'saved':>7}")
    for name, (module, x, y) in cases.items():
        plain = compiled_memory(module, x, y, remat=False)["temp"]
        remat = compiled_memory(module, x, y, remat=True)["temp"]
        print(f"{name:<52} {plain / 2**20:>13.2f} MiB {remat / 2**20:>12.2f} MiB "
              f"{plain / max(remat, 1):>6.1f}x")


if __name__ == "__main__":
    main()
