"""carryover's JAX/Flax side: torch.nn.LSTM semantics as pure cells, a scan driver and Flax modules."""

# first: CARRYOVER_SMALL_LOOP_KERNELS must reach XLA_FLAGS before JAX starts its backends
from ._xla_cpu import enable_small_loop_kernels, small_loop_kernels_enabled  # noqa: I001
from .cells import (
    Cell,
    ConvLSTMCell,
    ConvLSTMWeights,
    LSTMCell,
    LSTMWeights,
    convlstm_cell,
    convlstm_step,
    lstm_cell,
    lstm_step,
    lstm_update,
)
from .modules import LSTM, ConvLSTM
from .scan import run_stack, scan_direction
from .sharding import ShardedModule, replicate, shard_batch, with_mesh
from .stateful import Stateful, bucket_length, stream_step
from .training import clip_by_global_norm_torch, make_tbptt_step, mse_loss, remat_apply

__all__ = [
    "LSTM",
    "ConvLSTM",
    "LSTMCell",
    "ConvLSTMCell",
    "LSTMWeights",
    "ConvLSTMWeights",
    "lstm_step",
    "convlstm_step",
    "Cell",
    "lstm_cell",
    "convlstm_cell",
    "lstm_update",
    "scan_direction",
    "run_stack",
    "Stateful",
    "stream_step",
    "bucket_length",
    "with_mesh",
    "ShardedModule",
    "shard_batch",
    "replicate",
    "enable_small_loop_kernels",
    "small_loop_kernels_enabled",
    "make_tbptt_step", "remat_apply", "clip_by_global_norm_torch", "mse_loss",
]
