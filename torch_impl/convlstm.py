"""Convolutional LSTM for PyTorch, with torch.nn.LSTM's API.

torch has no ConvLSTM; this module is the reference the JAX port is checked against.
The gate math exists once, in :func:`convlstm_step`; :class:`ConvLSTMCell` (one step, like
nn.LSTMCell) and :class:`ConvLSTM2d` (a sequence and a stack of layers, like nn.LSTM) only
hold parameters and drive it. :func:`from_concat_conv` imports the common checkpoint layout
that uses one convolution over ``cat([x, h])`` per layer.

Gates are ordered i, f, g, o (as in nn.LSTM). Convolutions have stride 1 and 'same' zero
padding with torch's ``padding='same'`` rule, so even kernels keep the spatial size too.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ConvLSTM2d", "ConvLSTMCell", "convlstm_step", "from_concat_conv", "same_padding"]

Pair = tuple[int, int]
# Zero padding in F.pad's order for the last two dims: (left, right, top, bottom).
Padding = tuple[int, int, int, int]
HiddenState = tuple[Tensor, Tensor]

GATES = "ifgo"


def same_padding(kernel_size: Pair, dilation: Pair) -> Padding:
    """Padding that keeps the spatial size, by torch's ``padding='same'`` rule.

    Per spatial dim the total is ``dilation * (kernel - 1)``; ``total // 2`` goes before and
    the rest after, so an even kernel pads one more at the right/bottom.

    Arguments:
        kernel_size: ``(kh, kw)``.
        dilation: ``(dh, dw)``.

    Returns:
        ``(left, right, top, bottom)``, the order of ``F.pad`` for the last two dims.

    Example:
        >>> same_padding((4, 3), (1, 2))
        (2, 2, 1, 2)
    """
    (kh, kw), (dh, dw) = kernel_size, dilation
    total_h, total_w = dh * (kh - 1), dw * (kw - 1)
    return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: Padding, dilation: Pair) -> Tensor:
    """Stride-1 conv2d with explicit, possibly asymmetric, zero padding."""
    left, right, top, bottom = padding
    pad_w, pad_h = min(left, right), min(top, bottom)
    if (left, right, top, bottom) != (pad_w, pad_w, pad_h, pad_h):
        # conv2d pads symmetrically only: pad just the uneven remainder here (what torch's
        # padding='same' does internally, without its warning for even kernels).
        x = F.pad(x, (left - pad_w, right - pad_w, top - pad_h, bottom - pad_h))
    return F.conv2d(x, weight, bias, padding=(pad_h, pad_w), dilation=dilation)


def convlstm_step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    padding_ih: Padding,
    padding_hh: Padding,
    dilation: Pair,
) -> HiddenState:
    """One ConvLSTM step: the gate math, as a pure function of tensors.

    ``gates = conv(x, W_ih, b_ih) + conv(h, W_hh, b_hh)``, split in the order i, f, g, o;
    ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``; ``h' = sigmoid(o) * tanh(c')``.
    One convolution per operand yields all four gates (``4 * hidden`` output channels).

    Arguments:
        x: input ``(B, C_in, H, W)``.
        h, c: hidden and cell state, each ``(B, hidden, H, W)``.
        weight_ih: ``(4 * hidden, C_in, kh, kw)``.
        weight_hh: ``(4 * hidden, hidden, kh, kw)``.
        bias_ih, bias_hh: ``(4 * hidden,)`` or None.
        padding_ih, padding_hh: zero padding ``(left, right, top, bottom)`` of ``x`` and ``h``,
            usually :func:`same_padding` of the kernel.
        dilation: ``(dh, dw)``.

    Returns:
        ``(h', c')``, each ``(B, hidden, H, W)`` when the padding keeps the spatial size.

    Example:
        >>> x, h = torch.randn(2, 3, 8, 8), torch.zeros(2, 4, 8, 8)
        >>> w_ih, w_hh = torch.randn(16, 3, 3, 3), torch.randn(16, 4, 3, 3)
        >>> pad = same_padding((3, 3), (1, 1))
        >>> h, c = convlstm_step(x, h, h, w_ih, w_hh, None, None, pad, pad, (1, 1))
        >>> h.shape
        torch.Size([2, 4, 8, 8])
    """
    gates = _conv(x, weight_ih, bias_ih, padding_ih, dilation) + _conv(
        h, weight_hh, bias_hh, padding_hh, dilation
    )
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


# --- argument checks -------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_size(name: str, value: object) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _check_pair(name: str, value: object) -> Pair:
    pair = (value, value) if _is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(_is_int, pair))):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_input(x: object, name: str, layouts: dict[int, str], dtype: torch.dtype) -> Tensor:
    """Type, dtype and rank of an input; ``layouts`` maps each accepted rank to its layout."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype} (the parameters' dtype)")
    if x.dim() not in layouts:
        accepted = " or ".join(f"{rank}-D {layout}" for rank, layout in layouts.items())
        raise ValueError(f"{name} must be {accepted}, got {x.dim()}-D shape {tuple(x.shape)}")
    return x


def _check_channels(name: str, got: int, expected: int) -> None:
    if got != expected:
        raise ValueError(f"{name} has {got} channels, expected {expected} (input_channels)")


def _check_hx(hx: object, expected: dict[str, tuple[int, str]], like: Tensor) -> HiddenState:
    """Check that ``hx`` is a pair (h, c) whose dims are ``expected``: name -> (size, source)."""
    if not (
        isinstance(hx, (tuple, list)) and len(hx) == 2 and all(isinstance(t, Tensor) for t in hx)
    ):
        raise TypeError(f"hx must be a pair (h_0, c_0) of tensors, got {type(hx).__name__}")
    layout = "(" + ", ".join(expected) + ")"
    for name, t in zip("hc", hx):
        if t.dim() != len(expected):
            raise ValueError(
                f"hx {name} must be {len(expected)}-D {layout}, got {t.dim()}-D shape "
                f"{tuple(t.shape)}"
            )
        for (dim, (want, source)), size in zip(expected.items(), t.shape):
            if size != want:
                raise ValueError(f"hx {name} has {dim} {size}, expected {want} ({source})")
        if t.dtype != like.dtype:
            raise TypeError(f"hx {name} has dtype {t.dtype}, expected {like.dtype} (input dtype)")
    return hx[0], hx[1]


def _init_uniform(module: nn.Module, hidden_channels: int, kernel_size: Pair) -> None:
    # nn.LSTM draws every parameter from U(-k, k) with k = 1/sqrt(hidden_size), the fan-in
    # of weight_hh; the fan-in of a conv weight_hh is hidden_channels * kh * kw.
    bound = 1.0 / math.sqrt(hidden_channels * kernel_size[0] * kernel_size[1])
    for p in module.parameters():
        nn.init.uniform_(p, -bound, bound)


# --- modules ---------------------------------------------------------------------------------


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step, like :class:`torch.nn.LSTMCell` with convolutions.

    Arguments:
        input_channels: channels ``C_in`` of the input.
        hidden_channels: channels of ``h`` and ``c``.
        kernel_size: int or ``(kh, kw)``, >= 1; even sizes keep the spatial size too.
        bias: whether to learn ``bias_ih`` and ``bias_hh``.
        dilation: int or ``(dh, dw)``, >= 1.
        device, dtype: of the parameters.

    Parameters: ``weight_ih (4*hidden, C_in, kh, kw)``, ``weight_hh (4*hidden, hidden, kh, kw)``,
    ``bias_ih``, ``bias_hh (4*hidden,)``; gates in the order i, f, g, o. Every parameter starts
    from ``U(-k, k)``, ``k = 1 / sqrt(hidden_channels * kh * kw)`` (see :class:`ConvLSTM2d`).

    Example:
        >>> cell = ConvLSTMCell(3, 8, 3)
        >>> h, c = cell(torch.randn(2, 3, 16, 16))
        >>> h, c = cell(torch.randn(2, 3, 16, 16), (h, c))
        >>> h.shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int | Pair,
        bias: bool = True,
        dilation: int | Pair = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_channels = _check_size("input_channels", input_channels)
        self.hidden_channels = _check_size("hidden_channels", hidden_channels)
        self.kernel_size = _check_pair("kernel_size", kernel_size)
        self.bias = _check_bool("bias", bias)
        self.dilation = _check_pair("dilation", dilation)
        self._padding = same_padding(self.kernel_size, self.dilation)
        factory = {"device": device, "dtype": dtype}
        gates, kernel = 4 * self.hidden_channels, self.kernel_size
        self.weight_ih = nn.Parameter(torch.empty(gates, self.input_channels, *kernel, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gates, self.hidden_channels, *kernel, **factory))
        if self.bias:
            self.bias_ih = nn.Parameter(torch.empty(gates, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gates, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from ``U(-k, k)``, ``k = 1 / sqrt(hidden_channels * kh * kw)``."""
        _init_uniform(self, self.hidden_channels, self.kernel_size)

    def extra_repr(self) -> str:
        s = f"{self.input_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if not self.bias:
            s += ", bias=False"
        return s

    def forward(self, x: Tensor, hx: HiddenState | None = None) -> HiddenState:
        """One step.

        Arguments:
            x: ``(B, C_in, H, W)``, or unbatched ``(C_in, H, W)``.
            hx: ``(h, c)``, each ``(B, hidden, H, W)`` (unbatched ``(hidden, H, W)``);
                None means zeros.

        Returns:
            ``(h', c')`` in the layout of ``hx``.
        """
        _check_input(x, "input", {4: "(B, C, H, W)", 3: "unbatched (C, H, W)"}, self.weight_ih.dtype)
        _check_channels("input", x.shape[-3], self.input_channels)
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        batch, _, height, width = x.shape
        if hx is None:
            h = c = x.new_zeros(batch, self.hidden_channels, height, width)
        else:
            expected = {"batch": (batch, "input batch")} if batched else {}
            expected.update(
                channels=(self.hidden_channels, "hidden_channels"),
                height=(height, "input height"),
                width=(width, "input width"),
            )
            h, c = _check_hx(hx, expected, x)
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        h, c = convlstm_step(
            x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            self._padding, self._padding, self.dilation,
        )  # fmt: skip
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class ConvLSTM2d(nn.Module):
    """A stack of ConvLSTM layers over a sequence: torch.nn.LSTM's API with convolutions.

    Each layer runs :func:`convlstm_step` over time; layer ``k > 0`` reads layer ``k - 1``'s
    hidden states. Convolutions have stride 1 and 'same' zero padding (torch's rule, so even
    kernels keep the spatial size). In training mode, ``dropout`` is applied to every layer's
    output sequence except the last one's, as in nn.LSTM.

    Initialisation: every parameter, biases included, is drawn from ``U(-k, k)`` with
    ``k = 1 / sqrt(hidden_channels * kh * kw)``. This is nn.LSTM's rule (``k = 1/sqrt(hidden_size)``,
    the fan-in of ``weight_hh``) with the fan-in of the convolutional ``weight_hh`` in its place,
    so one formula covers every layer and parameter.

    Arguments:
        input_channels: channels ``C_in`` of the input.
        hidden_channels: channels of every layer's ``h`` and ``c``.
        kernel_size: int or ``(kh, kw)``, >= 1.
        num_layers: number of stacked layers.
        bias: whether the layers have ``bias_ih_l{k}`` and ``bias_hh_l{k}``.
        batch_first: input and output are ``(B, T, C, H, W)`` instead of ``(T, B, C, H, W)``.
            ``h_n`` and ``c_n`` are not affected.
        dilation: int or ``(dh, dw)``, >= 1.
        dropout: probability in ``[0, 1)`` of the dropout between layers.
        device, dtype: of the parameters.

    Parameters (nn.LSTM's names), for each layer ``k``: ``weight_ih_l{k}
    (4*hidden, C_in if k == 0 else hidden, kh, kw)``, ``weight_hh_l{k} (4*hidden, hidden, kh, kw)``,
    ``bias_ih_l{k}`` and ``bias_hh_l{k} (4*hidden,)``; gates in the order i, f, g, o.

    Example:
        >>> lstm = ConvLSTM2d(3, 8, kernel_size=3, num_layers=2, batch_first=True)
        >>> x = torch.randn(4, 10, 3, 16, 16)  # (B, T, C, H, W)
        >>> output, (h_n, c_n) = lstm(x)
        >>> output.shape, h_n.shape
        (torch.Size([4, 10, 8, 16, 16]), torch.Size([2, 4, 8, 16, 16]))
        >>> output, (h_n, c_n) = lstm(x, (h_n, c_n))  # continue the sequence
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int | Pair,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dilation: int | Pair = 1,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_channels = _check_size("input_channels", input_channels)
        self.hidden_channels = _check_size("hidden_channels", hidden_channels)
        self.kernel_size = _check_pair("kernel_size", kernel_size)
        self.num_layers = _check_size("num_layers", num_layers)
        self.bias = _check_bool("bias", bias)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.dilation = _check_pair("dilation", dilation)
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool):
            raise TypeError(f"dropout must be a float, got {type(dropout).__name__} {dropout!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout > 0 and self.num_layers == 1:
            warnings.warn(
                f"dropout={dropout} has no effect with num_layers=1: it acts between layers",
                stacklevel=2,
            )
        self.dropout = float(dropout)
        self._padding = same_padding(self.kernel_size, self.dilation)
        factory = {"device": device, "dtype": dtype}
        gates, kernel = 4 * self.hidden_channels, self.kernel_size
        for k in range(self.num_layers):
            in_k = self.input_channels if k == 0 else self.hidden_channels
            w_ih = torch.empty(gates, in_k, *kernel, **factory)
            w_hh = torch.empty(gates, self.hidden_channels, *kernel, **factory)
            setattr(self, f"weight_ih_l{k}", nn.Parameter(w_ih))
            setattr(self, f"weight_hh_l{k}", nn.Parameter(w_hh))
            if self.bias:
                setattr(self, f"bias_ih_l{k}", nn.Parameter(torch.empty(gates, **factory)))
                setattr(self, f"bias_hh_l{k}", nn.Parameter(torch.empty(gates, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from ``U(-k, k)``, ``k = 1 / sqrt(hidden_channels * kh * kw)``."""
        _init_uniform(self, self.hidden_channels, self.kernel_size)

    def layer_parameters(self, k: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """``(weight_ih, weight_hh, bias_ih, bias_hh)`` of layer ``k``; biases None if bias=False."""
        w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
        if not self.bias:
            return w_ih, w_hh, None, None
        return w_ih, w_hh, getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")

    def extra_repr(self) -> str:
        s = f"{self.input_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        return s

    def forward(self, input: Tensor, hx: HiddenState | None = None) -> tuple[Tensor, HiddenState]:
        """Run the layers over the sequence.

        Arguments:
            input: ``(T, B, C_in, H, W)``, ``(B, T, C_in, H, W)`` if batch_first, or unbatched
                ``(T, C_in, H, W)``; T >= 1.
            hx: ``(h_0, c_0)``, each ``(num_layers, B, hidden, H, W)`` (unbatched
                ``(num_layers, hidden, H, W)``); None means zeros of the input's dtype and device.

        Returns:
            ``(output, (h_n, c_n))``: ``output`` is the last layer's ``h`` at every step, laid
            out like the input with ``hidden_channels`` channels; ``h_n``, ``c_n`` are the final
            states in the layout of ``hx``.
        """
        batched_layout = "(B, T, C, H, W)" if self.batch_first else "(T, B, C, H, W)"
        layouts = {5: batched_layout, 4: "unbatched (T, C, H, W)"}
        _check_input(input, "input", layouts, self.weight_ih_l0.dtype)
        _check_channels("input", input.shape[-3], self.input_channels)
        batched = input.dim() == 5
        if not batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        steps, batch, _, height, width = x.shape  # x: (T, B, C, H, W)
        if steps == 0:
            raise ValueError(f"input has 0 time steps (shape {tuple(input.shape)}), expected >= 1")
        if hx is None:
            h_0 = c_0 = x.new_zeros(self.num_layers, batch, self.hidden_channels, height, width)
        else:
            expected = {"layers": (self.num_layers, "num_layers")}
            if batched:
                expected["batch"] = (batch, "input batch")
            expected.update(
                channels=(self.hidden_channels, "hidden_channels"),
                height=(height, "input height"),
                width=(width, "input width"),
            )
            h_0, c_0 = _check_hx(hx, expected, x)
            if not batched:
                h_0, c_0 = h_0.unsqueeze(1), c_0.unsqueeze(1)

        h_n, c_n = [], []
        for k in range(self.num_layers):
            if k > 0 and self.dropout and self.training:
                x = F.dropout(x, self.dropout, training=True)
            h, c = h_0[k], c_0[k]
            outputs = []
            # Per step conv(x_t) + conv(h): measured faster on CPU than one conv of x over all
            # T * B frames hoisted out of the loop (that output no longer fits in cache).
            for x_t in x.unbind(0):
                h, c = convlstm_step(
                    x_t, h, c, *self.layer_parameters(k), self._padding, self._padding, self.dilation
                )
                outputs.append(h)
            x = torch.stack(outputs)  # (T, B, hidden, H, W)
            h_n.append(h)
            c_n.append(c)

        hidden = (torch.stack(h_n), torch.stack(c_n))  # each (num_layers, B, hidden, H, W)
        if not batched:
            return x.squeeze(1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return (x.transpose(0, 1) if self.batch_first else x), hidden


def from_concat_conv(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor] | None = None,
    *,
    gate_order: str = "ifog",
    **convlstm_kwargs: object,
) -> ConvLSTM2d:
    """Build a :class:`ConvLSTM2d` from the single-conv layout of many ConvLSTM checkpoints.

    That layout runs, per layer, one conv over ``cat([x, h], dim=1)`` with weight
    ``(4*hidden, in + hidden, kh, kw)`` and splits its output into four gates in
    ``gate_order``. Its first ``in`` input channels become ``weight_ih_l{k}`` and the rest
    ``weight_hh_l{k}``, with the gates reordered to i, f, g, o. Its single bias becomes
    ``bias_ih_l{k}`` and ``bias_hh_l{k}`` is zero; without biases the module has ``bias=False``.
    The result equals the single-conv model up to float rounding (two convs summed instead
    of one).

    Arguments:
        weights: one ``(4*hidden, in_k + hidden, kh, kw)`` tensor per layer, where ``in_k`` is
            the input's channels for layer 0 and ``hidden`` after.
        biases: None, or one ``(4*hidden,)`` tensor per layer.
        gate_order: the order of the gates in the checkpoint, a permutation of ``"ifgo"``.
            It is not in the weights, and a wrong order still runs (silently other results):
            check the code that trained the checkpoint. The widely used ConvLSTM_pytorch
            (``torch.split(combined_conv, hidden_dim, dim=1)`` into ``cc_i, cc_f, cc_o, cc_g``)
            is ``"ifog"``, the default; Flax's and Haiku's ConvLSTM split ``"igfo"`` (and add 1
            to the forget gate, which this function does not undo); torch.nn.LSTM's own order
            is ``"ifgo"``.
        convlstm_kwargs: other ConvLSTM2d arguments (``batch_first``, ``dilation``, ``dropout``,
            ``device``, ``dtype``); ``input_channels``, ``hidden_channels``, ``kernel_size``,
            ``num_layers`` and ``bias`` come from the tensors. ``device`` and ``dtype`` default
            to those of ``weights[0]``.

    Returns:
        The ConvLSTM2d holding the converted parameters.

    Example:
        >>> w = [torch.randn(32, 3 + 8, 3, 3), torch.randn(32, 8 + 8, 3, 3)]
        >>> lstm = from_concat_conv(w, gate_order="ifog", batch_first=True)
        >>> lstm.input_channels, lstm.hidden_channels, lstm.num_layers
        (3, 8, 2)
    """
    if not isinstance(gate_order, str) or sorted(gate_order) != sorted(GATES):
        raise ValueError(f"gate_order must be a permutation of 'ifgo', got {gate_order!r}")
    inferred = {"input_channels", "hidden_channels", "kernel_size", "num_layers", "bias"}
    if inferred & convlstm_kwargs.keys():
        raise TypeError(
            f"from_concat_conv infers {sorted(inferred)} from the tensors; "
            f"got {sorted(inferred & convlstm_kwargs.keys())}"
        )
    if isinstance(weights, Tensor) or not isinstance(weights, Sequence) or not weights:
        raise TypeError(f"weights must be a non-empty list of tensors, got {type(weights).__name__}")
    for k, w in enumerate(weights):
        if not isinstance(w, Tensor):
            raise TypeError(f"weights[{k}] must be a tensor, got {type(w).__name__}")
        if w.dim() != 4:
            raise ValueError(
                f"weights[{k}] must be 4-D (4*hidden, in + hidden, kh, kw), got shape {tuple(w.shape)}"
            )
    gates, total_0, kh, kw = weights[0].shape
    hidden = gates // 4
    input_channels = total_0 - hidden
    if gates % 4 or hidden == 0 or input_channels < 1:
        raise ValueError(
            f"weights[0] has shape {tuple(weights[0].shape)}, expected (4*hidden, in + hidden, kh, kw) "
            "with hidden >= 1 and in >= 1"
        )
    for k, w in enumerate(weights):
        expected = (gates, (input_channels if k == 0 else hidden) + hidden, kh, kw)
        if tuple(w.shape) != expected:
            raise ValueError(
                f"weights[{k}] has shape {tuple(w.shape)}, expected {expected} "
                "(4*hidden, in + hidden, kh, kw) from weights[0]"
            )
    if biases is not None:
        if isinstance(biases, Tensor) or not isinstance(biases, Sequence):
            raise TypeError(f"biases must be None or a list of tensors, got {type(biases).__name__}")
        if len(biases) != len(weights):
            raise ValueError(f"biases has {len(biases)} entries, expected {len(weights)} (one per weight)")
        for k, b in enumerate(biases):
            if not isinstance(b, Tensor):
                raise TypeError(f"biases[{k}] must be a tensor, got {type(b).__name__}")
            if tuple(b.shape) != (gates,):
                raise ValueError(f"biases[{k}] has shape {tuple(b.shape)}, expected ({gates},) (4*hidden,)")

    convlstm_kwargs.setdefault("device", weights[0].device)
    convlstm_kwargs.setdefault("dtype", weights[0].dtype)
    module = ConvLSTM2d(
        input_channels, hidden, (kh, kw), num_layers=len(weights), bias=biases is not None,
        **convlstm_kwargs,
    )  # fmt: skip
    # Index of each of i, f, g, o among the checkpoint's gate blocks.
    order = [gate_order.index(gate) for gate in GATES]

    def reorder(t: Tensor) -> Tensor:
        blocks = t.chunk(4, dim=0)
        return torch.cat([blocks[j] for j in order])

    with torch.no_grad():
        for k, w in enumerate(weights):
            w_ih, w_hh, b_ih, b_hh = module.layer_parameters(k)
            in_k = w.shape[1] - hidden
            w_ih.copy_(reorder(w[:, :in_k]))
            w_hh.copy_(reorder(w[:, in_k:]))
            if biases is not None:
                b_ih.copy_(reorder(biases[k]))
                b_hh.zero_()
    return module
