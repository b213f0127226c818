"""Flax Linen modules with torch's semantics: ``LSTM``, ``GRU``, ``RNN``, ``ConvLSTM``, and the
one-step cells ``LSTMCell``, ``GRUCell``, ``RNNCell``, ``ConvLSTMCell``.

The modules hold parameters; the math is in ``cells``, the time loop in ``scan``, and what
every module does with a call (checks, dtypes, dropout, the mesh) in ``stack``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from .cells import (
    KINDS,
    ConvWeights,
    DenseWeights,
    LSTMState,
    PrecisionLike,
    cast_weights,
    computation_dtype,
    conv_param_shapes,
    conv_parts,
    dense_param_shapes,
    dense_parts,
    init_bound,
)
from .checks import (
    SequenceLayout,
    as_pair,
    check_backward,
    check_carry,
    check_conv_sizes,
    check_dropout,
    check_input,
    check_int,
    check_lstm_sizes,
    check_nonlinearity,
)
from .scan import RunOptions
from .sharding import BatchAxis, MeshLike
from .stack import StackConfig, run_sequence

Array = jax.Array


def torch_uniform(bound: float):
    """torch's RNN initialisation: every parameter uniform in [-bound, bound]."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def declare_params(module: nn.Module, shapes: dict[str, tuple[int, ...]], bound: float, dtype):
    """``module.param`` for each entry of a parameter table; a stored parameter whose shape
    does not fit the input is a ValueError naming both shapes."""
    init = torch_uniform(bound)
    params = {}
    for name, shape in shapes.items():
        if module.has_variable("params", name):
            stored = module.get_variable("params", name)
            if tuple(stored.shape) != tuple(shape):
                raise ValueError(
                    f"parameter {'/'.join(module.path + (name,))} has shape "
                    f"{tuple(stored.shape)}, expected {tuple(shape)} for this input"
                )
        params[name] = module.param(name, init, shape, dtype)
    return params


class _LayerParams(nn.Module):
    """One layer-direction's parameters, in its own scope (``layer_{k}[_reverse]``)."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bound: float
    param_dtype: Any

    @nn.compact
    def __call__(self):
        return declare_params(self, dict(self.shapes), self.bound, self.param_dtype)


_CALL_DOC = """
        Arguments:
            x: ``(B, T, F)``, ``(T, B, F)`` when time_major, or unbatched ``(T, F)``.
            carry: in torch's layout, ``(L*D, B, H_out)`` per array (no B when unbatched); None
                for zeros.
            seq_lengths: ``(B,)`` valid steps per row: torch's packed-sequence semantics.
            reset: bools in the input's layout (``(B, T)``, ``(T, B)`` when time_major,
                ``(T,)`` unbatched): zero the carry before each marked step.
            deterministic: False enables inter-layer dropout (rng stream ``'dropout'``).
            dropout_masks: optional keep masks, one per gap between layers, each shaped like
                that layer's output in the input's layout; replaces the random draw (parity).
            mesh: a ``jax.sharding.Mesh`` (or a ``NamedSharding``, for its mesh) to run
                data-parallel: x, carry, seq_lengths, reset and the outputs split along the
                batch over the ``batch_axis`` devices, parameters replicated, no collective in
                the time loop. The batch must be divisible by the size of ``batch_axis`` and
                the input batched, else ValueError. Static under jit:
                ``jax.jit(functools.partial(module.apply, mesh=mesh))``.
            batch_axis: the mesh axis name (or tuple of names) that splits the batch.

        Returns:
            ``(y, carry)``: y ``(..., D*H_out)`` in the input's layout, the final carry.
"""


def _check_channels_last(variables, x: Array) -> None:
    """A channels-first frame (torch's ``(C, H, W)``) given to a channels-last ConvLSTM would
    otherwise be reported as a kernel shape mismatch: name the layout instead."""
    kernel = variables.get("params", {}).get("layer_0", {}).get("ih_kernel")
    if kernel is None or kernel.shape[-2] == x.shape[-1]:
        return
    if x.shape[-3] == kernel.shape[-2]:
        raise ValueError(
            f"input has shape {tuple(x.shape)}: it looks channels-first (..., C, H, W) with "
            f"C={x.shape[-3]}, but the JAX ConvLSTM is channels-last (..., H, W, C); move the "
            f"channel axis last (jnp.moveaxis(x, -3, -1))"
        )


class _Recurrent(nn.Module, kw_only=True):
    """What the sequence modules share: the options every stack has (keyword-only), and the
    call, given the cell and the parameter tables.

    Subclasses declare their own fields (positional, torch's order) and define
    ``_config()``, ``_cell()`` and ``_layer_shapes(layer, in_features)``.
    """

    dropout: float = 0.0
    time_major: bool = False
    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None
    unroll: int = 1
    backward: str = "batched"

    def __post_init__(self):
        check_int(self.num_layers, "num_layers", 1)
        check_int(self.unroll, "unroll", 1)
        check_dropout(self.dropout)
        check_backward(self.backward)
        super().__post_init__()

    @property
    def num_directions(self) -> int:
        return 2 if getattr(self, "bidirectional", False) else 1

    @property
    def feature_rank(self) -> int:
        """Trailing feature axes of an input step: 1 (dense), 3 (convolutional, H W C)."""
        return self._config().feature_rank

    @nn.nowrap
    def carry_shapes(self, batch_shape: tuple[int, ...]) -> Any:
        """The carry's shapes for ``batch_shape`` (``(B,)``, or ``()`` unbatched)."""
        return self._config().carry_shapes(tuple(batch_shape))

    @nn.nowrap
    def initialize_carry(self, batch_shape: tuple[int, ...] = (), dtype=None) -> Any:
        """A zero carry in torch's layout for ``batch_shape``."""
        return self._config().zeros(tuple(batch_shape), dtype or self.dtype or self.param_dtype)

    def _layer_weights(self, in_features: int) -> list[list[Any]]:
        config, layers = self._config(), []
        for layer in range(self.num_layers):
            directions = []
            for d in range(config.num_directions):
                shapes, bound, weights_type = self._layer_shapes(layer, in_features)
                params = _LayerParams(
                    tuple(shapes.items()), bound, self.param_dtype,
                    name=f"layer_{layer}" + ("_reverse" if d else ""),
                )()
                directions.append(weights_type(**params))
            layers.append(directions)
            in_features = config.num_directions * config.output
        return layers

    @nn.compact
    def __call__(
        self,
        x: Array,
        carry: Any = None,
        *,
        seq_lengths: Optional[Array] = None,
        reset: Optional[Array] = None,
        deterministic: bool = True,
        dropout_masks: Optional[Sequence[Array]] = None,
        mesh: Optional[MeshLike] = None,
        batch_axis: BatchAxis = "batch",
    ) -> tuple[Array, Any]:
        config = self._config()
        x = check_input(x, (1 + config.feature_rank, 2 + config.feature_rank),
                        type(self).__name__)
        layout = SequenceLayout(x, self.time_major, config.feature_rank)
        if config.feature_rank == 3:
            _check_channels_last(self.variables, x)
        layer_weights = self._layer_weights(x.shape[-1])
        dropping = not deterministic and config.dropout > 0.0 and config.num_layers > 1
        return run_sequence(
            config, self._cell(), layer_weights, x, carry, layout,
            seq_lengths=seq_lengths, reset=reset,
            dropout_key=self.make_rng("dropout") if dropping and dropout_masks is None else None,
            dropout_masks=dropout_masks if dropping else None,
            mesh=mesh, batch_axis=batch_axis,
        )

    __call__.__doc__ = "Runs the stack over a sequence.\n" + _CALL_DOC


class _DenseRecurrent(_Recurrent):
    """torch.nn.RNNBase's options (see ``LSTM`` for each)."""

    hidden_size: int
    num_layers: int = 1
    use_bias: bool = True
    bidirectional: bool = False

    kind = "lstm"  # class constant: a key of cells.KINDS

    def __post_init__(self):
        check_int(self.hidden_size, "hidden_size", 1)
        super().__post_init__()

    @property
    def _projection(self) -> int:
        return 0

    @property
    def output_size(self) -> int:
        """Features of h (and of each direction's output): P if proj_size else H."""
        return self._projection or self.hidden_size

    @nn.nowrap
    def _config(self) -> StackConfig:
        return StackConfig(
            cell_state=KINDS[self.kind].cell_state, num_layers=self.num_layers,
            num_directions=self.num_directions, hidden=self.hidden_size,
            output=self.output_size, feature_rank=1,
            carry_layout="layers * directions, batch, features", dropout=self.dropout,
            dtype=self.dtype, options=RunOptions(self.backward, self.unroll),
        )

    @nn.nowrap
    def _cell(self):
        return dense_parts(self.kind, self.precision, bool(self._projection))

    @nn.nowrap
    def _layer_shapes(self, layer: int, in_features: int):
        shapes = dense_param_shapes(
            KINDS[self.kind], in_features, self.hidden_size, self._projection, self.use_bias
        )
        return shapes, init_bound(self.hidden_size), DenseWeights


class LSTM(_DenseRecurrent):
    """torch.nn.LSTM in Flax: layers, bidirectional, proj_size, dropout, packed lengths, resets.

    Arguments:
        hidden_size: H, the cell size.
        num_layers: stacked layers.
        use_bias: torch's ``bias``: two biases per layer, ``ih_bias`` and ``hh_bias``.
        dropout: inter-layer dropout rate (not after the last layer), only when
            ``deterministic=False``, drawn from the ``'dropout'`` rng.
        bidirectional: a reverse direction per layer, outputs concatenated forward first.
        time_major: input ``(T, B, F)`` instead of ``(B, T, F)`` (torch's ``batch_first=False``).
        dtype: computation dtype; None promotes input and parameters (Flax's rule).
        param_dtype: parameter dtype.
        precision: matmul precision; ``"highest"`` for full float32 on GPU/TPU.
        unroll: time steps per scan iteration (speed only, same result).
        backward: the gradient path, ``"batched"`` (default: weight and input gradients of all
            steps as one matmul each after the recurrent loop; reverse mode only),
            ``"autodiff"`` (JAX's own; forward mode too) or ``"remat"`` (JAX's own, recomputing
            each step instead of storing it: less memory for long chunks). Same values.
        proj_size: P > 0 projects h to P features (torch's proj_size); 0 for none.

    Parameters live in ``params['layer_{k}']`` (and ``'layer_{k}_reverse'``): ``ih_kernel``
    ``(F_k, 4H)``, ``hh_kernel`` ``(H_out, 4H)``, ``ih_bias``, ``hh_bias`` ``(4H,)``,
    ``proj_kernel`` ``(H, P)``; torch's weights transposed (``parity.to_jax`` converts them).
    The carry is ``LSTMState(h, c)``, torch's order (Flax's own LSTM cells use ``(c, h)``).

    Example:
        >>> lstm = LSTM(hidden_size=64, num_layers=2)
        >>> x = jnp.ones((8, 100, 16))                                  # (B, T, F)
        >>> variables = lstm.init(jax.random.key(0), x)
        >>> y, (h, c) = lstm.apply(variables, x)
        >>> y.shape, h.shape
        ((8, 100, 64), (2, 8, 64))
        >>> y2, carry = lstm.apply(variables, x, (h, c))               # continue the stream
        >>> y3, _ = lstm.apply(variables, x, seq_lengths=jnp.array([100, 50, 1, 0, 7, 9, 3, 2]))
    """

    proj_size: int = 0

    kind = "lstm"

    def __post_init__(self):
        check_lstm_sizes(self.hidden_size, self.proj_size)
        super().__post_init__()

    @property
    def _projection(self) -> int:
        return self.proj_size


class GRU(_DenseRecurrent):
    """torch.nn.GRU in Flax: every option ``LSTM`` has except proj_size (torch's GRU has none).

    Gates r, z, n in torch's order; ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`` (the
    reset gate after the hidden matmul, as torch and cuDNN do; the textbook GRU differs) and
    ``h' = (1 - z) * n + z * h``. The carry is one array ``h``, ``(L*D, B, H)``. Parameters as
    the LSTM's with 3H in place of 4H.

    Example:
        >>> gru = GRU(hidden_size=32, num_layers=2, bidirectional=True)
        >>> x = jnp.ones((4, 10, 8))
        >>> variables = gru.init(jax.random.key(0), x)
        >>> y, h = gru.apply(variables, x)
        >>> y.shape, h.shape
        ((4, 10, 64), (4, 4, 32))
    """

    kind = "gru"


class RNN(_DenseRecurrent):
    """torch.nn.RNN (the Elman network) in Flax; not ``flax.linen.RNN``, which drives a cell.

    ``h' = nonlinearity(W_ih x + b_ih + W_hh h + b_hh)`` with ``nonlinearity`` ``"tanh"`` or
    ``"relu"``; every option ``GRU`` has. The carry is one array ``h``, ``(L*D, B, H)``.

    Example:
        >>> rnn = RNN(hidden_size=16, nonlinearity="relu")
        >>> x = jnp.ones((4, 10, 8))
        >>> y, h = rnn.apply(rnn.init(jax.random.key(0), x), x)
        >>> h.shape
        (1, 4, 16)
    """

    nonlinearity: str = "tanh"

    def __post_init__(self):
        check_nonlinearity(self.nonlinearity)
        super().__post_init__()

    @property
    def kind(self) -> str:
        return f"rnn_{self.nonlinearity}"


class ConvLSTM(_Recurrent):
    """A stack of ConvLSTM layers, channels-last, with torch_impl.ConvLSTM2d's semantics.

    Arguments:
        hidden_channels: channels of h and c.
        kernel_size: int or pair; 'same' zero padding by torch's rule (even kernels too).
        num_layers: stacked layers.
        use_bias: two biases per layer, ``ih_bias`` and ``hh_bias``.
        dilation: int or pair.
        dropout: inter-layer dropout, as for ``LSTM``.
        time_major: input ``(T, B, H, W, C)`` instead of ``(B, T, H, W, C)``.
        dtype, param_dtype, precision, unroll, backward: as for ``LSTM``.

    Parameters live in ``params['layer_{k}']``: ``ih_kernel`` ``(kh, kw, C_k, 4H)``,
    ``hh_kernel`` ``(kh, kw, H, 4H)``, ``ih_bias``, ``hh_bias`` ``(4H,)``. The input is
    channels-last: torch's ``(B, T, C, H, W)`` is ``(B, T, H, W, C)`` here.

    Example:
        >>> model = ConvLSTM(hidden_channels=16, kernel_size=3, num_layers=2)
        >>> x = jnp.ones((2, 5, 16, 16, 3))                             # (B, T, H, W, C)
        >>> variables = model.init(jax.random.key(0), x)
        >>> y, (h, c) = model.apply(variables, x)
        >>> y.shape, h.shape
        ((2, 5, 16, 16, 16), (2, 2, 16, 16, 16))
    """

    hidden_channels: int
    kernel_size: Any = 3
    num_layers: int = 1
    use_bias: bool = True
    dilation: Any = 1

    def __post_init__(self):
        check_conv_sizes(self.hidden_channels, self.kernel_size, self.dilation)
        super().__post_init__()

    @nn.nowrap
    def _config(self) -> StackConfig:
        return StackConfig(
            cell_state=True, num_layers=self.num_layers, num_directions=1,
            hidden=self.hidden_channels, output=self.hidden_channels, feature_rank=3,
            carry_layout="layers, batch, H, W, channels", dropout=self.dropout,
            dtype=self.dtype, options=RunOptions(self.backward, self.unroll),
        )

    @nn.nowrap
    def _cell(self):
        return conv_parts("lstm", as_pair(self.dilation, "dilation"), self.precision)

    @nn.nowrap
    def _layer_shapes(self, layer: int, in_channels: int):
        kernel_size = as_pair(self.kernel_size, "kernel_size")
        shapes = conv_param_shapes(
            KINDS["lstm"], in_channels, self.hidden_channels, kernel_size, self.use_bias
        )
        return shapes, init_bound(self.hidden_channels, kernel_size), ConvWeights

    @nn.nowrap
    def carry_shapes(self, batch_shape: tuple[int, ...]) -> Any:
        """``batch_shape`` is ``(B, H, W)`` (or ``(H, W)`` unbatched)."""
        return self._config().carry_shapes(tuple(batch_shape))


# ------------------------------------------------------------------------------------ cells


class _Cell(nn.RNNCellBase, kw_only=True):
    """A one-step cell: ``cell(carry, x) -> (carry, y)``; drives with ``jax.lax.scan`` or
    ``flax.linen.RNN``. Subclasses declare their own fields (positional) and define
    ``_cell()``, ``_shapes(in_features)``, ``_bound()``, ``_weights_type`` and
    ``_carry_features``."""

    dtype: Optional[Any] = None
    param_dtype: Any = jnp.float32
    precision: PrecisionLike = None

    @nn.compact
    def __call__(self, carry: Any, x: Array) -> tuple[Any, Array]:
        weights = self._weights_type(**declare_params(
            self, self._shapes(x.shape[-1]), self._bound(), self.param_dtype
        ))
        return self._step(weights, carry, x)

    @nn.nowrap
    def _step(self, weights: Any, carry: Any, x: Array) -> tuple[Any, Array]:
        """The step from the declared weights (``jax_impl.nnx``'s cells call it too)."""
        expected = jax.tree_util.tree_map(jnp.shape, self.initialize_carry(None, x.shape))
        if isinstance(expected, LSTMState):
            expected = LSTMState(*expected)
        checked = check_carry(carry, expected, "batch, ..., features")
        carry = tuple(checked) if type(carry) is tuple else checked  # keep the caller's type
        dtype = computation_dtype(self.dtype, x, weights)
        carry = jax.tree_util.tree_map(lambda a: a.astype(dtype), carry)
        return self._cell()(cast_weights(weights, dtype), carry, x.astype(dtype))

    @nn.nowrap
    def initialize_carry(self, rng, input_shape: tuple[int, ...]) -> Any:
        """Zeros (as torch) for an input of ``input_shape`` (``rng`` unused)."""
        del rng
        batch = tuple(input_shape[: len(input_shape) - self.num_feature_axes])
        dtype = self.dtype or self.param_dtype
        h, c = self._carry_features()
        h = jnp.zeros(batch + tuple(input_shape[len(batch):-1]) + (h,), dtype)
        if not KINDS[self._kind()].cell_state:
            return h
        return LSTMState(h, jnp.zeros(h.shape[:-1] + (c,), dtype))

    @property
    def num_feature_axes(self) -> int:
        return 1


class _DenseCell(_Cell):
    hidden_size: int
    use_bias: bool = True

    _weights_type = DenseWeights

    def __post_init__(self):
        check_int(self.hidden_size, "hidden_size", 1)
        super().__post_init__()

    @nn.nowrap
    def _kind(self) -> str:
        return self.kind

    @nn.nowrap
    def _projection(self) -> int:
        return 0

    @nn.nowrap
    def _cell(self):
        return dense_parts(self._kind(), self.precision, bool(self._projection()))

    @nn.nowrap
    def _shapes(self, in_features: int):
        return dense_param_shapes(
            KINDS[self._kind()], in_features, self.hidden_size, self._projection(), self.use_bias
        )

    @nn.nowrap
    def _bound(self) -> float:
        return init_bound(self.hidden_size)

    @nn.nowrap
    def _carry_features(self) -> tuple[int, int]:
        return self._projection() or self.hidden_size, self.hidden_size


class LSTMCell(_DenseCell):
    """One torch.nn.LSTMCell step (with torch.nn.LSTM's ``proj_size``), carry ``LSTMState(h, c)``.

    Arguments:
        hidden_size: H.
        use_bias: keep torch's two biases.
        dtype, param_dtype, precision: as for ``LSTM``.
        proj_size: P > 0 projects h to P features (torch's LSTM proj_size); 0 for none.

    Example:
        >>> cell = LSTMCell(hidden_size=32)
        >>> carry = cell.initialize_carry(jax.random.key(0), (8, 16))    # h, c: (8, 32)
        >>> variables = cell.init(jax.random.key(1), carry, jnp.ones((8, 16)))
        >>> carry, y = cell.apply(variables, carry, jnp.ones((8, 16)))
        >>> y.shape
        (8, 32)
    """

    proj_size: int = 0

    kind = "lstm"

    def __post_init__(self):
        check_lstm_sizes(self.hidden_size, self.proj_size)
        super().__post_init__()

    @nn.nowrap
    def _projection(self) -> int:
        return self.proj_size


class GRUCell(_DenseCell):
    """One torch.nn.GRUCell step, carry ``h``; see ``GRU`` for the math.

    Example:
        >>> cell = GRUCell(hidden_size=32)
        >>> h = cell.initialize_carry(jax.random.key(0), (8, 16))         # (8, 32)
        >>> variables = cell.init(jax.random.key(1), h, jnp.ones((8, 16)))
        >>> h, y = cell.apply(variables, h, jnp.ones((8, 16)))
    """

    kind = "gru"


class RNNCell(_DenseCell):
    """One torch.nn.RNNCell step (``nonlinearity`` ``"tanh"`` or ``"relu"``), carry ``h``.

    Example:
        >>> cell = RNNCell(hidden_size=32, nonlinearity="relu")
        >>> h = cell.initialize_carry(jax.random.key(0), (8, 16))
        >>> h, y = cell.apply(cell.init(jax.random.key(1), h, jnp.ones((8, 16))), h, jnp.ones((8, 16)))
    """

    nonlinearity: str = "tanh"

    def __post_init__(self):
        check_nonlinearity(self.nonlinearity)
        super().__post_init__()

    @nn.nowrap
    def _kind(self) -> str:
        return f"rnn_{self.nonlinearity}"


class ConvLSTMCell(_Cell):
    """One ConvLSTM step, channels-last, carry ``LSTMState(h, c)`` each ``(B, H, W, hidden)``.

    Example:
        >>> cell = ConvLSTMCell(hidden_channels=16, kernel_size=3)
        >>> carry = cell.initialize_carry(jax.random.key(0), (2, 32, 32, 3))
        >>> variables = cell.init(jax.random.key(1), carry, jnp.ones((2, 32, 32, 3)))
        >>> carry, y = cell.apply(variables, carry, jnp.ones((2, 32, 32, 3)))
        >>> y.shape
        (2, 32, 32, 16)
    """

    hidden_channels: int
    kernel_size: Any = 3
    use_bias: bool = True
    dilation: Any = 1

    _weights_type = ConvWeights

    def __post_init__(self):
        check_conv_sizes(self.hidden_channels, self.kernel_size, self.dilation)
        super().__post_init__()

    @nn.nowrap
    def _kind(self) -> str:
        return "lstm"

    @nn.nowrap
    def _cell(self):
        return conv_parts("lstm", as_pair(self.dilation, "dilation"), self.precision)

    @nn.nowrap
    def _shapes(self, in_channels: int):
        return conv_param_shapes(
            KINDS["lstm"], in_channels, self.hidden_channels,
            as_pair(self.kernel_size, "kernel_size"), self.use_bias,
        )

    @nn.nowrap
    def _bound(self) -> float:
        return init_bound(self.hidden_channels, as_pair(self.kernel_size, "kernel_size"))

    @nn.nowrap
    def _carry_features(self) -> tuple[int, int]:
        return self.hidden_channels, self.hidden_channels

    @property
    def num_feature_axes(self) -> int:
        return 3
