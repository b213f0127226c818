"""The cell math, once, as pure functions of arrays — and the Flax cells that hold their weights.

Gate order is torch's: i, f, g, o. Both biases are kept apart (``ih_bias`` and ``hh_bias``) as in
torch, so conversion is lossless and gradients match parameter by parameter.

Kernels are stored the Flax way, ``(in, out)`` for the LSTM and ``HWIO`` for the ConvLSTM; the
torch layouts are their transposes (see ``parity.mapping``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Array = jax.Array
Carry = tuple[Array, Array]  # (h, c), torch's order
PrecisionLike = Any


# ----------------------------------------------------------------------------------- weights


class LSTMWeights(NamedTuple):
    """One LSTM layer-direction's parameters (H = hidden_size, P = proj_size or H)."""

    ih_kernel: Array  # (F, 4H)
    hh_kernel: Array  # (P, 4H)
    ih_bias: Optional[Array] = None  # (4H,)
    hh_bias: Optional[Array] = None  # (4H,)
    proj_kernel: Optional[Array] = None  # (H, P)


class ConvLSTMWeights(NamedTuple):
    """One ConvLSTM layer's parameters, channels-last (HWIO kernels)."""

    ih_kernel: Array  # (kh, kw, C_in, 4H)
    hh_kernel: Array  # (kh, kw, H, 4H)
    ih_bias: Optional[Array] = None  # (4H,)
    hh_bias: Optional[Array] = None  # (4H,)


# ----------------------------------------------------------------------------------- math


def lstm_update(gates: Array, c: Array) -> Carry:
    """torch's LSTM update from pre-activations ``gates`` (..., 4H) split i, f, g, o.

    Returns ``(h, c)``: the new cell state and ``h`` before any projection.
    """
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * jnp.tanh(g)
    h = _sigmoid(o) * jnp.tanh(c)
    return h, c


def _sigmoid(x: Array) -> Array:
    """The logistic function through one tanh: XLA:CPU expands ``jax.nn.sigmoid`` to an exp
    and a division, which made an LSTM forward ~10% slower (B32 H128); equal within rounding."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


@dataclasses.dataclass(frozen=True)
class Cell:
    """A cell step split at its linear maps, so a driver can batch them over time.

    One step is ``gates = input_gates(w, x) + hidden_gates(w, h)``, ``(h, c) =
    lstm_update(gates, c)``, ``h = output(w, h)``. The three maps are affine in the weights and
    in their second argument and act on trailing axes only, so they also apply to a whole
    sequence at once with time folded into the batch: ``scan.scan_direction`` uses that to
    compute the weight and input gradients of all steps as one matmul (or convolution) each,
    after the backward loop instead of inside it.

    Instances are made once per option set (``lstm_cell``, ``convlstm_cell``): hashable, a
    static argument of ``jax.jit``. Called, a Cell is the plain step ``(w, carry, x) ->
    (carry, y)``.

    Example:
        >>> cell = lstm_cell()                                   # torch.nn.LSTM's step
        >>> (h, c), y = cell(weights, (h0, c0), x)                # one step, x (B, F)
        >>> (h, c), ys = scan_direction(cell, weights, (h0, c0), xs)   # xs (T, B, F)
    """

    input_gates: Callable[[Any, Array], Array]  # (w, x (N, ..., F)) -> (N, ..., 4H), ih bias in
    hidden_gates: Callable[[Any, Array], Array]  # (w, h (N, ..., P)) -> (N, ..., 4H), hh bias in
    output: Callable[[Any, Array], Array]  # (w, h (N, ..., H)) -> (N, ..., P); h itself if no map

    def step_with_gates(self, weights: Any, carry: Carry, x: Array) -> tuple[Carry, Array, Array]:
        """One step; also returns the pre-activation ``gates`` and ``h`` before ``output``."""
        h, c = carry
        # torch adds each bias to its own product: (x W_ih + b_ih) + (h W_hh + b_hh)
        gates = self.input_gates(weights, x) + self.hidden_gates(weights, h)
        h_full, c = lstm_update(gates, c)
        return (self.output(weights, h_full), c), gates, h_full

    def __call__(self, weights: Any, carry: Carry, x: Array) -> tuple[Carry, Array]:
        (h, c), _, _ = self.step_with_gates(weights, carry, x)
        return (h, c), h


def _affine(x: Array, kernel: Array, bias: Optional[Array], precision) -> Array:
    y = jnp.dot(x, kernel, precision=precision)
    return y if bias is None else y + bias


def _lstm_input_gates(weights: LSTMWeights, x: Array, precision=None) -> Array:
    return _affine(x, weights.ih_kernel, weights.ih_bias, precision)  # (..., 4H)


def _lstm_hidden_gates(weights: LSTMWeights, h: Array, precision=None) -> Array:
    return _affine(h, weights.hh_kernel, weights.hh_bias, precision)  # (..., 4H)


def _lstm_output(weights: LSTMWeights, h: Array, precision=None) -> Array:
    if weights.proj_kernel is None:
        return h  # the very same array: drivers test ``is`` to skip a map that is not there
    return jnp.dot(h, weights.proj_kernel, precision=precision)  # (..., P)


@functools.lru_cache(maxsize=None)
def lstm_cell(precision: PrecisionLike = None) -> Cell:
    """torch.nn.LSTM's step as a ``Cell`` (one object per precision)."""
    return Cell(
        functools.partial(_lstm_input_gates, precision=precision),
        functools.partial(_lstm_hidden_gates, precision=precision),
        functools.partial(_lstm_output, precision=precision),
    )


def lstm_step(
    weights: LSTMWeights, carry: Carry, x: Array, precision: PrecisionLike = None
) -> tuple[Carry, Array]:
    """One torch.nn.LSTM step.

    Arguments:
        weights: the layer's ``LSTMWeights``.
        carry: ``(h, c)``, shapes ``(..., P)`` and ``(..., H)``.
        x: the input, ``(..., F)``.
        precision: matmul precision (``jax.lax.Precision``), None for the backend default.

    Returns:
        ``((h, c), h)``: the new carry and the step's output (``h``, projected when proj_size).
    """
    return lstm_cell(precision)(weights, carry, x)


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    """torch's ``padding='same'`` rule: total ``d*(k-1)``, the smaller half first."""
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def _lax_conv(x: Array, kernel: Array, dilation, padding, precision) -> Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_same(x: Array, kernel: Array, dilation, padding, precision) -> Array:
    return _lax_conv(x, kernel, dilation, padding, precision)


def _conv_same_fwd(x, kernel, dilation, padding, precision):
    return _lax_conv(x, kernel, dilation, padding, precision), (x, kernel)


# Rows of the kernel gradient's im2col matrix formed at a time: the matrix of a whole batch of
# T*B images (hundreds of MB) made that gradient memory-bound, 3-4x slower than chunks of
# a few MB (measured at 40x64x64x16 k3 and 160x32x32x32 k5).
_IM2COL_CHUNK_BYTES = 8 << 20


def _conv_same_bwd(dilation, padding, precision, residuals, g):
    """Both gradients without XLA:CPU's backward convolutions: the kernel gradient as im2col
    matmuls over chunks of the batch, the input gradient as a forward convolution.

    Why: inside a scan (a while loop), XLA:CPU emits the kernel-gradient convolution through a
    slow generic path — a ConvLSTM's backward pass ran ~15x slower than this (measured at
    B4 64x64 3->16 k3); over a whole sequence at once it is still 3-4x slower than this.
    """
    x, kernel = residuals
    kh, kw, channels, features = kernel.shape
    (dh, dw), (batch, height, width, _) = dilation, g.shape
    windows = [(slice(i * dh, i * dh + height), slice(j * dw, j * dw + width))
               for i in range(kh) for j in range(kw)]  # what each kernel tap sees of the padded x
    if kh * kw * channels <= features:
        # Few input channels (a first layer): the gradient of every window at once is no
        # larger than g; add them back in place (col2im). 3.5x faster than a convolution
        # with 3 output channels (B40 64x64 64->3 k3).
        columns = jnp.dot(g, kernel.reshape(-1, features).T, precision=precision)
        columns = columns.reshape(g.shape[:3] + (kh * kw, channels))
        dx = jnp.zeros((batch, height + sum(padding[0]), width + sum(padding[1]), channels),
                       g.dtype)
        for tap, (rows, cols) in enumerate(windows):
            dx = dx.at[:, rows, cols].add(columns[..., tap, :])
        dx = dx[:, padding[0][0] : padding[0][0] + height, padding[1][0] : padding[1][0] + width]
    else:
        # The forward convolution of g with the kernel flipped in space and its channel axes
        # swapped, each padding on the other side: XLA's own transposed convolution ran 4.7x
        # slower than this inside a while loop (B4 64x64 64->16 k3).
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, O, C)
        swapped = tuple((d * (k - 1) - lo, d * (k - 1) - hi)
                        for (lo, hi), d, k in zip(padding, dilation, (kh, kw)))
        dx = _lax_conv(g, flipped, dilation, swapped, precision)
    padded = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))

    def chunk_gradient(padded, g):  # (n, H+pad, W+pad, C), (n, H, W, O) -> (kh*kw*C, O)
        columns = jnp.concatenate(  # (n, H, W, kh*kw*C): the window each output pixel sees
            [padded[:, rows, cols] for rows, cols in windows], axis=-1
        )
        return jnp.dot(
            columns.reshape(-1, kh * kw * channels).T, g.reshape(-1, features),
            precision=precision,
        )

    row_bytes = height * width * kh * kw * channels * x.dtype.itemsize
    rows = max(1, min(batch, _IM2COL_CHUNK_BYTES // row_bytes))
    while batch % rows:  # the largest divisor of the batch within the budget
        rows -= 1
    if rows == batch:
        dkernel = chunk_gradient(padded, g)
    else:
        chunks = (padded.reshape((batch // rows, rows) + padded.shape[1:]),
                  g.reshape((batch // rows, rows) + g.shape[1:]))
        dkernel = jax.lax.fori_loop(
            0, batch // rows,
            lambda k, total: total + chunk_gradient(chunks[0][k], chunks[1][k]),
            jnp.zeros((kh * kw * channels, features), g.dtype),
        )
    return dx, dkernel.reshape(kernel.shape)


_conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def _conv(x: Array, kernel: Array, dilation: Sequence[int], precision: PrecisionLike) -> Array:
    """Stride-1 'same' convolution (torch's padding rule), NHWC x HWIO."""
    padding = tuple(same_padding(kernel.shape[:2], dilation))
    return _conv_same(x, kernel, tuple(dilation), padding, precision)


def _conv_gates(kernel: Array, bias: Optional[Array], x: Array, dilation, precision) -> Array:
    """'same' convolution plus bias over ``(N, H, W, C)``, or ``(N, ...)`` leading axes folded."""
    lead = x.shape[:-3]
    y = _conv(x.reshape((-1,) + x.shape[-3:]), kernel, dilation, precision)
    y = y.reshape(lead + y.shape[1:])
    return y if bias is None else y + bias


def _convlstm_input_gates(weights: ConvLSTMWeights, x: Array, dilation, precision) -> Array:
    return _conv_gates(weights.ih_kernel, weights.ih_bias, x, dilation, precision)


def _convlstm_hidden_gates(weights: ConvLSTMWeights, h: Array, dilation, precision) -> Array:
    return _conv_gates(weights.hh_kernel, weights.hh_bias, h, dilation, precision)


def _identity_output(weights: Any, h: Array) -> Array:
    del weights
    return h


@functools.lru_cache(maxsize=None)
def convlstm_cell(dilation: tuple[int, int] = (1, 1), precision: PrecisionLike = None) -> Cell:
    """The ConvLSTM step as a ``Cell`` (one object per dilation and precision)."""
    dilation = tuple(dilation)
    return Cell(
        functools.partial(_convlstm_input_gates, dilation=dilation, precision=precision),
        functools.partial(_convlstm_hidden_gates, dilation=dilation, precision=precision),
        _identity_output,
    )


def convlstm_step(
    weights: ConvLSTMWeights,
    carry: Carry,
    x: Array,
    dilation: Sequence[int] = (1, 1),
    precision: PrecisionLike = None,
) -> tuple[Carry, Array]:
    """One ConvLSTM step: the LSTM update with 'same' convolutions in place of matmuls.

    Arguments:
        weights: the layer's ``ConvLSTMWeights``.
        carry: ``(h, c)``, each ``(B, H, W, hidden)``.
        x: the input, ``(B, H, W, C_in)``.
        dilation: the kernels' dilation, a pair.
        precision: convolution precision, None for the backend default.

    Returns:
        ``((h, c), h)``.
    """
    return convlstm_cell(tuple(dilation), precision)(weights, carry, x)


# ----------------------------------------------------------------------------------- params


def torch_uniform(bound: float):
    """torch's RNN initialisation: every parameter uniform in [-bound, bound]."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def declare_param(module: nn.Module, name: str, init, shape: tuple[int, ...], dtype) -> Array:
    """``module.param`` that names the mismatch when stored weights don't fit the input."""
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if tuple(stored.shape) != tuple(shape):
            raise ValueError(
                f"parameter {'/'.join(module.path + (name,))} has shape {tuple(stored.shape)}, "
                f"expected {tuple(shape)} for this input"
            )
    return module.param(name, init, shape, dtype)


def declare_lstm_weights(
    module: nn.Module,
    in_features: int,
    hidden_size: int,
    proj_size: int,
    use_bias: bool,
    param_dtype,
) -> LSTMWeights:
    """Creates (or fetches) one layer-direction's LSTM parameters in ``module``'s scope."""
    init = torch_uniform(1.0 / math.sqrt(hidden_size))
    h_out = proj_size or hidden_size
    gates = 4 * hidden_size
    return LSTMWeights(
        ih_kernel=declare_param(module, "ih_kernel", init, (in_features, gates), param_dtype),
        hh_kernel=declare_param(module, "hh_kernel", init, (h_out, gates), param_dtype),
        ih_bias=declare_param(module, "ih_bias", init, (gates,), param_dtype) if use_bias else None,
        hh_bias=declare_param(module, "hh_bias", init, (gates,), param_dtype) if use_bias else None,
        proj_kernel=(
            declare_param(module, "proj_kernel", init, (hidden_size, proj_size), param_dtype)
            if proj_size
            else None
        ),
    )


def declare_convlstm_weights(
    module: nn.Module,
    in_channels: int,
    hidden_channels: int,
    kernel_size: tuple[int, int],
    use_bias: bool,
    param_dtype,
) -> ConvLSTMWeights:
    """Creates (or fetches) one ConvLSTM layer's parameters in ``module``'s scope.

    Initialisation: uniform ±1/sqrt(hidden_channels * kh * kw) — nn.LSTM's rule with the
    kernel's spatial fan-in, the same as ``torch_impl.ConvLSTM2d``.
    """
    kh, kw = kernel_size
    init = torch_uniform(1.0 / math.sqrt(hidden_channels * kh * kw))
    gates = 4 * hidden_channels
    return ConvLSTMWeights(
        ih_kernel=declare_param(module, "ih_kernel", init, (kh, kw, in_channels, gates), param_dtype),
        hh_kernel=declare_param(
            module, "hh_kernel", init, (kh, kw, hidden_channels, gates), param_dtype
        ),
        ih_bias=declare_param(module, "ih_bias", init, (gates,), param_dtype) if use_bias else None,
        hh_bias=declare_param(module, "hh_bias", init, (gates,), param_dtype) if use_bias else None,
    )


def cast_weights(weights, dtype):
    """Casts every parameter of a weights tuple to the computation ``dtype`` (None: unchanged)."""
    if dtype is None:
        return weights
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), weights)


def as_pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints >= 1 as a pair; a clear error otherwise."""
    if isinstance(value, int):
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


def check_int(value, name: str, minimum: int) -> None:
    """An int (not a bool) >= ``minimum``, else a TypeError / ValueError naming both."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_lstm_sizes(hidden_size, proj_size) -> None:
    """torch.nn.LSTM's size rules: hidden_size >= 1, 0 <= proj_size < hidden_size."""
    check_int(hidden_size, "hidden_size", 1)
    check_int(proj_size, "proj_size", 0)
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}"
        )


def computation_dtype(dtype, x: Array, weights) -> Any:
    """Flax's rule: the explicit ``dtype``, else the promotion of the input and the params."""
    if dtype is not None:
        return jnp.dtype(dtype)
    leaves = [x] + jax.tree_util.tree_leaves(weights)
    return jnp.result_type(*leaves)


# ----------------------------------------------------------------------------------- cells


class LSTMCell(nn.RNNCellBase):
    """One torch.nn.LSTMCell step (with torch.nn.LSTM's ``proj_size``), carry ``(h, c)``.

    Drives with ``jax.lax.scan`` or ``flax.linen.RNN``.

    Arguments:
        hidden_size: H.
        proj_size: P > 0 projects h to P features (torch's LSTM proj_size); 0 for none.
        use_bias: keep torch's two biases.

    Example:
        >>> cell = LSTMCell(hidden_size=32)
        >>> carry = cell.initialize_carry(jax.random.key(0), (8, 16))    # h, c: (8, 32)
        >>> variables = cell.init(jax.random.key(1), carry, jnp.ones((8, 16)))
        >>> carry, y = cell.apply(variables, carry, jnp.ones((8, 16)))   # y: (8, 32)
    """

    hidden_size: int
    proj_size: int = 0
    use_bias: bool = True
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None

    def __post_init__(self):
        check_lstm_sizes(self.hidden_size, self.proj_size)
        super().__post_init__()

    @nn.compact
    def __call__(self, carry: Carry, x: Array) -> tuple[Carry, Array]:
        weights = declare_lstm_weights(
            self, x.shape[-1], self.hidden_size, self.proj_size, self.use_bias, self.param_dtype
        )
        dtype = computation_dtype(self.dtype, x, weights)
        h, c = carry
        return lstm_step(
            cast_weights(weights, dtype),
            (h.astype(dtype), c.astype(dtype)),
            x.astype(dtype),
            self.precision,
        )

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]) -> Carry:
        del rng  # zeros, as torch
        batch = tuple(input_shape[:-1])
        dtype = self.dtype or self.param_dtype
        return (
            jnp.zeros(batch + (self.proj_size or self.hidden_size,), dtype),
            jnp.zeros(batch + (self.hidden_size,), dtype),
        )

    @property
    def num_feature_axes(self) -> int:
        return 1


class ConvLSTMCell(nn.RNNCellBase):
    """One ConvLSTM step, channels-last, carry ``(h, c)`` each ``(B, H, W, hidden)``.

    Example:
        >>> cell = ConvLSTMCell(hidden_channels=16, kernel_size=3)
        >>> carry = cell.initialize_carry(jax.random.key(0), (2, 32, 32, 3))
        >>> variables = cell.init(jax.random.key(1), carry, jnp.ones((2, 32, 32, 3)))
        >>> carry, y = cell.apply(variables, carry, jnp.ones((2, 32, 32, 3)))  # (2, 32, 32, 16)
    """

    hidden_channels: int
    kernel_size: Any = 3
    use_bias: bool = True
    dilation: Any = 1
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None

    def __post_init__(self):
        check_int(self.hidden_channels, "hidden_channels", 1)
        as_pair(self.kernel_size, "kernel_size")
        as_pair(self.dilation, "dilation")
        super().__post_init__()

    @nn.compact
    def __call__(self, carry: Carry, x: Array) -> tuple[Carry, Array]:
        weights = declare_convlstm_weights(
            self,
            x.shape[-1],
            self.hidden_channels,
            as_pair(self.kernel_size, "kernel_size"),
            self.use_bias,
            self.param_dtype,
        )
        dtype = computation_dtype(self.dtype, x, weights)
        h, c = carry
        return convlstm_step(
            cast_weights(weights, dtype),
            (h.astype(dtype), c.astype(dtype)),
            x.astype(dtype),
            as_pair(self.dilation, "dilation"),
            self.precision,
        )

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]) -> Carry:
        del rng
        shape = tuple(input_shape[:-1]) + (self.hidden_channels,)
        dtype = self.dtype or self.param_dtype
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    @property
    def num_feature_axes(self) -> int:
        return 3
