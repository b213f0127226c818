"""The functional core: pure cell steps, cells described by their parts, the drivers.

Everything here is a function of arrays (no Flax): what the modules call, for users who write
their own loop or their own cell type. A new cell type is a ``CellKind`` (its update function,
its gate count and its carry) plus, for modules, its parameter table (``dense_param_shapes``).

Example:
    >>> import jax.numpy as jnp
    >>> from jax_impl.functional import DenseWeights, dense_parts, run_stack
    >>> w = DenseWeights(jnp.ones((3, 16)), jnp.ones((4, 16)))
    >>> carry = LSTMState(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)))   # (layers, B, H)
    >>> ys, (h, c) = run_stack(dense_parts("lstm"), [[w]], carry, jnp.ones((5, 2, 3)))
    >>> ys.shape
    (5, 2, 4)
"""

from .cells import (
    KINDS,
    CellKind,
    CellParts,
    ConvWeights,
    DenseWeights,
    LSTMState,
    conv_param_shapes,
    conv_parts,
    convlstm_step,
    dense_param_shapes,
    dense_parts,
    gru_step,
    gru_update,
    init_bound,
    lstm_step,
    lstm_update,
    rnn_relu_update,
    rnn_step,
    rnn_tanh_update,
)
from .conv import same_padding
from .scan import RunOptions, SequenceMasks, run_stack, scan_direction
from .sharding import run_stack_sharded
from .stateful import bucket_length, stream_step

__all__ = [
    "LSTMState",
    "DenseWeights",
    "ConvWeights",
    "lstm_step",
    "gru_step",
    "rnn_step",
    "convlstm_step",
    "lstm_update",
    "gru_update",
    "rnn_tanh_update",
    "rnn_relu_update",
    "CellKind",
    "KINDS",
    "CellParts",
    "dense_parts",
    "conv_parts",
    "dense_param_shapes",
    "conv_param_shapes",
    "init_bound",
    "same_padding",
    "RunOptions",
    "SequenceMasks",
    "scan_direction",
    "run_stack",
    "run_stack_sharded",
    "stream_step",
    "bucket_length",
]
