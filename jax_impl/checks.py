"""Argument and input checks shared by the Linen modules, the NNX modules and ``Stateful``.

Every check runs at trace time (shapes and dtypes are static) and raises a ValueError (wrong
value, shape or size) or TypeError (wrong type or dtype) naming what was expected and what came.
Nothing is broadcast: a carry of the wrong shape is an error, never reshaped.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .cells import LSTMState

Array = jax.Array


# ------------------------------------------------------------------------------ constructor


def check_int(value, name: str, minimum: int) -> None:
    """An int (not a bool) >= ``minimum``, else a TypeError / ValueError naming both."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def as_pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints >= 1 as a pair; a clear error otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)):
        pair = tuple(value)
    else:  # a float or anything else: name it rather than fail inside tuple()
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return pair


def check_dropout(rate) -> None:
    """torch's rule for ``dropout``: a number in [0, 1)."""
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise TypeError(f"dropout must be a number, got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {rate}")


def check_lstm_sizes(hidden_size, proj_size) -> None:
    """torch.nn.LSTM's size rules: hidden_size >= 1, 0 <= proj_size < hidden_size."""
    check_int(hidden_size, "hidden_size", 1)
    check_int(proj_size, "proj_size", 0)
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}"
        )


def check_conv_sizes(hidden_channels, kernel_size, dilation) -> None:
    """A ConvLSTM's sizes: hidden_channels >= 1; kernel_size and dilation ints or pairs >= 1."""
    check_int(hidden_channels, "hidden_channels", 1)
    as_pair(kernel_size, "kernel_size")
    as_pair(dilation, "dilation")


BACKWARDS = ("batched", "autodiff", "remat")


def check_backward(backward) -> None:
    """One of ``BACKWARDS``."""
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")


def check_nonlinearity(nonlinearity) -> None:
    """torch.nn.RNN's ``nonlinearity``: ``"tanh"`` or ``"relu"``."""
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")


# ------------------------------------------------------------------------------ call


def concrete_value(x) -> Optional[np.ndarray]:
    """The value of ``x`` as numpy if it is known at trace time, else None (a tracer)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_input(x, ranks: tuple[int, int], what: str) -> Array:
    """Checks a floating input of rank ``ranks[0]`` (unbatched) or ``ranks[1]`` (batched)."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{what} input must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what} input has dtype {x.dtype}, expected a floating dtype")
    if x.ndim not in ranks:
        raise ValueError(
            f"{what} input has rank {x.ndim} (shape {tuple(x.shape)}), expected {ranks[0]} "
            f"(unbatched) or {ranks[1]} (batched)"
        )
    return jnp.asarray(x)


def check_x64(tree: Any, what: str) -> None:
    """Float64 arrays outside x64 mode would silently run (and be carried on) in float32:
    refuse them, naming the fix."""
    if jax.config.jax_enable_x64:
        return
    for leaf in jax.tree_util.tree_leaves(tree):
        if np.dtype(getattr(leaf, "dtype", np.float32)) == np.float64:
            raise TypeError(
                f"{what} holds float64 arrays but JAX's x64 mode is off, so it would silently "
                "run in float32; call it inside `with jax.enable_x64(True):`"
            )


def _check_array(array, name: str, shape: tuple[int, ...], layout: str) -> Array:
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"carry {name} must be an array, got {type(array).__name__}")
    if tuple(array.shape) != tuple(shape):
        raise ValueError(
            f"carry {name} has shape {tuple(array.shape)}, expected {tuple(shape)} ({layout})"
        )
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"carry {name} has dtype {array.dtype}, expected a floating dtype")
    return jnp.asarray(array)


def check_carry(carry, expected: Any, layout: str) -> Any:
    """Checks a carry against the expected shapes; never broadcasts.

    Arguments:
        carry: what the caller passed.
        expected: ``LSTMState`` of two shapes (an LSTM-like carry ``(h, c)``), or one shape
            (a GRU / RNN carry: the array ``h``).
        layout: the axes' names for the message, e.g. ``"layers * directions, batch, features"``.

    Returns:
        The carry as arrays: an ``LSTMState`` or one array.
    """
    if isinstance(expected, LSTMState):
        if not isinstance(carry, (tuple, list)) or len(carry) != 2:
            got = type(carry).__name__
            if hasattr(carry, "shape"):
                got = f"one array of shape {tuple(carry.shape)} (a GRU/RNN carry?)"
            raise TypeError(f"carry must be a pair (h, c), got {got}")
        return LSTMState(
            *(_check_array(a, n, s, layout) for a, n, s in zip(carry, "hc", expected))
        )
    if isinstance(carry, (tuple, list)):
        raise TypeError(
            f"carry must be one array h of shape {tuple(expected)}, got a {type(carry).__name__} "
            f"of {len(carry)} (an LSTM's (h, c)?)"
        )
    return _check_array(carry, "h", expected, layout)


def check_seq_lengths(seq_lengths, batch: Optional[int], num_steps: int) -> Array:
    """``(B,)`` (or ``()`` unbatched) ints in [0, T]; checked when concrete, clipped under jit."""
    expected = () if batch is None else (batch,)
    if not hasattr(seq_lengths, "shape"):
        seq_lengths = np.asarray(seq_lengths)
    if tuple(seq_lengths.shape) != expected:
        raise ValueError(
            f"seq_lengths has shape {tuple(seq_lengths.shape)}, expected {expected} "
            f"({'unbatched input' if batch is None else 'one length per batch row'})"
        )
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(f"seq_lengths has dtype {seq_lengths.dtype}, expected an integer dtype")
    value = concrete_value(seq_lengths)
    if value is not None and value.size and (value.min() < 0 or value.max() > num_steps):
        raise ValueError(
            f"seq_lengths must lie in [0, {num_steps}] (the sequence length), got "
            f"min {value.min()} max {value.max()}"
        )
    return jnp.clip(jnp.asarray(seq_lengths, jnp.int32), 0, num_steps).reshape((-1,))


def check_reset(reset, expected: tuple[int, ...], layout: str) -> Array:
    """A bool reset mask of exactly ``expected`` shape."""
    if not hasattr(reset, "shape"):
        reset = np.asarray(reset)
    if tuple(reset.shape) != tuple(expected):
        raise ValueError(f"reset has shape {tuple(reset.shape)}, expected {expected} ({layout})")
    if reset.dtype != jnp.bool_:
        raise TypeError(f"reset has dtype {reset.dtype}, expected bool")
    return jnp.asarray(reset)


class SequenceLayout:
    """Moves a sequence between the user's layout and the drivers' time-major batched one.

    Arguments:
        x: the input, ``(B, T, *features)``, ``(T, B, *features)`` or unbatched ``(T, *features)``.
        time_major: whether a batched ``x`` is ``(T, B, ...)``.
        feature_rank: how many trailing axes are features (1 for dense cells, 3 for conv).
    """

    def __init__(self, x: Array, time_major: bool, feature_rank: int):
        self.batched = x.ndim == 2 + feature_rank
        self.time_major = time_major
        if self.batched:
            self.num_steps = x.shape[0] if time_major else x.shape[1]
            self.batch: Optional[int] = x.shape[1] if time_major else x.shape[0]
        else:
            self.num_steps, self.batch = x.shape[0], None
        self.time_axis = 0 if (not self.batched or time_major) else 1

    def sequence_in(self, x: Array) -> Array:  # -> (T, B, ...)
        if not self.batched:
            return x[:, None]
        return x if self.time_major else jnp.swapaxes(x, 0, 1)

    def sequence_out(self, ys: Array) -> Array:
        if not self.batched:
            return ys[:, 0]
        return ys if self.time_major else jnp.swapaxes(ys, 0, 1)

    def mask_shape(self) -> tuple[tuple[int, ...], str]:
        if not self.batched:
            return (self.num_steps,), "(T,) for unbatched input"
        if self.time_major:
            return (self.num_steps, self.batch), "(T, B) with time_major"
        return (self.batch, self.num_steps), "(B, T)"

    def mask_in(self, mask: Array) -> Array:  # -> (T, B)
        if not self.batched:
            return mask[:, None]
        return mask if self.time_major else mask.T

    def carry_in(self, carry: Any) -> Any:  # -> (L*D, B, ...)
        return carry if self.batched else jax.tree_util.tree_map(lambda a: a[:, None], carry)

    def carry_out(self, carry: Any) -> Any:
        return carry if self.batched else jax.tree_util.tree_map(lambda a: a[:, 0], carry)
