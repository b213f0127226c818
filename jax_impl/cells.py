"""The cell math, once, as pure functions of arrays; cells described by their parts.

A cell type (``CellKind``) is its update function plus its parameter table:

* ``lstm``: gates i, f, g, o (torch's order); carry ``LSTMState(h, c)``;
* ``gru``: gates r, z, n; the reset gate multiplies ``W_hn h + b_hn`` (torch's and cuDNN's GRU,
  not the textbook one); carry ``h``;
* ``rnn_tanh`` / ``rnn_relu``: torch.nn.RNN; carry ``h``.

Both biases are kept apart (``ih_bias`` and ``hh_bias``) as in torch, so conversion is lossless
and gradients match parameter by parameter. Kernels are stored the Flax way, ``(in, out)`` for
dense cells and ``HWIO`` for convolutional ones; the torch layouts are their transposes (see
``parity.mapping``).

A ``CellParts`` is one cell split at its linear maps (the input map, the hidden map, the update,
the optional output map): what ``scan.scan_direction`` needs to run any cell type, and to batch
the linear maps' gradients over time in its backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .conv import conv_gates

Array = jax.Array
PrecisionLike = Any


class LSTMState(NamedTuple):
    """An LSTM carry in torch's order: ``(h, c)`` (Flax's own LSTM cells use ``(c, h)``)."""

    h: Array
    c: Array


# ----------------------------------------------------------------------------------- weights


class DenseWeights(NamedTuple):
    """One layer-direction of a dense cell (G gates, H = hidden_size, P = proj_size or H)."""

    ih_kernel: Array  # (F, G*H)
    hh_kernel: Array  # (P, G*H)
    ih_bias: Optional[Array] = None  # (G*H,)
    hh_bias: Optional[Array] = None  # (G*H,)
    proj_kernel: Optional[Array] = None  # (H, P), LSTM only


class ConvWeights(NamedTuple):
    """One layer of a convolutional cell, channels-last (HWIO kernels)."""

    ih_kernel: Array  # (kh, kw, C_in, G*H)
    hh_kernel: Array  # (kh, kw, H, G*H)
    ih_bias: Optional[Array] = None  # (G*H,)
    hh_bias: Optional[Array] = None  # (G*H,)


# ----------------------------------------------------------------------------------- updates
# ``update(pre, h, rest) -> (h_full, rest)``: ``pre`` is ``kind.combine(input_gates,
# hidden_gates)``, ``h`` the hidden state entering the step, ``rest`` the carry's other part
# (the LSTM's ``c``; ``()`` otherwise). ``h_full`` is the new hidden state before any output map.


def _sigmoid(x: Array) -> Array:
    """The logistic function through one tanh: XLA:CPU expands ``jax.nn.sigmoid`` to an exp
    and a division, measurably slower in the LSTM loop; equal within rounding."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


def lstm_update(gates: Array, h: Array, c: Array) -> tuple[Array, Array]:
    """torch's LSTM update from pre-activations ``gates`` (..., 4H) split i, f, g, o.

    Returns ``(h, c)``: the new hidden state (before any projection) and cell state.
    """
    del h  # the LSTM reads the previous h only through its gates
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = _sigmoid(f) * c + _sigmoid(i) * jnp.tanh(g)
    return _sigmoid(o) * jnp.tanh(c), c


def gru_update(gates: tuple[Array, Array], h: Array, rest: tuple = ()) -> tuple[Array, tuple]:
    """torch's GRU update from ``(W_i x + b_i, W_h h + b_h)``, each (..., 3H) split r, z, n.

    ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, ``h' = (1 - z) * n + z * h``, computed as
    torch does, ``n + z * (h - n)``.
    """
    from_input, from_hidden = gates
    x_r, x_z, x_n = jnp.split(from_input, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(from_hidden, 3, axis=-1)
    r = _sigmoid(x_r + h_r)
    z = _sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return n + z * (h - n), rest


def rnn_tanh_update(gates: Array, h: Array, rest: tuple = ()) -> tuple[Array, tuple]:
    """torch.nn.RNN's update, ``tanh(W_ih x + b_ih + W_hh h + b_hh)``."""
    del h
    return jnp.tanh(gates), rest


def rnn_relu_update(gates: Array, h: Array, rest: tuple = ()) -> tuple[Array, tuple]:
    """torch.nn.RNN's update with ``nonlinearity='relu'``."""
    del h
    return jax.nn.relu(gates), rest


def _add(from_input, from_hidden):
    # torch adds each bias to its own product: (x W_ih + b_ih) + (h W_hh + b_hh)
    return from_input + from_hidden


def _keep_apart(from_input, from_hidden):
    return from_input, from_hidden


@dataclasses.dataclass(frozen=True)
class CellKind:
    """A cell type: its update and what its carry and parameters look like.

    Arguments:
        name: the kind's name (``parity`` tables use it too).
        gates: G, how many blocks of ``hidden_size`` the input and hidden maps produce.
        update: ``update(pre, h, rest) -> (h_full, rest)`` (see ``lstm_update``).
        combine: how the two maps' outputs meet before the update; linear (the batched
            backward pass transposes it): a sum by default, ``keep_apart`` for the GRU.
        cell_state: the carry is ``LSTMState(h, c)``; otherwise the array ``h`` alone.
    """

    name: str
    gates: int
    update: Callable[[Any, Array, Any], tuple[Array, Any]]
    combine: Callable[[Any, Any], Any] = _add
    cell_state: bool = False

    def split(self, carry: Any) -> tuple[Array, Any]:
        """``carry -> (h, rest)``."""
        return (carry[0], carry[1]) if self.cell_state else (carry, ())

    def join(self, h: Array, rest: Any) -> Any:
        """``(h, rest) -> carry``."""
        return LSTMState(h, rest) if self.cell_state else h


KINDS: dict[str, CellKind] = {
    kind.name: kind
    for kind in (
        CellKind("lstm", 4, lstm_update, cell_state=True),
        CellKind("gru", 3, gru_update, combine=_keep_apart),
        CellKind("rnn_tanh", 1, rnn_tanh_update),
        CellKind("rnn_relu", 1, rnn_relu_update),
    )
}


# ----------------------------------------------------------------------------------- parts


@dataclasses.dataclass(frozen=True)
class CellParts:
    """A cell step split at its linear maps, so a driver can batch them over time.

    One step is ``pre = kind.combine(input_map(w, x), hidden_map(w, h))``, ``(h, rest) =
    kind.update(pre, h, rest)``, ``h = output_map(w, h)``. The maps are affine in the weights
    and in their second argument and act on trailing axes only, so they also apply to a whole
    sequence at once with time folded into the batch: ``scan.scan_direction`` uses that to
    compute the weight and input gradients of all steps as one matmul (or convolution) each,
    after the backward loop instead of inside it.

    Made once per option set (``dense_parts``, ``conv_parts``): hashable, a static argument of
    ``jax.jit``. Called, it is the plain step ``(w, carry, x) -> (carry, y)``.

    Example:
        >>> parts = dense_parts("gru")
        >>> w = DenseWeights(jnp.ones((4, 24)), jnp.ones((8, 24)))
        >>> h, y = parts(w, jnp.zeros((2, 8)), jnp.ones((2, 4)))
        >>> y.shape
        (2, 8)
    """

    kind: CellKind
    input_map: Callable[[Any, Array], Array]  # (w, x (N, ..., F)) -> (N, ..., G*H), ih bias in
    hidden_map: Callable[[Any, Array], Array]  # (w, h (N, ..., P)) -> (N, ..., G*H), hh bias in
    output_map: Optional[Callable[[Any, Array], Array]] = None  # (w, h (.., H)) -> (.., P)

    def step_with_parts(self, weights: Any, carry: Any, x: Array) -> tuple[Any, Any, Array]:
        """One step; also returns the update's input ``pre`` and ``h`` before the output map."""
        h, rest = self.kind.split(carry)
        pre = self.kind.combine(self.input_map(weights, x), self.hidden_map(weights, h))
        h_full, rest = self.kind.update(pre, h, rest)
        h = h_full if self.output_map is None else self.output_map(weights, h_full)
        return self.kind.join(h, rest), pre, h_full

    def __call__(self, weights: Any, carry: Any, x: Array) -> tuple[Any, Array]:
        new_carry, _, _ = self.step_with_parts(weights, carry, x)
        y = self.kind.split(new_carry)[0]
        if type(carry) is tuple:  # a scan over the step needs the carry type it was given
            new_carry = tuple(new_carry)
        return new_carry, y


def _affine(x: Array, kernel: Array, bias: Optional[Array], precision) -> Array:
    y = jnp.dot(x, kernel, precision=precision)
    return y if bias is None else y + bias


def _dense_input(weights: DenseWeights, x: Array, precision=None) -> Array:
    return _affine(x, weights.ih_kernel, weights.ih_bias, precision)


def _dense_hidden(weights: DenseWeights, h: Array, precision=None) -> Array:
    return _affine(h, weights.hh_kernel, weights.hh_bias, precision)


def _dense_projection(weights: DenseWeights, h: Array, precision=None) -> Array:
    return jnp.dot(h, weights.proj_kernel, precision=precision)


def _conv_input(weights: ConvWeights, x: Array, dilation, precision) -> Array:
    return conv_gates(weights.ih_kernel, weights.ih_bias, x, dilation, precision)


def _conv_hidden(weights: ConvWeights, h: Array, dilation, precision) -> Array:
    return conv_gates(weights.hh_kernel, weights.hh_bias, h, dilation, precision)


def _kind(kind: Any) -> CellKind:
    if isinstance(kind, CellKind):
        return kind
    if kind not in KINDS:
        raise ValueError(f"kind must be a CellKind or one of {sorted(KINDS)}, got {kind!r}")
    return KINDS[kind]


@functools.cache
def dense_parts(
    kind: Any = "lstm", precision: PrecisionLike = None, projection: bool = False
) -> CellParts:
    """A dense cell (matmuls) of ``kind`` as ``CellParts``; one object per option set.

    Arguments:
        kind: a ``CellKind``, or a key of ``KINDS``: ``"lstm"``, ``"gru"``, ``"rnn_tanh"``,
            ``"rnn_relu"``.
        precision: matmul precision (``jax.lax.Precision``), None for the backend default.
        projection: apply ``proj_kernel`` to h (torch's LSTM ``proj_size``).
    """
    return CellParts(
        _kind(kind),
        functools.partial(_dense_input, precision=precision),
        functools.partial(_dense_hidden, precision=precision),
        functools.partial(_dense_projection, precision=precision) if projection else None,
    )


@functools.cache
def conv_parts(
    kind: Any = "lstm", dilation: tuple[int, int] = (1, 1), precision: PrecisionLike = None
) -> CellParts:
    """A convolutional cell ('same' convolutions, channels-last) of ``kind`` as ``CellParts``."""
    dilation = tuple(dilation)
    return CellParts(
        _kind(kind),
        functools.partial(_conv_input, dilation=dilation, precision=precision),
        functools.partial(_conv_hidden, dilation=dilation, precision=precision),
    )


# ----------------------------------------------------------------------------------- steps


def lstm_step(
    weights: DenseWeights, carry: LSTMState, x: Array, precision: PrecisionLike = None
) -> tuple[LSTMState, Array]:
    """One torch.nn.LSTM step.

    Arguments:
        weights: the layer's ``DenseWeights`` (``proj_kernel`` set for a projection).
        carry: ``(h, c)``, shapes ``(..., P)`` and ``(..., H)``.
        x: the input, ``(..., F)``.
        precision: matmul precision (``jax.lax.Precision``), None for the backend default.

    Returns:
        ``((h, c), h)``: the new carry (an ``LSTMState``, or a plain tuple if one was given) and
        the step's output (h, projected if so).

    Example:
        >>> w = DenseWeights(jnp.ones((3, 16)), jnp.ones((4, 16)))
        >>> (h, c), y = lstm_step(w, LSTMState(jnp.zeros(4), jnp.zeros(4)), jnp.ones(3))
    """
    projection = weights.proj_kernel is not None
    return dense_parts("lstm", precision, projection)(weights, carry, x)


def gru_step(
    weights: DenseWeights, h: Array, x: Array, precision: PrecisionLike = None
) -> tuple[Array, Array]:
    """One torch.nn.GRU step: returns ``(h, h)``, the new carry and the step's output.

    Example:
        >>> w = DenseWeights(jnp.ones((3, 12)), jnp.ones((4, 12)))
        >>> h, y = gru_step(w, jnp.zeros(4), jnp.ones(3))
    """
    return dense_parts("gru", precision)(weights, h, x)


def rnn_step(
    weights: DenseWeights,
    h: Array,
    x: Array,
    nonlinearity: str = "tanh",
    precision: PrecisionLike = None,
) -> tuple[Array, Array]:
    """One torch.nn.RNN step (``nonlinearity`` ``"tanh"`` or ``"relu"``): ``(h, h)``.

    Example:
        >>> w = DenseWeights(jnp.ones((3, 4)), jnp.ones((4, 4)))
        >>> h, y = rnn_step(w, jnp.zeros(4), jnp.ones(3), nonlinearity="relu")
    """
    return dense_parts(f"rnn_{nonlinearity}", precision)(weights, h, x)


def convlstm_step(
    weights: ConvWeights,
    carry: LSTMState,
    x: Array,
    dilation: tuple[int, int] = (1, 1),
    precision: PrecisionLike = None,
) -> tuple[LSTMState, Array]:
    """One ConvLSTM step: the LSTM update with 'same' convolutions in place of matmuls.

    Arguments:
        weights: the layer's ``ConvWeights``.
        carry: ``(h, c)``, each ``(B, H, W, hidden)``.
        x: the input, ``(B, H, W, C_in)``.
        dilation: the kernels' dilation, a pair.
        precision: convolution precision, None for the backend default.

    Returns:
        ``(LSTMState(h, c), h)``.

    Example:
        >>> w = ConvWeights(jnp.ones((3, 3, 2, 16)), jnp.ones((3, 3, 4, 16)))
        >>> zeros = jnp.zeros((1, 5, 5, 4))
        >>> (h, c), y = convlstm_step(w, (zeros, zeros), jnp.ones((1, 5, 5, 2)))
    """
    return conv_parts("lstm", tuple(dilation), precision)(weights, carry, x)


# ----------------------------------------------------------------------------------- params


def init_bound(hidden_size: int, kernel_size: tuple[int, ...] = ()) -> float:
    """torch's RNN initialisation bound, 1/sqrt(hidden_size); a conv cell's kernel taps count
    in its fan-in (``torch_impl.ConvLSTM2d`` uses the same rule)."""
    return 1.0 / math.sqrt(hidden_size * math.prod(kernel_size))


def dense_param_shapes(
    kind: CellKind, in_features: int, hidden_size: int, proj_size: int = 0, use_bias: bool = True
) -> dict[str, tuple[int, ...]]:
    """The parameter table of one layer-direction of a dense cell: name -> shape."""
    gates = kind.gates * hidden_size
    shapes = {
        "ih_kernel": (in_features, gates),
        "hh_kernel": (proj_size or hidden_size, gates),
    }
    if use_bias:
        shapes.update(ih_bias=(gates,), hh_bias=(gates,))
    if proj_size:
        shapes["proj_kernel"] = (hidden_size, proj_size)
    return shapes


def conv_param_shapes(
    kind: CellKind, in_channels: int, hidden_channels: int, kernel_size: tuple[int, int],
    use_bias: bool = True,
) -> dict[str, tuple[int, ...]]:
    """The parameter table of one layer of a convolutional cell: name -> shape (HWIO)."""
    gates = kind.gates * hidden_channels
    shapes = {
        "ih_kernel": (*kernel_size, in_channels, gates),
        "hh_kernel": (*kernel_size, hidden_channels, gates),
    }
    if use_bias:
        shapes.update(ih_bias=(gates,), hh_bias=(gates,))
    return shapes


def cast_weights(weights, dtype):
    """Casts every parameter of a weights tuple to the computation ``dtype`` (None: unchanged)."""
    if dtype is None:
        return weights
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), weights)


def computation_dtype(dtype, x: Array, weights) -> Any:
    """Flax's rule: the explicit ``dtype``, else the promotion of the input and the params."""
    if dtype is not None:
        return jnp.dtype(dtype)
    leaves = [x] + jax.tree_util.tree_leaves(weights)
    return jnp.result_type(*leaves)
