"""carryover's benchmark suite: JAX/Flax against PyTorch, side by side in one process.

Run ``python -m benchmarks`` from the repository root (``--help`` for the options). The suite
times every competitor of a case in interleaved, round-robin repetitions after warm-up, takes
medians and paired JAX/torch ratios, converts times to GFLOP/s against an sgemm peak measured in
the same run, and writes ``results.json``, ``results.md`` and ``ratios.png``.

Modules: ``configs`` (shapes and FLOP counts), ``timing`` (the interleaved runner),
``competitors`` (what runs), ``streaming`` (``jax_impl.Stateful`` cases), ``first_call``
(the cold-start subprocess), ``construct`` (the eager-construction subprocess), ``report``
(the outputs), ``cli`` (the command line); run on their own: ``nnx_overhead``,
``sharded_stream``, ``remat``, ``before_after``.
"""

__all__ = ["main"]


def main(argv=None) -> int:
    """``python -m benchmarks``; see ``benchmarks.cli``."""
    from .cli import main as _main

    return _main(argv)
