"""Flax Linen modules with torch.nn.LSTM's semantics: ``LSTM`` and ``ConvLSTM``.

The modules hold parameters and check shapes (at trace time); the math is in ``cells`` and the
time loop in ``scan``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from .cells import (
    Carry,
    Cell,
    PrecisionLike,
    as_pair,
    cast_weights,
    check_int,
    check_lstm_sizes,
    computation_dtype,
    convlstm_cell,
    declare_convlstm_weights,
    declare_lstm_weights,
    lstm_cell,
)
from .scan import Step, run_stack_jit
from .sharding import BatchAxis, MeshLike, check_batch, resolve_mesh, run_stack_sharded

Array = jax.Array


# ------------------------------------------------------------------------------ input checks


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


def check_carry(carry, expected: tuple[tuple[int, ...], tuple[int, ...]], names: str) -> Carry:
    """Checks ``carry = (h, c)`` against the expected shapes; never broadcasts."""
    if not isinstance(carry, (tuple, list)) or len(carry) != 2:
        raise TypeError(f"carry must be a pair (h, c), got {type(carry).__name__}")
    for name, array, shape in zip(("h", "c"), carry, expected):
        if not hasattr(array, "shape"):
            raise TypeError(f"carry {name} must be an array, got {type(array).__name__}")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"carry {name} has shape {tuple(array.shape)}, expected {tuple(shape)} "
                f"({names})"
            )
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"carry {name} has dtype {array.dtype}, expected a floating dtype")
    return jnp.asarray(carry[0]), jnp.asarray(carry[1])


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


class _Layout:
    """Moves a sequence between the user's layout and the drivers' time-major batched one."""

    def __init__(self, x: Array, time_major: bool, feature_rank: int):
        self.batched = x.ndim == 2 + feature_rank
        self.time_major = time_major
        if self.batched:
            self.num_steps = x.shape[0] if time_major else x.shape[1]
            self.batch: Optional[int] = x.shape[1] if time_major else x.shape[0]
        else:
            self.num_steps, self.batch = x.shape[0], None

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

    def carry_in(self, carry: Carry) -> Carry:  # -> (L*D, B, ...)
        return carry if self.batched else tuple(a[:, None] for a in carry)

    def carry_out(self, carry: Carry) -> Carry:
        return carry if self.batched else tuple(a[:, 0] for a in carry)


def _keep_mask(
    module: nn.Module, masks, layer: int, shape: tuple[int, ...], layout: _Layout
) -> Array:
    """Layer ``layer``'s full-batch keep mask ``(T, B, ...)``, drawn (or taken) before the batch
    is split, so a mesh run equals the one-device run with its rng."""
    if masks is None:
        return jax.random.bernoulli(module.make_rng("dropout"), 1.0 - module.dropout, shape)
    if len(masks) != module.num_layers - 1:
        raise ValueError(
            f"dropout_masks has {len(masks)} masks, expected {module.num_layers - 1} "
            f"(one per gap between the {module.num_layers} layers)"
        )
    keep = layout.sequence_in(jnp.asarray(masks[layer]))
    if keep.shape != shape:
        expected = shape if layout.time_major else (shape[1], shape[0]) + shape[2:]
        raise ValueError(
            f"dropout_masks[{layer}] has shape {tuple(masks[layer].shape)}, expected the "
            f"layer output's shape {tuple(expected)}"
        )
    return keep


@functools.lru_cache(maxsize=None)
def _rematerialized(step: Step) -> Step:
    return jax.checkpoint(step)


@functools.lru_cache(maxsize=None)
def _autodiff_step(cell: Cell) -> Step:
    """The cell as a plain step: the scan gets JAX's own differentiation (forward mode too)."""
    return functools.partial(Cell.__call__, cell)


def _run_sequence(
    module: nn.Module,
    step: Cell,
    layer_weights,
    x: Array,
    carry: Optional[Carry],
    layout: _Layout,
    *,
    batch_shape: tuple[int, ...],
    carry_names: str,
    layer_features: tuple[int, ...],
    seq_lengths,
    reset,
    deterministic: bool,
    dropout_masks,
    mesh: Optional[MeshLike],
    batch_axis: BatchAxis,
) -> tuple[Array, Carry]:
    """What ``LSTM`` and ``ConvLSTM`` share once their weights are declared: dtypes, the
    carry, lengths and reset checks, and the stack run on one device or over ``mesh``.

    Dropout keep masks are drawn here, for the full batch, so a mesh run equals the one-device
    run with the same rng. ``layer_features``: the trailing shape of one layer's output.
    """
    dtype = computation_dtype(module.dtype, x, layer_weights)
    layer_weights = cast_weights(layer_weights, dtype)
    if carry is None:
        carry = module.initialize_carry(batch_shape, dtype)
    carry = check_carry(carry, module.carry_shapes(batch_shape), carry_names)
    lengths = None
    if seq_lengths is not None:
        lengths = check_seq_lengths(seq_lengths, layout.batch, layout.num_steps)
    if reset is not None:
        reset = layout.mask_in(check_reset(reset, *layout.mask_shape()))
    carry = tuple(a.astype(dtype) for a in layout.carry_in(carry))
    xs = layout.sequence_in(x.astype(dtype))  # (T, B, ...)

    if module.remat:
        step = _rematerialized(step)
    elif not module.batched_backward:
        step = _autodiff_step(step)
    keeps = None
    if not deterministic and module.dropout > 0.0 and module.num_layers > 1:
        shape = tuple(xs.shape[:2]) + tuple(layer_features)
        keeps = [_keep_mask(module, dropout_masks, k, shape, layout)
                 for k in range(module.num_layers - 1)]
    options = dict(lengths=lengths, reset=reset, keep_masks=keeps, dropout=module.dropout,
                   unroll=module.unroll)
    if mesh is None:
        ys, carry = run_stack_jit(step, layer_weights, carry, xs, **options)
    else:
        mesh = resolve_mesh(mesh, batch_axis)
        check_batch(layout.batch, mesh, batch_axis)
        ys, carry = run_stack_sharded(
            step, layer_weights, carry, xs, mesh=mesh, batch_axis=batch_axis, **options
        )
    return layout.sequence_out(ys), layout.carry_out(carry)


class _LSTMParams(nn.Module):
    """The parameters of one layer-direction, in its own scope (``layer_{k}[_reverse]``)."""

    hidden_size: int
    proj_size: int
    use_bias: bool
    param_dtype: Any

    @nn.compact
    def __call__(self, in_features: int):
        return declare_lstm_weights(
            self, in_features, self.hidden_size, self.proj_size, self.use_bias, self.param_dtype
        )


class _ConvLSTMParams(nn.Module):
    hidden_channels: int
    kernel_size: tuple[int, int]
    use_bias: bool
    param_dtype: Any

    @nn.compact
    def __call__(self, in_channels: int):
        return declare_convlstm_weights(
            self, in_channels, self.hidden_channels, self.kernel_size, self.use_bias,
            self.param_dtype,
        )


def _check_dropout(rate) -> None:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise TypeError(f"dropout must be a number, got {type(rate).__name__}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {rate}")


# ------------------------------------------------------------------------------------ LSTM


class LSTM(nn.Module):
    """torch.nn.LSTM in Flax: layers, bidirectional, proj_size, dropout, packed lengths, resets.

    Arguments:
        hidden_size: H, the cell size.
        num_layers: stacked layers.
        use_bias: torch's ``bias``: two biases per layer, ``ih_bias`` and ``hh_bias``.
        dropout: inter-layer dropout rate (not after the last layer), only when
            ``deterministic=False``, drawn from the ``'dropout'`` rng.
        bidirectional: a reverse direction per layer, outputs concatenated forward first.
        proj_size: P > 0 projects h to P features (torch's proj_size); 0 for none.
        time_major: input ``(T, B, F)`` instead of ``(B, T, F)`` (torch's ``batch_first=False``).
        dtype: computation dtype; None promotes input and parameters (Flax's rule).
        param_dtype: parameter dtype.
        precision: matmul precision; ``"highest"`` for full float32 on GPU/TPU.
        unroll: time steps per scan iteration (speed only, same result).
        remat: recompute each cell step in the backward pass (``jax.checkpoint``) instead of
            storing its gates: ~3x less activation memory for long chunks, same values.
        batched_backward: the backward pass computes the gradients of the weights and of the
            input for all steps at once, one matmul each after the recurrent loop (a custom
            VJP; LSTM forward+backward 1.2-1.4x faster on the CPU, ConvLSTM about even). Reverse mode only: set False for forward-mode
            differentiation (``jax.jvp``, ``jax.jacfwd``), which then runs JAX's own
            differentiation of the scan. Ignored with ``remat``, which always uses the latter.

    Parameters live in ``params['layer_{k}']`` (and ``'layer_{k}_reverse'``): ``ih_kernel``
    ``(F_k, 4H)``, ``hh_kernel`` ``(H_out, 4H)``, ``ih_bias``, ``hh_bias`` ``(4H,)``,
    ``proj_kernel`` ``(H, P)``; torch's weights transposed (``parity.to_jax`` converts them).

    Example:
        >>> lstm = LSTM(hidden_size=64, num_layers=2)
        >>> x = jnp.ones((8, 100, 16))                                  # (B, T, F)
        >>> variables = lstm.init(jax.random.key(0), x)
        >>> y, (h, c) = lstm.apply(variables, x)                        # y: (8, 100, 64)
        >>> y2, (h, c) = lstm.apply(variables, x, (h, c))               # continue the stream
        >>> y3, _ = lstm.apply(variables, x, seq_lengths=jnp.array([100, 50, 1, 0, 7, 9, 3, 2]))
    """

    hidden_size: int
    num_layers: int = 1
    use_bias: bool = True
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    time_major: bool = False
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None
    unroll: int = 1
    remat: bool = False
    batched_backward: bool = True

    def __post_init__(self):
        check_lstm_sizes(self.hidden_size, self.proj_size)
        check_int(self.num_layers, "num_layers", 1)
        check_int(self.unroll, "unroll", 1)
        _check_dropout(self.dropout)
        super().__post_init__()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Features of h (and of each direction's output): P if proj_size else H."""
        return self.proj_size or self.hidden_size

    @nn.nowrap
    def carry_shapes(self, batch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        stack = (self.num_layers * self.num_directions,) + tuple(batch_shape)
        return stack + (self.output_size,), stack + (self.hidden_size,)

    @nn.nowrap
    def initialize_carry(self, batch_shape: tuple[int, ...] = (), dtype=None) -> Carry:
        """Zeros ``(h, c)``: ``(L*D, *batch_shape, H_out)``, ``(L*D, *batch_shape, H)``."""
        dtype = dtype or self.dtype or self.param_dtype
        h_shape, c_shape = self.carry_shapes(tuple(batch_shape))
        return jnp.zeros(h_shape, dtype), jnp.zeros(c_shape, dtype)

    @nn.compact
    def __call__(
        self,
        x: Array,
        carry: Optional[Carry] = None,
        *,
        seq_lengths: Optional[Array] = None,
        reset: Optional[Array] = None,
        deterministic: bool = True,
        dropout_masks: Optional[Sequence[Array]] = None,
        mesh: Optional[MeshLike] = None,
        batch_axis: BatchAxis = "batch",
    ) -> tuple[Array, Carry]:
        """Runs the stack over a sequence.

        Arguments:
            x: ``(B, T, F)``, ``(T, B, F)`` when time_major, or unbatched ``(T, F)``.
            carry: ``(h, c)`` in torch's layout ``(L*D, B, H_out)``, ``(L*D, B, H)`` (no B
                when unbatched); None for zeros.
            seq_lengths: ``(B,)`` valid steps per row: torch's packed-sequence semantics.
            reset: bools in the input's layout (``(B, T)``, ``(T, B)`` when time_major,
                ``(T,)`` unbatched): zero the carry before each marked step.
            deterministic: False enables inter-layer dropout.
            dropout_masks: optional keep masks, one per gap between layers, each shaped like
                that layer's output in the input's layout; replaces the random draw (parity).
            mesh: a ``jax.sharding.Mesh`` (or a ``NamedSharding``, for its mesh) to run
                data-parallel: x, carry, seq_lengths, reset and the outputs split along the
                batch over the ``batch_axis`` devices, parameters replicated, no collective in
                the time loop; results equal the one-device run. The batch must be divisible
                by the size of ``batch_axis`` and the input batched, else ValueError. Static
                under jit: ``jax.jit(functools.partial(lstm.apply, mesh=mesh))``.
            batch_axis: the mesh axis name (or tuple of names) that splits the batch.

        Returns:
            ``(y, (h_n, c_n))``: y ``(..., D*H_out)`` in the input's layout.
        """
        x = check_input(x, (2, 3), "LSTM")
        layout = _Layout(x, self.time_major, feature_rank=1)
        layer_weights = []
        in_features = x.shape[-1]
        for layer in range(self.num_layers):
            directions = []
            for d in range(self.num_directions):
                name = f"layer_{layer}" + ("_reverse" if d else "")
                directions.append(
                    _LSTMParams(
                        self.hidden_size, self.proj_size, self.use_bias, self.param_dtype,
                        name=name,
                    )(in_features)
                )
            layer_weights.append(directions)
            in_features = self.num_directions * self.output_size

        return _run_sequence(
            self, lstm_cell(self.precision), layer_weights, x, carry, layout,
            batch_shape=() if layout.batch is None else (layout.batch,),
            carry_names="layers * directions, batch, features",
            layer_features=(self.num_directions * self.output_size,),
            seq_lengths=seq_lengths, reset=reset, deterministic=deterministic,
            dropout_masks=dropout_masks, mesh=mesh, batch_axis=batch_axis,
        )


# -------------------------------------------------------------------------------- ConvLSTM


class ConvLSTM(nn.Module):
    """A stack of ConvLSTM layers, channels-last, with torch_impl.ConvLSTM2d's semantics.

    Arguments:
        hidden_channels: channels of h and c.
        kernel_size: int or pair; 'same' zero padding by torch's rule (even kernels too).
        num_layers: stacked layers.
        use_bias: two biases per layer, ``ih_bias`` and ``hh_bias``.
        dilation: int or pair.
        dropout: inter-layer dropout, as for ``LSTM``.
        time_major: input ``(T, B, H, W, C)`` instead of ``(B, T, H, W, C)``.
        dtype, param_dtype, precision, unroll, remat, batched_backward: as for ``LSTM``.

    Parameters live in ``params['layer_{k}']``: ``ih_kernel`` ``(kh, kw, C_k, 4H)``,
    ``hh_kernel`` ``(kh, kw, H, 4H)``, ``ih_bias``, ``hh_bias`` ``(4H,)``.

    Example:
        >>> model = ConvLSTM(hidden_channels=16, kernel_size=3, num_layers=2)
        >>> x = jnp.ones((4, 10, 64, 64, 3))                          # (B, T, H, W, C)
        >>> variables = model.init(jax.random.key(0), x)
        >>> y, (h, c) = model.apply(variables, x)       # y (4, 10, 64, 64, 16), h (2, 4, 64, 64, 16)
    """

    hidden_channels: int
    kernel_size: Any = 3
    num_layers: int = 1
    use_bias: bool = True
    dilation: Any = 1
    dropout: float = 0.0
    time_major: bool = False
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None
    unroll: int = 1
    remat: bool = False
    batched_backward: bool = True

    def __post_init__(self):
        check_int(self.hidden_channels, "hidden_channels", 1)
        check_int(self.num_layers, "num_layers", 1)
        check_int(self.unroll, "unroll", 1)
        as_pair(self.kernel_size, "kernel_size")
        as_pair(self.dilation, "dilation")
        _check_dropout(self.dropout)
        super().__post_init__()

    @nn.nowrap
    def carry_shapes(self, batch_shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """``batch_shape`` is ``(B, H, W)`` (or ``(H, W)`` unbatched)."""
        shape = (self.num_layers,) + tuple(batch_shape) + (self.hidden_channels,)
        return shape, shape

    @nn.nowrap
    def initialize_carry(self, batch_shape: tuple[int, ...], dtype=None) -> Carry:
        """Zeros ``(h, c)``, each ``(L, *batch_shape, hidden)``; ``batch_shape = (B, H, W)``."""
        dtype = dtype or self.dtype or self.param_dtype
        h_shape, c_shape = self.carry_shapes(tuple(batch_shape))
        return jnp.zeros(h_shape, dtype), jnp.zeros(c_shape, dtype)

    @nn.compact
    def __call__(
        self,
        x: Array,
        carry: Optional[Carry] = None,
        *,
        seq_lengths: Optional[Array] = None,
        reset: Optional[Array] = None,
        deterministic: bool = True,
        dropout_masks: Optional[Sequence[Array]] = None,
        mesh: Optional[MeshLike] = None,
        batch_axis: BatchAxis = "batch",
    ) -> tuple[Array, Carry]:
        """Runs the stack over a sequence of frames.

        Arguments:
            x: ``(B, T, H, W, C)``, ``(T, B, H, W, C)`` when time_major, or ``(T, H, W, C)``.
            carry: ``(h, c)``, each ``(L, B, H, W, hidden)``; None for zeros.
            seq_lengths, reset, deterministic, dropout_masks, mesh, batch_axis: as for ``LSTM``.

        Returns:
            ``(y, (h_n, c_n))``: y the last layer's h at every step, in the input's layout.
        """
        x = check_input(x, (4, 5), "ConvLSTM")
        layout = _Layout(x, self.time_major, feature_rank=3)
        kernel_size = as_pair(self.kernel_size, "kernel_size")
        layer_weights = []
        in_channels = x.shape[-1]
        for layer in range(self.num_layers):
            weights = _ConvLSTMParams(
                self.hidden_channels, kernel_size, self.use_bias, self.param_dtype,
                name=f"layer_{layer}",
            )(in_channels)
            layer_weights.append([weights])
            in_channels = self.hidden_channels

        spatial = tuple(x.shape[-3:-1])
        return _run_sequence(
            self, convlstm_cell(as_pair(self.dilation, "dilation"), self.precision),
            layer_weights, x, carry, layout,
            batch_shape=spatial if layout.batch is None else (layout.batch,) + spatial,
            carry_names="layers, batch, H, W, channels",
            layer_features=spatial + (self.hidden_channels,),
            seq_lengths=seq_lengths, reset=reset, deterministic=deterministic,
            dropout_masks=dropout_masks, mesh=mesh, batch_axis=batch_axis,
        )
