"""What the examples share: the command line of a chunked (TBPTT) training run, the signal
the forecasting examples learn, and the plots' loss panel and file. Each example runs as a script (``python examples/x.py``), which
puts this folder on ``sys.path``."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "carryover-examples")


def tbptt_arguments(doc: str, *, steps: int, chunk: int, chunks: int, hidden: int,
                    chunk_help: str = "chunk length (TBPTT window)",
                    chunks_help: str = "chunks per pass over the signal") -> argparse.ArgumentParser:
    """The options every example has (``--steps --chunk --chunks --hidden --batch --seed
    --out``), with this example's defaults; an example adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=steps, help="training steps (one chunk each)")
    parser.add_argument("--chunk", type=int, default=chunk, help=chunk_help)
    parser.add_argument("--chunks", type=int, default=chunks, help=chunks_help)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNG")
    return parser


def make_signal(batch: int, length: int, seed: int) -> np.ndarray:
    """``(batch, length + 1, 1)`` float32: two sines with random phases plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(length + 1)[None, :]
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 2))
    s = np.sin(2 * np.pi * t / 24 + phase[:, :1]) + 0.5 * np.sin(2 * np.pi * t / 7 + phase[:, 1:])
    s = s + 0.1 * rng.normal(size=s.shape)
    return s[..., None].astype(np.float32)


def plot_losses(ax, curves: dict, ylabel: str = "MSE") -> None:
    """The loss of each training step on a log scale: ``{label: (losses, line style)}``."""
    for label, (losses, style) in curves.items():
        ax.semilogy(losses, style, label=label)
    ax.set_xlabel("step (one chunk)")
    ax.set_ylabel(ylabel)
    ax.legend()


def save_figure(fig, out: str, name: str, started: float) -> None:
    """Writes ``fig`` to ``out/name`` and says where, with the run's wall time."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"plot: {path}  ({time.perf_counter() - started:.1f} s)")
