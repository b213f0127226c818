"""Stride-1 'same' convolutions for the ConvLSTM, with a VJP that avoids XLA:CPU's backward
convolutions (see ``_conv_same_bwd``). Channels-last: NHWC inputs, HWIO kernels."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
PrecisionLike = Any


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
# T*B images (hundreds of MB) made that gradient memory-bound, several times slower than
# chunks of a few MB (benchmarks/README.md has the measurements).
_IM2COL_CHUNK_BYTES = 8 << 20


def _conv_same_bwd(dilation, padding, precision, residuals, g):
    """Both gradients without XLA:CPU's backward convolutions: the kernel gradient as im2col
    matmuls over chunks of the batch, the input gradient as a forward convolution.

    Why: inside a scan (a while loop), XLA:CPU emits the kernel-gradient convolution through a
    slow generic path, an order of magnitude slower than this; over a whole sequence at once it
    is still several times slower (benchmarks/README.md has the measurements).
    """
    x, kernel = residuals
    kh, kw, channels, features = kernel.shape
    (dh, dw), (batch, height, width, _) = dilation, g.shape
    windows = [(slice(i * dh, i * dh + height), slice(j * dw, j * dw + width))
               for i in range(kh) for j in range(kw)]  # what each kernel tap sees of the padded x
    if kh * kw * channels <= features:
        # Few input channels (a first layer): the gradient of every window at once is no
        # larger than g; add them back in place (col2im), faster than a convolution with
        # that few output channels.
        columns = jnp.dot(g, kernel.reshape(-1, features).T, precision=precision)
        columns = columns.reshape(g.shape[:3] + (kh * kw, channels))
        dx = jnp.zeros((batch, height + sum(padding[0]), width + sum(padding[1]), channels),
                       g.dtype)
        for tap, (rows, cols) in enumerate(windows):
            dx = dx.at[:, rows, cols].add(columns[..., tap, :])
        dx = dx[:, padding[0][0] : padding[0][0] + height, padding[1][0] : padding[1][0] + width]
    else:
        # The forward convolution of g with the kernel flipped in space and its channel axes
        # swapped, each padding on the other side: XLA's own transposed convolution runs
        # several times slower than this inside a while loop.
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


def conv_gates(kernel: Array, bias: Optional[Array], x: Array, dilation, precision) -> Array:
    """'same' convolution plus bias over ``(N, H, W, C)``, or ``(N, ...)`` leading axes folded."""
    lead = x.shape[:-3]
    y = _conv(x.reshape((-1,) + x.shape[-3:]), kernel, dilation, precision)
    y = y.reshape(lead + y.shape[1:])
    return y if bias is None else y + bias
