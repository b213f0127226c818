"""carryover's JAX/Flax side: torch's recurrent modules as Flax modules over pure cells.

Top level: the Linen modules and cells, ``Stateful`` streams and the training helpers. The
functional core (pure steps, cells as parts, the drivers, weights tuples) is
``jax_impl.functional``; the Flax NNX modules are ``jax_impl.nnx``; data parallelism helpers
are ``jax_impl.sharding``.
"""

# first: CARRYOVER_SMALL_LOOP_KERNELS must reach XLA_FLAGS before JAX starts its backends
from ._xla_cpu import enable_small_loop_kernels, small_loop_kernels_enabled  # noqa: I001
from . import functional, sharding  # noqa: F401  (submodules reachable as attributes)
from .cells import LSTMState
from .linen import GRU, LSTM, RNN, ConvLSTM, ConvLSTMCell, GRUCell, LSTMCell, RNNCell
from .stateful import Stateful
from .training import clip_by_global_norm_torch, make_tbptt_step, mse_loss, remat_apply

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "ConvLSTM",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "ConvLSTMCell",
    "LSTMState",
    "Stateful",
    "make_tbptt_step",
    "remat_apply",
    "clip_by_global_norm_torch",
    "mse_loss",
    "enable_small_loop_kernels",
    "small_loop_kernels_enabled",
]


def __getattr__(name: str):
    """``jax_impl.nnx`` is imported on first use: flax.nnx adds to the time of ``import
    jax_impl``, which Linen users need not pay."""
    if name == "nnx":
        import importlib  # noqa: PLC0415

        return importlib.import_module(".nnx", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
