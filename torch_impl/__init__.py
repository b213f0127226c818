"""PyTorch side of carryover: ConvLSTM2d (torch has none) and stateful recurrent modules.

Never imports JAX; ``parity`` is the only package that knows both sides.
"""

from .convlstm import ConvLSTM2d, ConvLSTMCell, convlstm_step, from_concat_conv
from .stateful import StatefulConvLSTM, StatefulGRU, StatefulLSTM, StatefulRNN, StatefulWrapper

__all__ = [
    "ConvLSTM2d",
    "ConvLSTMCell",
    "StatefulConvLSTM",
    "StatefulGRU",
    "StatefulLSTM",
    "StatefulRNN",
    "StatefulWrapper",
    "convlstm_step",
    "from_concat_conv",
]
