"""Inter-layer dropout made reproducible on both sides: keep masks drawn once, the torch module
run layer by layer with them.

torch's fused nn.LSTM / nn.GRU / nn.RNN kernels draw their own inter-layer dropout masks and
cannot take given ones, so with masks the torch side runs layer by layer: single-layer modules
sharing the original Parameters (gradients land on the original names), ``y * keep / (1 - p)``
between layers, F.dropout's formula.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import torch

import torch_impl

__all__ = ["split_layers", "draw_dropout_masks", "masked_forward"]

_RNN_CLASSES = (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)


def split_layers(module: torch.nn.RNNBase) -> list[torch.nn.RNNBase]:
    """One single-layer module per layer of an nn.LSTM / nn.GRU / nn.RNN, sharing its Parameters.

    Arguments:
        module: any nn.LSTM, nn.GRU or nn.RNN (bidirectional, proj_size, bias, batch_first,
            nonlinearity are kept).

    Returns:
        ``num_layers`` modules of the same class; layer ``k``'s ``weight_ih_l0[_reverse]`` *is*
        ``module.weight_ih_l{k}[_reverse]`` (and so on), so backward through them fills
        ``module``'s own ``.grad``s.

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, batch_first=True)
        >>> first, second = split_layers(lstm)
        >>> y, _ = second(first(torch.randn(2, 5, 3))[0])   # == lstm(x) in eval mode
        >>> first.weight_ih_l0 is lstm.weight_ih_l0
        True
    """
    if not isinstance(module, _RNN_CLASSES):
        raise TypeError(f"split_layers needs an nn.LSTM, nn.GRU or nn.RNN, got {type(module).__name__}")
    directions = 2 if module.bidirectional else 1
    out_size = module.proj_size or module.hidden_size
    options = dict(bias=module.bias, batch_first=module.batch_first,
                   bidirectional=module.bidirectional, device="meta",
                   dtype=module.weight_ih_l0.dtype)
    if isinstance(module, torch.nn.LSTM):
        options["proj_size"] = module.proj_size
    if isinstance(module, torch.nn.RNN):
        options["nonlinearity"] = module.nonlinearity
    layers = []
    for k in range(module.num_layers):
        in_size = module.input_size if k == 0 else directions * out_size
        # meta: no memory, no init; every parameter is replaced below
        layer = type(module)(in_size, module.hidden_size, 1, **options)
        for name in [n for n, _ in layer.named_parameters()]:
            # RNNBase.__setattr__ keeps its flat weight list in step with the new Parameter
            setattr(layer, name, getattr(module, name.replace("_l0", f"_l{k}")))
        layers.append(layer)
    return layers


def draw_dropout_masks(
    torch_module: torch.nn.Module, x: torch.Tensor, generator: Optional[torch.Generator] = None
) -> list[torch.Tensor]:
    """Random inter-layer keep masks (bool, P(keep) = 1 - dropout) for ``torch_module`` on ``x``.

    Arguments:
        torch_module: an nn.LSTM, nn.GRU, nn.RNN or torch_impl.ConvLSTM2d with
            ``num_layers > 1``.
        x: its input, torch layout.
        generator: torch random generator (None: the global one).

    Returns:
        ``num_layers - 1`` bool tensors, each shaped like a layer's output in the input's
        layout: ``(B, T, D*H_out)`` (batch_first nn.LSTM), ``(B, T, hidden, H, W)`` (ConvLSTM2d).

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=3, dropout=0.5, batch_first=True)
        >>> [m.shape for m in draw_dropout_masks(lstm, torch.randn(2, 5, 3))]
        [torch.Size([2, 5, 4]), torch.Size([2, 5, 4])]
    """
    shape = _layer_output_shape(torch_module, x)
    keep = torch.full(shape, 1.0 - torch_module.dropout, dtype=torch.float64)
    return [torch.bernoulli(keep, generator=generator).bool()
            for _ in range(torch_module.num_layers - 1)]


def masked_forward(
    torch_module: torch.nn.Module,
    x: torch.Tensor,
    state: Optional[tuple] = None,
    masks: Optional[Sequence[torch.Tensor]] = None,
    lengths: Any = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``torch_module(x, state)`` computed layer by layer, with given inter-layer dropout masks.

    Arguments:
        torch_module: an nn.LSTM, nn.GRU, nn.RNN or torch_impl.ConvLSTM2d.
        x: input in the module's layout (batched or unbatched).
        state: ``(h_0, c_0)`` (or ``h_0``) in the module's layout, or None for zeros.
        masks: ``num_layers - 1`` keep masks shaped like each layer's output (see
            ``draw_dropout_masks``); layer ``k + 1`` reads ``y_k * keep_k / (1 - p)``, F.dropout's
            formula. None: no dropout (eval mode).
        lengths: ``(B,)`` valid lengths (not for the ConvLSTM2d): each layer runs a packed
            sequence.

    Returns:
        ``(output, state)`` like the module's own forward.

    Example:
        >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5)
        >>> x = torch.randn(5, 2, 3)
        >>> y, (h, c) = masked_forward(lstm, x, None, draw_dropout_masks(lstm, x))
    """
    masks = _check_masks(torch_module, x, masks)
    if isinstance(torch_module, _RNN_CLASSES):
        return _masked_rnn(torch_module, x, state, masks, lengths)
    if isinstance(torch_module, torch_impl.ConvLSTM2d):
        if lengths is not None:
            raise ValueError("lengths are not supported for a ConvLSTM2d")
        return _masked_convlstm(torch_module, x, state, masks)
    raise TypeError(
        "masked_forward needs an nn.LSTM, nn.GRU, nn.RNN or torch_impl.ConvLSTM2d, got "
        f"{type(torch_module).__name__}"
    )


def _dropped(y: torch.Tensor, keep: torch.Tensor, rate: float) -> torch.Tensor:
    # F.dropout's order: the mask is scaled first (keep / (1 - p)), then multiplied in
    return y * (keep.to(y.dtype) / (1.0 - rate))


def _layer_output_shape(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """Shape of one layer's output (input layout) for input ``x``."""
    if isinstance(module, _RNN_CLASSES):
        features = (2 if module.bidirectional else 1) * (module.proj_size or module.hidden_size)
        return tuple(x.shape[:-1]) + (features,)
    if isinstance(module, torch_impl.ConvLSTM2d):
        return tuple(x.shape[:-3]) + (module.hidden_channels,) + tuple(x.shape[-2:])
    raise TypeError(
        "dropout masks need an nn.LSTM, nn.GRU, nn.RNN or torch_impl.ConvLSTM2d, got "
        f"{type(module).__name__}"
    )


def _check_masks(module, x, masks) -> Optional[list]:
    if masks is None:
        return None
    expected = _layer_output_shape(module, x)
    if isinstance(masks, torch.Tensor) or not isinstance(masks, (list, tuple)):
        raise TypeError(f"dropout masks must be a list of tensors, got {type(masks).__name__}")
    if len(masks) != module.num_layers - 1:
        raise ValueError(
            f"dropout masks has {len(masks)} entries, expected {module.num_layers - 1} "
            f"(num_layers - 1: one per gap between layers)"
        )
    checked = []
    for k, mask in enumerate(masks):
        mask = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"dropout mask {k} has shape {tuple(mask.shape)}, expected {expected} "
                f"(layer {k}'s output for this input)"
            )
        checked.append(mask)
    return checked


def _masked_rnn(module, x, state, masks, lengths):
    directions = 2 if module.bidirectional else 1
    states = None if state is None else (state if isinstance(state, tuple) else (state,))
    finals = []
    for k, layer in enumerate(split_layers(module)):
        if k > 0 and masks is not None:
            x = _dropped(x, masks[k - 1], module.dropout)
        rows = slice(k * directions, (k + 1) * directions)
        hx = None if states is None else tuple(s[rows] for s in states)
        hx = hx[0] if hx is not None and len(hx) == 1 else hx
        if lengths is None:
            x, final = layer(x, hx)
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                x, torch.as_tensor(lengths).cpu(), batch_first=module.batch_first,
                enforce_sorted=False,
            )
            y, final = layer(packed, hx)
            # padded positions come back as zeros, and zero * keep stays zero
            x, _ = torch.nn.utils.rnn.pad_packed_sequence(
                y, batch_first=module.batch_first,
                total_length=x.shape[1 if module.batch_first else 0],
            )
        finals.append(final if isinstance(final, tuple) else (final,))
    joined = tuple(torch.cat(parts, 0) for parts in zip(*finals))
    return x, (joined if len(joined) == 2 else joined[0])


def _masked_convlstm(module, x, state, masks):
    from torch_impl.convlstm import same_padding  # the module's own padding rule

    batched = x.dim() == 5

    def time_major(t):  # -> (T, B, ...)
        if not batched:
            return t.unsqueeze(1)
        return t.transpose(0, 1) if module.batch_first else t

    xs = time_major(x)
    steps, batch, _, height, width = xs.shape
    if state is None:
        zeros = xs.new_zeros(module.num_layers, batch, module.hidden_channels, height, width)
        h0, c0 = zeros, zeros
    else:
        h0, c0 = (s.unsqueeze(1) if not batched else s for s in state)
    padding = same_padding(module.kernel_size, module.dilation)
    final_h, final_c = [], []
    for k in range(module.num_layers):
        if k > 0 and masks is not None:
            xs = _dropped(xs, time_major(masks[k - 1]), module.dropout)
        h, c, outputs = h0[k], c0[k], []
        for x_t in xs.unbind(0):
            h, c = torch_impl.convlstm_step(
                x_t, h, c, *module.layer_parameters(k), padding, padding, module.dilation
            )
            outputs.append(h)
        xs = torch.stack(outputs)
        final_h.append(h)
        final_c.append(c)
    h_n, c_n = torch.stack(final_h), torch.stack(final_c)
    if not batched:
        return xs.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    return (xs.transpose(0, 1) if module.batch_first else xs), (h_n, c_n)


def resolve_dropout_masks(spec, module, x, masks, jax_masks, generator):
    """``(torch masks, JAX-side masks)`` (torch layout, checked) or ``(None, None)``."""
    if masks is None:
        if jax_masks is not None:
            raise ValueError("jax_dropout_masks needs dropout_masks for the torch side too")
        return None, None
    if spec.is_cell or not getattr(module, "dropout", 0.0):
        raise ValueError(
            "dropout_masks needs an nn.LSTM, nn.GRU, nn.RNN or ConvLSTM2d with dropout > 0, "
            f"got {type(module).__name__}({module.extra_repr()})"
        )
    if module.num_layers < 2:
        raise ValueError("dropout_masks needs num_layers >= 2 (dropout acts between layers), got 1")
    if isinstance(masks, str):
        if masks != "random":
            raise ValueError(f'dropout_masks must be a list of masks, "random" or None, got {masks!r}')
        masks = draw_dropout_masks(module, x, generator)
    masks = _check_masks(module, x, masks)
    jax_masks = masks if jax_masks is None else _check_masks(module, x, jax_masks)
    return masks, jax_masks


def masks_to_jax(spec, masks) -> Optional[list]:
    if masks is None:
        return None
    return [jnp.asarray(np.ascontiguousarray(spec.activation.to_jax(m.numpy()))) for m in masks]


def narrow_masks(masks, time_axis: int, start: int, length: int) -> Optional[list]:
    return None if masks is None else [m.narrow(time_axis, start, length) for m in masks]


@contextlib.contextmanager
def deterministic_unless_masked(module: torch.nn.Module, masks) -> Iterator[None]:
    """Without masks the torch module runs in eval mode (no random dropout: JAX's default is
    deterministic); the module's own mode is restored after."""
    training = module.training
    if masks is None and getattr(module, "dropout", 0.0):
        module.eval()
    try:
        yield
    finally:
        module.train(training)
