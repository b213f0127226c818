"""carryover's parity package: lossless torch <-> JAX conversion and the comparison harness.

The only package that imports both ``torch_impl`` and ``jax_impl``.
"""

from .checkpoint import load_stream, read_checkpoint, save_stream
from .convert import stream_to_jax, stream_to_torch, to_jax, to_torch
from .custom import CustomPort
from .harness import compare
from .report import Check, Report
from .state_dict import Converted, convert_state_dict, load_converted, save_converted
from .training import TrainingReport, compare_training, make_optimizers

__all__ = [
    "to_jax",
    "to_torch",
    "stream_to_jax",
    "stream_to_torch",
    "compare",
    "Report",
    "Check",
    "compare_training",
    "make_optimizers",
    "TrainingReport",
    "save_stream",
    "load_stream",
    "read_checkpoint",
    "convert_state_dict",
    "load_converted",
    "save_converted",
    "Converted",
    "CustomPort",
]
