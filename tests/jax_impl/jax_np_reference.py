"""Independent numpy (float64) references for the jax_impl unit tests.

Nothing here imports jax_impl: the LSTM update, torch's 'same' convolution padding and the
layer/direction/packed-length/reset semantics of torch.nn.LSTM are written out again, step by
step and row by row, from the contract in DESIGN.md:

* gates split i, f, g, o; ``c = σ(f) c + σ(i) tanh(g)``, ``h = σ(o) tanh(c)``, then
  ``h @ proj_kernel`` when there is a projection; kernels are ``(in, out)`` (HWIO for convs);
* 'same' padding: total ``d * (k - 1)`` per spatial axis, ``total // 2`` on the left;
* a stack runs layer by layer; direction 1 runs backwards; carry index ``layer * D + d``;
* a row of length ``L`` only ever sees its steps ``0 .. L-1``: forward stops at ``L-1``,
  reverse starts there, outputs past ``L`` are zero, ``L == 0`` keeps the initial carry;
* a reset at step ``t`` zeroes the carry before step ``t`` (forward) and before step ``t-1``
  (reverse), i.e. each segment between resets is an independent sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def np_lstm_cell(p: dict, x: np.ndarray, h: np.ndarray, c: np.ndarray):
    """One LSTM step on ``(..., F)`` inputs with a parameter dict (jax_impl names)."""
    gates = x @ p["ih_kernel"] + h @ p["hh_kernel"]
    if p.get("ih_bias") is not None:
        gates = gates + p["ih_bias"] + p["hh_bias"]
    hidden = c.shape[-1]
    i = gates[..., 0 * hidden : 1 * hidden]
    f = gates[..., 1 * hidden : 2 * hidden]
    g = gates[..., 2 * hidden : 3 * hidden]
    o = gates[..., 3 * hidden : 4 * hidden]
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    if p.get("proj_kernel") is not None:
        h = h @ p["proj_kernel"]
    return h, c


def torch_same_pads(kernel: int, dilation: int) -> tuple[int, int]:
    """torch's padding='same': total d*(k-1), the left (top) side gets total // 2."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def np_conv_same(x: np.ndarray, kernel: np.ndarray, dilation=(1, 1)) -> np.ndarray:
    """Stride-1 cross-correlation, NHWC input, HWIO kernel, explicit torch 'same' padding."""
    kh, kw, cin, cout = kernel.shape
    dh, dw = dilation
    b, height, width, c = x.shape
    assert c == cin, (c, cin)
    xp = np.pad(x, ((0, 0), torch_same_pads(kh, dh), torch_same_pads(kw, dw), (0, 0)))
    out = np.zeros((b, height, width, cout), dtype=np.float64)
    for ky in range(kh):
        for kx in range(kw):
            window = xp[:, ky * dh : ky * dh + height, kx * dw : kx * dw + width, :]
            out += np.einsum("bhwc,co->bhwo", window, kernel[ky, kx])
    return out


def np_convlstm_cell(p: dict, x: np.ndarray, h: np.ndarray, c: np.ndarray, dilation=(1, 1)):
    """One ConvLSTM step; ``x``, ``h``, ``c`` are ``(B, H, W, C)`` or unbatched ``(H, W, C)``."""
    unbatched = x.ndim == 3
    if unbatched:
        x, h, c = x[None], h[None], c[None]
    gates = np_conv_same(x, p["ih_kernel"], dilation) + np_conv_same(h, p["hh_kernel"], dilation)
    if p.get("ih_bias") is not None:
        gates = gates + p["ih_bias"] + p["hh_bias"]
    hidden = c.shape[-1]
    i, f, g, o = (gates[..., k * hidden : (k + 1) * hidden] for k in range(4))
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    if unbatched:
        return h[0], c[0]
    return h, c


Cell = Callable[[dict, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def np_stack(
    cell: Cell,
    layers: Sequence[Sequence[dict]],
    xs: np.ndarray,
    h0: np.ndarray,
    c0: np.ndarray,
    lengths: Sequence[int] | None = None,
    reset: np.ndarray | None = None,
):
    """torch.nn.LSTM's stack, row by row and step by step.

    Arguments:
        cell: ``cell(params, x_row, h_row, c_row) -> (h_row, c_row)``.
        layers: ``[layer][direction]`` parameter dicts (numpy).
        xs: time-major ``(T, B, ...)``.
        h0, c0: ``(L * D, B, ...)``.
        lengths: ``(B,)`` valid steps, None for all ``T``.
        reset: ``(T, B)`` bools or None.

    Returns:
        ``(ys, h_n, c_n)`` with ``ys`` ``(T, B, D * H_out...)`` (directions on the last axis).
    """
    xs = np.asarray(xs, np.float64)
    num_steps, batch = xs.shape[:2]
    num_dirs = len(layers[0])
    lengths = np.full(batch, num_steps) if lengths is None else np.asarray(lengths)
    reset = np.zeros((num_steps, batch), bool) if reset is None else np.asarray(reset)
    h_n = np.array(h0, dtype=np.float64, copy=True)
    c_n = np.array(c0, dtype=np.float64, copy=True)
    for layer, directions in enumerate(layers):
        outputs = []
        for d, params in enumerate(directions):
            k = layer * num_dirs + d
            ys = np.zeros((num_steps, batch) + h_n.shape[2:], np.float64)
            for b in range(batch):
                n = int(lengths[b])
                h, c = h_n[k, b], c_n[k, b]
                steps = range(n) if d == 0 else range(n - 1, -1, -1)
                for t in steps:
                    # forward: a segment starts at t; reverse: the segment after t starts at t+1
                    starts = reset[t, b] if d == 0 else (t + 1 < n and reset[t + 1, b])
                    if starts:
                        h, c = np.zeros_like(h), np.zeros_like(c)
                    h, c = cell(params, xs[t, b], h, c)
                    ys[t, b] = h
                h_n[k, b], c_n[k, b] = h, c
            outputs.append(ys)
        xs = np.concatenate(outputs, axis=-1)
    return xs, h_n, c_n


def layer_params(params: dict, num_layers: int, bidirectional: bool) -> list[list[dict]]:
    """``[layer][direction]`` numpy dicts out of a jax_impl module's ``params`` collection."""
    out = []
    for layer in range(num_layers):
        names = [f"layer_{layer}"] + ([f"layer_{layer}_reverse"] if bidirectional else [])
        out.append(
            [{k: np.asarray(v, np.float64) for k, v in params[name].items()} for name in names]
        )
    return out
