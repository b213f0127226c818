"""Stateful recurrent modules: the state of one call carries over to the next.

:class:`StatefulWrapper` wraps any ``module(x, state) -> (y, state)`` of the supported kinds
(nn.LSTM, nn.GRU, nn.RNN, :class:`~torch_impl.ConvLSTM2d`) and keeps the returned state for the
next call, so a long sequence can be fed in chunks (streaming inference, truncated BPTT).
:class:`StatefulLSTM`, :class:`StatefulGRU`, :class:`StatefulRNN` and :class:`StatefulConvLSTM`
are the same wrapper around a module it builds. The state logic exists once, in StatefulWrapper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

from .convlstm import ConvLSTM2d, Pair, _check_bool

__all__ = ["StatefulConvLSTM", "StatefulGRU", "StatefulLSTM", "StatefulRNN", "StatefulWrapper"]

# What the wrapped module takes and returns: (h, c) for LSTMs, h for nn.GRU and nn.RNN.
State = Union[Tensor, tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class _Layout:
    """How a wrapped module lays out its input and its state, read from its attributes.

    Every state tensor is ``(layers, [batch,] features, *spatial)``; the batch dim is absent
    for unbatched input, and spatial is ``(H, W)`` of the input for ConvLSTM2d.
    """

    kind: str  # the module's class name, for messages
    names: tuple[str, ...]  # ("h", "c") or ("h",)
    layers: int
    layers_source: str
    features: tuple[int, ...]  # one per state tensor (an LSTM's h has proj_size if set)
    feature_sources: tuple[str, ...]
    feature_word: str  # "features" or "channels"
    spatial_rank: int
    input_rank: int  # of batched input; unbatched input has one dim less
    batch_first: bool

    @property
    def pair(self) -> bool:
        return len(self.names) == 2

    def state_shapes(self, x: Tensor) -> tuple[tuple[int, ...], ...]:
        """Shapes of the state tensors that go with input ``x``."""
        if x.dim() not in (self.input_rank, self.input_rank - 1):
            raise ValueError(
                f"input to {self.kind} must be {self.input_rank}-D (batched) or "
                f"{self.input_rank - 1}-D (unbatched), got {x.dim()}-D shape {tuple(x.shape)}"
            )
        batch = ()
        if x.dim() == self.input_rank:
            batch = (x.shape[0 if self.batch_first else 1],)
        spatial = tuple(x.shape[x.dim() - self.spatial_rank :])
        return tuple((self.layers, *batch, f, *spatial) for f in self.features)

    def batch_of(self, shape: Sequence[int]) -> int | None:
        """Batch size of a state tensor's shape; None if it is unbatched."""
        return shape[1] if len(shape) == 3 + self.spatial_rank else None

    def check_carried(self, state: tuple[Tensor, ...], expected: tuple[tuple[int, ...], ...]) -> None:
        """Raise if the carried state does not fit the input (``expected`` from state_shapes)."""
        got = tuple(tuple(t.shape) for t in state)
        if got == expected:
            return
        want_batch, have_batch = self.batch_of(expected[0]), self.batch_of(got[0])
        if want_batch is None and have_batch is not None:
            problem = f"input is unbatched but the carried state has batch {have_batch}"
        elif want_batch is not None and have_batch is None:
            problem = f"input batch {want_batch} differs from the carried state, which is unbatched"
        elif want_batch != have_batch:
            problem = f"input batch {want_batch} differs from the carried state's batch {have_batch}"
        elif self.spatial_rank and expected[0][-2:] != got[0][-2:]:
            problem = (
                f"input spatial size {expected[0][-2:]} differs from the carried state's "
                f"{got[0][-2:]}"
            )
        else:
            problem = f"carried state shapes {got} differ from {expected}, expected for this input"
        raise ValueError(f"{problem}; call reset_states() first")

    def validate(self, state: object) -> tuple[Tensor, ...]:
        """Check a state given by the user against this layout; return it as a tuple."""
        if self.pair:
            if not (
                isinstance(state, (tuple, list))
                and len(state) == 2
                and all(isinstance(t, Tensor) for t in state)
            ):
                raise TypeError(
                    f"state of {self.kind} must be None or a pair (h, c) of tensors, "
                    f"got {type(state).__name__}"
                )
            parts = tuple(state)
        else:
            if not isinstance(state, Tensor):
                raise TypeError(
                    f"state of {self.kind} must be None or a tensor h, got {type(state).__name__}"
                )
            parts = (state,)
        batched_rank = 3 + self.spatial_rank
        layout = f"(layers, batch, {self.feature_word}" + ", H, W" * (self.spatial_rank > 0) + ")"
        first = parts[0]
        for name, t, size, source in zip(self.names, parts, self.features, self.feature_sources):
            if not t.is_floating_point():
                raise TypeError(f"state {name} must be a floating-point tensor, got dtype {t.dtype}")
            if t.dim() not in (batched_rank, batched_rank - 1):
                raise ValueError(
                    f"state {name} must be {batched_rank}-D {layout} or {batched_rank - 1}-D "
                    f"unbatched, got {t.dim()}-D shape {tuple(t.shape)}"
                )
            if t.dim() != first.dim():
                raise ValueError(
                    f"state {name} is {t.dim()}-D, expected {first.dim()}-D like state h"
                )
            if t.shape[0] != self.layers:
                raise ValueError(
                    f"state {name} has {t.shape[0]} layers, expected {self.layers} ({self.layers_source})"
                )
            feature_dim = 1 if self.batch_of(t.shape) is None else 2
            if t.shape[feature_dim] != size:
                raise ValueError(
                    f"state {name} has {t.shape[feature_dim]} {self.feature_word}, "
                    f"expected {size} ({source})"
                )
            if t.dtype != first.dtype:
                raise TypeError(f"state {name} has dtype {t.dtype}, expected {first.dtype} like state h")
            if self.batch_of(t.shape) != self.batch_of(first.shape):
                raise ValueError(
                    f"state {name} has batch {self.batch_of(t.shape)}, expected "
                    f"{self.batch_of(first.shape)} like state h"
                )
            if t.shape[feature_dim + 1 :] != first.shape[feature_dim + 1 :]:
                raise ValueError(
                    f"state {name} has spatial size {tuple(t.shape[feature_dim + 1 :])}, expected "
                    f"{tuple(first.shape[feature_dim + 1 :])} like state h"
                )
        return parts


def _layout(module: nn.Module) -> _Layout:
    kind = type(module).__name__
    if isinstance(module, ConvLSTM2d):
        hidden = module.hidden_channels
        return _Layout(
            kind, ("h", "c"), module.num_layers, "num_layers", (hidden, hidden),
            ("hidden_channels", "hidden_channels"), "channels", 2, 5, module.batch_first,
        )  # fmt: skip
    if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        directions = 2 if module.bidirectional else 1
        layers, source = module.num_layers * directions, "num_layers * num_directions"
        hidden = module.hidden_size
        if isinstance(module, nn.LSTM):
            # With a projection, h has proj_size features and c keeps hidden_size.
            h_size, h_source = (module.proj_size, "proj_size") if module.proj_size else (hidden, "hidden_size")
            return _Layout(
                kind, ("h", "c"), layers, source, (h_size, hidden), (h_source, "hidden_size"),
                "features", 0, 3, module.batch_first,
            )  # fmt: skip
        return _Layout(
            kind, ("h",), layers, source, (hidden,), ("hidden_size",), "features", 0, 3,
            module.batch_first,
        )  # fmt: skip
    raise TypeError(
        f"StatefulWrapper supports nn.LSTM, nn.GRU, nn.RNN and ConvLSTM2d, got {kind}"
    )


def _check_input_fits(module: nn.Module, x: Tensor) -> None:
    """ValueError/TypeError where nn.LSTM/GRU/RNN would raise RuntimeError on ``x``.

    ConvLSTM2d checks its input itself. Under autocast the dtypes legitimately differ.
    """
    if not isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        return
    if x.shape[-1] != module.input_size:
        raise ValueError(
            f"input has {x.shape[-1]} features, expected {module.input_size} (input_size)"
        )
    weight = module.weight_ih_l0
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"input has dtype {x.dtype}, expected {weight.dtype} (the parameters' dtype)"
        )


def _detach(state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.detach() for t in state)


class StatefulWrapper(nn.Module):
    """Carry a recurrent module's state from one call to the next.

    ``forward(x)`` runs ``module(x, state)`` and keeps the returned state for the next call;
    the first call (and the first after :meth:`reset_states`) starts from zeros of the input's
    dtype and device, shaped from the module's attributes (num_layers, bidirectional,
    proj_size, hidden size, and for ConvLSTM2d the input's spatial size). The module's
    ``batch_first`` says where the batch of ``x`` is; unbatched input (nn.LSTM 2-D, ConvLSTM2d
    4-D) carries a state without a batch dim. The state follows the input: it is moved and cast
    to the input's device and dtype on each call.

    With ``detach=True`` (default) the state is detached at every call boundary: gradients stop
    at the start of each chunk (truncated BPTT), so ``loss.backward()`` works once per chunk.
    With ``detach=False`` the graph runs through every chunk since the last reset (full BPTT;
    call :meth:`detach_states` to cut it).

    The carried state is a plain attribute, not a buffer: it is not part of ``state_dict()``,
    and ``.to()`` does not move it (the next input does). Use :meth:`get_state` and
    :meth:`set_state` to save or restore it.

    Arguments:
        module: an nn.LSTM, nn.GRU, nn.RNN or ConvLSTM2d (``module(x, state) -> (y, state)``).
        detach: detach the state between calls (truncated BPTT).

    Example:
        >>> stream = StatefulWrapper(nn.GRU(10, 20, batch_first=True))
        >>> y1 = stream(torch.randn(5, 30, 10))  # (B, T, F) -> (5, 30, 20)
        >>> y2 = stream(torch.randn(5, 30, 10))  # continues from the state left by the first call
        >>> stream.reset_states(torch.tensor([True, False, False, False, False]))  # restart row 0
        >>> stream.reset_states()  # forget everything
    """

    def __init__(self, module: nn.Module, detach: bool = True) -> None:
        super().__init__()
        _layout(module)  # reject unsupported modules now rather than at the first call
        self.module = module
        self.detach = _check_bool("detach", detach)
        self._state: tuple[Tensor, ...] | None = None

    @property
    def state(self) -> State | None:
        """The carried state in the module's form: ``(h, c)``, ``h`` (GRU, RNN) or None."""
        if self._state is None or _layout(self.module).pair:
            return self._state
        return self._state[0]

    @state.setter
    def state(self, state: State | None) -> None:
        self.set_state(state)

    def get_state(self) -> State | None:
        """Return the carried state (see :attr:`state`); None before the first call."""
        return self.state

    def set_state(self, state: State | None) -> None:
        """Replace the carried state after checking it against the module's layout.

        Arguments:
            state: None (start from zeros), ``(h, c)`` for LSTMs or ``h`` for GRU/RNN, each
                ``(layers, B, features[, H, W])`` or unbatched ``(layers, features[, H, W])``.
                Detached if ``detach`` is set.
        """
        if state is None:
            self._state = None
            return
        parts = _layout(self.module).validate(state)
        self._state = _detach(parts) if self.detach else parts

    def reset_states(self, mask: Tensor | Sequence[bool] | None = None) -> None:
        """Zero the carried state, all of it or only some batch rows.

        Arguments:
            mask: None to drop the state (the next call starts from zeros, at any batch
                size), or a bool ``(B,)`` tensor, list or array: rows where it is True are
                zeroed, the others kept. The batch is dim 1 of every state tensor. With no
                state held this changes nothing: every row starts from zeros anyway.
        """
        if mask is None:
            self._state = None
            return
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"reset mask must have dtype torch.bool, got {mask.dtype}")
        if mask.dim() != 1:
            raise ValueError(f"reset mask must be 1-D (batch,), got shape {tuple(mask.shape)}")
        if self._state is None:
            return  # nothing carried: every row already starts from zeros
        layout = _layout(self.module)
        batch = layout.batch_of(self._state[0].shape)
        if batch is None:
            raise ValueError(
                f"reset mask needs a batched state, but the carried state is unbatched "
                f"(h has shape {tuple(self._state[0].shape)})"
            )
        if mask.numel() != batch:
            raise ValueError(
                f"reset mask has length {mask.numel()}, expected {batch} (the carried state's batch)"
            )
        rows = mask.to(self._state[0].device).view(1, batch, *[1] * (self._state[0].dim() - 2))
        # Out of place, so a graph kept with detach=False stays valid.
        self._state = tuple(t.masked_fill(rows, 0) for t in self._state)

    def detach_states(self) -> None:
        """Cut the graph behind the carried state (keeps its values)."""
        if self._state is not None:
            self._state = _detach(self._state)

    def forward(self, x: Tensor) -> Tensor:
        """Run the module on ``x`` from the carried state and keep the state it returns.

        Arguments:
            x: the module's input, e.g. ``(B, T, F)`` for a batch_first nn.LSTM or
                ``(B, T, C, H, W)`` for a batch_first ConvLSTM2d.

        Returns:
            The module's output for ``x``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got dtype {x.dtype}")
        layout = _layout(self.module)
        shapes = layout.state_shapes(x)
        _check_input_fits(self.module, x)
        if self._state is None:
            state = tuple(x.new_zeros(shape) for shape in shapes)
        else:
            layout.check_carried(self._state, shapes)
            state = tuple(t.to(device=x.device, dtype=x.dtype) for t in self._state)
        output, new_state = self.module(x, state if layout.pair else state[0])
        new = tuple(new_state) if layout.pair else (new_state,)
        self._state = _detach(new) if self.detach else new
        return output

    def extra_repr(self) -> str:
        if self._state is None:
            held = "None"
        else:
            names = _layout(self.module).names
            held = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, self._state))
        return f"detach={self.detach}, state={held}"


class _StatefulTorchRNN(StatefulWrapper):
    """Builds its torch module (``_module_class``: nn.LSTM, nn.GRU, nn.RNN) from torch's
    leading arguments; ``batch_first`` defaults to True here."""

    _module_class: type[nn.Module]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        detach: bool = True,
        **module_kwargs: object,
    ) -> None:
        module = self._module_class(
            input_size, hidden_size, num_layers, batch_first=batch_first, **module_kwargs
        )
        super().__init__(module, detach=detach)


class StatefulLSTM(_StatefulTorchRNN):
    """An nn.LSTM (``.lstm``) that carries its state (h, c) across calls.

    See :class:`StatefulWrapper` for the state handling. ``batch_first`` defaults to True.

    Arguments:
        input_size, hidden_size, num_layers, batch_first: as nn.LSTM.
        detach: detach the state between calls (truncated BPTT).
        lstm_kwargs: other nn.LSTM arguments (bias, dropout, bidirectional, proj_size, ...).

    Example:
        >>> lstm = StatefulLSTM(10, 20, num_layers=2)
        >>> y = lstm(torch.randn(5, 30, 10))  # (5, 30, 20); lstm.state: each (2, 5, 20)
        >>> y = lstm(torch.randn(5, 30, 10))  # the same sequences, continued
    """

    _module_class = nn.LSTM

    @property
    def lstm(self) -> nn.LSTM:
        """The wrapped nn.LSTM (the same object as ``.module``)."""
        return self.module


class StatefulGRU(_StatefulTorchRNN):
    """An nn.GRU (``.gru``) that carries its state h across calls.

    See :class:`StatefulWrapper` for the state handling: the state is one tensor
    ``(num_layers * num_directions, B, hidden_size)``, or ``(num_layers * num_directions,
    hidden_size)`` for unbatched input. ``batch_first`` defaults to True.

    Arguments:
        input_size, hidden_size, num_layers, batch_first: as nn.GRU.
        detach: detach the state between calls (truncated BPTT).
        gru_kwargs: other nn.GRU arguments (bias, dropout, bidirectional, device, dtype).

    Example:
        >>> import torch
        >>> from torch_impl import StatefulGRU
        >>> gru = StatefulGRU(8, 16, num_layers=2)
        >>> y = gru(torch.randn(4, 10, 8))  # the state is kept ...
        >>> y = gru(torch.randn(4, 10, 8))  # ... and the same sequences continue
        >>> tuple(y.shape), tuple(gru.state.shape)
        ((4, 10, 16), (2, 4, 16))
        >>> gru.reset_states(torch.tensor([True, False, False, False]))  # row 0 starts anew
    """

    _module_class = nn.GRU

    @property
    def gru(self) -> nn.GRU:
        """The wrapped nn.GRU (the same object as ``.module``)."""
        return self.module


class StatefulRNN(_StatefulTorchRNN):
    """An Elman nn.RNN (``.rnn``) that carries its state h across calls: as
    :class:`StatefulGRU` (one state tensor), with nn.RNN's ``nonlinearity``.

    Arguments:
        input_size, hidden_size, num_layers, nonlinearity: as nn.RNN (``"tanh"`` or
            ``"relu"``).
        kwargs: ``batch_first`` (default True), ``detach`` (detach the state between calls:
            truncated BPTT; default True) and other nn.RNN arguments (bias, dropout,
            bidirectional, device, dtype), by keyword.

    Example:
        >>> import torch
        >>> from torch_impl import StatefulRNN
        >>> rnn = StatefulRNN(8, 16, nonlinearity="relu")
        >>> y = rnn(torch.randn(4, 10, 8))
        >>> y = rnn(torch.randn(4, 10, 8))  # continues from the state left by the first call
        >>> tuple(y.shape), tuple(rnn.state.shape)
        ((4, 10, 16), (1, 4, 16))
        >>> rnn.reset_states()  # the next call starts from zeros
    """

    _module_class = nn.RNN

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", **kwargs: object) -> None:
        # nn.RNN rejects other values too, but in its own words, which vary across releases.
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, **kwargs)

    @property
    def rnn(self) -> nn.RNN:
        """The wrapped nn.RNN (the same object as ``.module``)."""
        return self.module


class StatefulConvLSTM(StatefulWrapper):
    """A :class:`ConvLSTM2d` (``.convlstm``) that carries its state (h, c) across calls.

    See :class:`StatefulWrapper` for the state handling. ``batch_first`` defaults to True.

    Arguments:
        input_channels, hidden_channels, kernel_size, num_layers, batch_first: as ConvLSTM2d.
        detach: detach the state between calls (truncated BPTT).
        convlstm_kwargs: other ConvLSTM2d arguments (bias, dilation, dropout, device, dtype).

    Example:
        >>> conv = StatefulConvLSTM(3, 16, 3, num_layers=2)
        >>> y = conv(torch.randn(4, 5, 3, 16, 16))  # (4, 5, 16, 16, 16)
        >>> y = conv(torch.randn(4, 5, 3, 16, 16))  # continued
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int | Pair,
        num_layers: int = 1,
        batch_first: bool = True,
        detach: bool = True,
        **convlstm_kwargs: object,
    ) -> None:
        convlstm = ConvLSTM2d(
            input_channels, hidden_channels, kernel_size, num_layers=num_layers,
            batch_first=batch_first, **convlstm_kwargs,
        )  # fmt: skip
        super().__init__(convlstm, detach=detach)

    @property
    def convlstm(self) -> ConvLSTM2d:
        """The wrapped ConvLSTM2d (the same object as ``.module``)."""
        return self.module
