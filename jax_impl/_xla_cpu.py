"""An opt-in XLA:CPU option for batch-1 streaming: ``enable_small_loop_kernels``.

``xla_cpu_small_while_loop_byte_threshold`` lets XLA:CPU compile a while loop whose buffers
total under the threshold as one kernel, instead of dispatching every op of every iteration
through its runtime. Batch-1 streaming is exactly such a loop, and gets markedly faster, with
the same values to float32 rounding (benchmarks/README.md, "Levers measured", has the figures).

Why it is not on by default: it is an option of the whole process, and it changes how XLA
compiles other loops too. A small ConvLSTM's convolutions then round differently (within every
parity bound, but not bitwise what they were), and big loops can lose a lot: a ConvLSTM's
backward pass compiled so is many times slower. At 1 MB, the default threshold here, only the
batch-1 LSTM configurations measured changed.

XLA reads ``XLA_FLAGS`` once, when JAX starts its backends, and refuses this option in
per-jit ``compiler_options``: so it must be set before the first JAX computation, either by
calling ``enable_small_loop_kernels()`` first thing, or with ``CARRYOVER_SMALL_LOOP_KERNELS=1``
in the environment, which ``import jax_impl`` honours.
"""

from __future__ import annotations

import os
import warnings

SMALL_WHILE_LOOP_BYTES = 1 << 20
ENV = "CARRYOVER_SMALL_LOOP_KERNELS"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge  # noqa: PLC0415 - private; absent: assume started
    except ImportError:  # pragma: no cover
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def enable_small_loop_kernels(threshold_bytes: int = SMALL_WHILE_LOOP_BYTES) -> bool:
    """Asks XLA:CPU to compile while loops under ``threshold_bytes`` as single kernels.

    Call it before any JAX computation (it adds to ``XLA_FLAGS``, which XLA reads when its
    backends start). Nothing is changed, with a warning naming why, if the backends have
    already started or if ``XLA_FLAGS`` already holds ``--xla_backend_extra_options`` (the
    option takes one list: ours would replace yours; add
    ``xla_cpu_small_while_loop_byte_threshold=N`` to it yourself).

    Arguments:
        threshold_bytes: the loop size (its buffers, in bytes) under which a loop is compiled
            as one kernel; an int >= 1.

    Returns:
        True when the option was set.

    Example:
        >>> import jax_impl
        >>> jax_impl.enable_small_loop_kernels()  # doctest: +SKIP
        True
    """
    if not isinstance(threshold_bytes, int) or isinstance(threshold_bytes, bool):
        raise TypeError(f"threshold_bytes must be an int, got {type(threshold_bytes).__name__}")
    if threshold_bytes < 1:
        raise ValueError(f"threshold_bytes must be >= 1, got {threshold_bytes}")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_extra_options" in flags:
        warnings.warn("XLA_FLAGS already sets --xla_backend_extra_options: left as it is",
                      stacklevel=2)
        return False
    if _backends_started():
        warnings.warn("JAX's backends have started: XLA_FLAGS is read only before that, so "
                      "small-loop kernels stay off in this process", stacklevel=2)
        return False
    flag = f"--xla_backend_extra_options=xla_cpu_small_while_loop_byte_threshold={threshold_bytes}"
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    return True


def small_loop_kernels_enabled() -> bool:
    """Whether ``XLA_FLAGS`` asks for small-loop kernels (in effect if set before JAX started)."""
    return "xla_cpu_small_while_loop_byte_threshold" in os.environ.get("XLA_FLAGS", "")


if os.environ.get(ENV, "") not in ("", "0"):
    enable_small_loop_kernels()
