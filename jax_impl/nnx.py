"""Flax NNX modules with torch's semantics: ``LSTM``, ``GRU``, ``RNN``, ``ConvLSTM``, and the
one-step cells ``LSTMCell``, ``GRUCell``, ``RNNCell``, ``ConvLSTMCell``.

The same port as ``jax_impl.linen`` for Flax's recommended API: modules built eagerly, like
torch's, from the input size and an ``nnx.Rngs``, holding their parameters as ``nnx.Param``.

* One description, two APIs: every NNX module holds its Linen twin, ``module.linen`` (an
  unbound ``jax_impl.linen`` module with the same options, no parameters). The twin checks the
  options (the same messages), gives the sizes and parameter tables, and its cell; a call runs
  ``stack.run_sequence`` as the Linen module's call does. Same program, same floats.
* The parameters sit where the Linen module's do: ``nnx.state(module, nnx.Param)`` has the
  paths of Linen's ``variables["params"]`` (``layer_0/ih_kernel``, ``layer_0_reverse/hh_bias``,
  ``layer_1/proj_kernel``, ...; a cell's at top level), so ``parity.mapping`` serves both.
  ``nnx_params_as_linen`` and ``load_linen_params`` convert.
* Initialisation is torch's: every parameter uniform in [-bound, bound] (``cells.init_bound``),
  drawn from the ``'params'`` stream in torch's constructor order (layer by layer, forward
  before reverse; ``ih_kernel``, ``hh_kernel``, ``ih_bias``, ``hh_bias``, ``proj_kernel``).
* Dropout follows NNX: ``deterministic`` (False by default, as ``nnx.Dropout``) switched by
  ``module.eval()`` / ``module.train()`` (or per call), keys from the ``'dropout'`` stream of
  the ``rngs`` given at construction (kept as ``module.rngs``), or from ``rngs=`` at the call.

``jax_impl.Stateful(module)`` streams an NNX sequence module (its state taken with
``nnx.split``); ``make_tbptt_step`` is the truncated-BPTT step for an NNX model and
``nnx.Optimizer``.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_impl.nnx import LSTM, nnx_params_as_linen
    >>> lstm = LSTM(3, 8, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
    >>> y, (h, c) = lstm(jnp.ones((2, 5, 3)))                       # (B, T, F)
    >>> y.shape, h.shape
    ((2, 5, 16), (4, 2, 8))
    >>> sorted(nnx_params_as_linen(lstm))
    ['layer_0', 'layer_0_reverse', 'layer_1', 'layer_1_reverse']
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import linen as _linen
from .cells import ConvWeights, DenseWeights
from .checks import SequenceLayout, check_input, check_int, check_x64, concrete_value
from .sharding import BatchAxis, MeshLike
from .stack import run_sequence
from .training import mse_loss

Array = jax.Array

__all__ = [
    # the modules and cells, with the names (and options) of jax_impl's Linen ones
    "LSTM", "GRU", "RNN", "ConvLSTM", "LSTMCell", "GRUCell", "RNNCell", "ConvLSTMCell",
    # between NNX and Linen; training
    "nnx_params_as_linen", "load_linen_params", "LinenView", "make_tbptt_step",
]


# ------------------------------------------------------------------------------ initialisation


def _host_uniform(key_data: Any, size: int, bound: float, dtype: Any) -> np.ndarray:
    """``size`` values uniform in [-bound, bound], numpy's PCG64 seeded with the key's words."""
    generator = np.random.default_rng([int(word) for word in np.asarray(key_data).ravel()])
    return generator.uniform(-bound, bound, size).astype(np.dtype(dtype))


def torch_uniform_params(
    key: Array, shapes: Mapping[str, tuple[int, ...]], bound: float, dtype: Any
) -> dict[str, Array]:
    """torch's RNN initialisation for one parameter table: each array uniform in [-bound, bound].

    All the table's values are one draw of numpy's generator (PCG64, float64, then cast to
    ``dtype``) seeded with ``key``'s data, cut into the shapes in the table's order: no JAX
    program to compile per shape (``jax.random.uniform`` compiles one per shape and dtype,
    most of an eager construction's time). Under a trace (``nnx.eval_shape``, a jitted
    constructor) the same draw runs as a ``jax.pure_callback``, so the values do not depend
    on how the module is built.

    Arguments:
        key: a PRNG key.
        shapes: name -> shape, in the order to draw (``cells.dense_param_shapes``).
        bound: the half-width, ``cells.init_bound(...)``.
        dtype: the parameters' dtype.

    Returns:
        name -> array.

    Example:
        >>> import jax
        >>> shapes = {"w": (3, 4), "b": (4,)}
        >>> params = torch_uniform_params(jax.random.key(0), shapes, 0.5, "float32")
        >>> params["w"].shape, bool(abs(params["w"]).max() <= 0.5)
        ((3, 4), True)
    """
    sizes = [math.prod(shape) for shape in shapes.values()]
    dtype = jnp.dtype(dtype)
    key_data = jax.random.key_data(key)
    host_key = concrete_value(key_data)
    if host_key is not None:  # numpy slices, then one transfer per parameter
        flat = _host_uniform(host_key, sum(sizes), bound, dtype)
    else:  # traced: the same draw on the host
        flat = jax.pure_callback(
            functools.partial(_host_uniform, size=sum(sizes), bound=bound, dtype=dtype),
            jax.ShapeDtypeStruct((sum(sizes),), dtype), key_data, vmap_method="sequential",
        )
    params, start = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes):
        params[name] = jnp.asarray(flat[start : start + size].reshape(shape))
        start += size
    return params


def _params_key(rngs: Any, owner: str) -> Array:
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"{owner} draws its parameters from rngs, an nnx.Rngs: pass rngs=nnx.Rngs(0) "
            f"(or nnx.Rngs(params=0, dropout=1)), got {type(rngs).__name__}"
        )
    return rngs.params()


def _check_features(x: Any, expected: int, what: str, unit: str, argument: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "ndim") or x.ndim < 1:
        raise TypeError(f"{what} input must be an array, got {type(x).__name__}")
    if x.shape[-1] != expected:
        raise ValueError(
            f"{what} input has {x.shape[-1]} {unit}, expected {argument} {expected}"
        )


def _option(name: str) -> property:
    """A read-only view of the Linen twin's field ``name``."""
    return property(lambda self: getattr(self.linen, name), doc=f"``{name}`` (``linen``'s).")


class _TorchConstructor:
    """Builds an NNX module from torch's constructor arguments, declared once per class.

    A subclass names its Linen twin (``_linen_type``) and torch's positional arguments after
    the input size (``_positional``; the first ``_required`` of them have no default). Every
    other field of the twin is a keyword-only argument with the twin's default, and a
    read-only attribute (``module.hidden_size`` ...). ``inspect.signature`` / ``help`` show
    the resulting signature, e.g. ``LSTM(input_size, hidden_size, num_layers=1, *,
    use_bias=True, ..., rngs)``; a wrong argument is Python's own TypeError, with the class
    name.
    """

    _linen_type: type
    _positional: tuple[str, ...] = ("hidden_size",)
    _required = 1
    _unit, _input_argument = "features", "input_size"
    # keyword-only arguments of the NNX module itself (after the twin's)
    _own_arguments: tuple[inspect.Parameter, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_linen_type" not in vars(cls):
            return
        # the twin's own fields first, then those its base declares keyword-only (dtype, ...)
        fields = {
            f.name: f for f in sorted(dataclasses.fields(cls._linen_type),
                                      key=lambda f: f.kw_only is True)
            if f.name not in ("parent", "name")
        }
        parameters = [inspect.Parameter(
            cls._input_argument, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="int"
        )]
        for index, name in enumerate(cls._positional):
            default = inspect.Parameter.empty if index < cls._required else fields[name].default
            parameters.append(inspect.Parameter(
                name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                annotation=fields[name].type,
            ))
        parameters += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                              annotation=field.type)
            for name, field in fields.items() if name not in cls._positional
        ]
        parameters += list(cls._own_arguments) + [
            inspect.Parameter("rngs", inspect.Parameter.KEYWORD_ONLY, annotation="nnx.Rngs")
        ]
        cls.__signature__ = inspect.Signature(parameters)
        for name in fields:
            if not hasattr(cls, name):
                setattr(cls, name, _option(name))
        if cls._input_argument != "input_size":
            setattr(cls, cls._input_argument, property(lambda self: self.input_size))

    def _bind(self, args: tuple, kwargs: dict) -> tuple[Any, int, dict]:
        """``(linen twin, input size, own arguments)`` from a constructor call."""
        cls = type(self)
        try:
            arguments = cls.__signature__.bind(*args, **kwargs).arguments
        except TypeError as error:
            raise TypeError(f"{cls.__name__}(): {error}") from None
        input_size = arguments.pop(cls._input_argument)
        own = {p.name: arguments.pop(p.name, p.default)
               for p in cls._own_arguments + (cls.__signature__.parameters["rngs"],)}
        return cls._linen_type(**arguments, parent=None), input_size, own


# ------------------------------------------------------------------------------ parameters


class _Layer(nnx.Module):
    """One layer-direction's parameters (``layer_{k}[_reverse]``): an ``nnx.Param`` per entry
    of its table; a parameter the options leave out (no bias, no projection) is no attribute."""

    def __init__(self, values: Mapping[str, Array]):
        for name, value in values.items():
            setattr(self, name, nnx.Param(value))

    def weights(self, weights_type: type) -> Any:
        """The layer's ``DenseWeights`` / ``ConvWeights`` (absent parameters None)."""
        return _weights(self, weights_type)


def _weights(module: nnx.Module, weights_type: type) -> Any:
    return weights_type(**{
        name: getattr(module, name)[...]
        for name in weights_type._fields if hasattr(module, name)
    })


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(tree, Mapping):
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, prefix + (str(key),)))
        return flat
    return {prefix: tree}


def nnx_params_as_linen(module: nnx.Module) -> dict:
    """The module's parameters as the Linen module's ``variables["params"]``: a nested dict.

    Arguments:
        module: a ``jax_impl.nnx`` module (or any NNX module: its ``nnx.Param`` state).

    Returns:
        A plain nested dict of arrays, e.g. ``{"layer_0": {"ih_kernel": ..., ...}, ...}``;
        ``module.linen.apply({"params": ...}, x)`` computes what ``module(x)`` does.

    Example:
        >>> from flax import nnx
        >>> from jax_impl.nnx import GRU
        >>> params = nnx_params_as_linen(GRU(4, 8, use_bias=False, rngs=nnx.Rngs(0)))
        >>> sorted(params["layer_0"])
        ['hh_kernel', 'ih_kernel']
    """
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def load_linen_params(module: nnx.Module, params: Mapping) -> None:
    """Sets the module's ``nnx.Param`` values from a Linen-style params dict, in place.

    Every path of the module must be given, with the shape it has; nothing else may be. The
    arrays are stored as given (dtype included), as Linen's ``apply`` would use them.

    Arguments:
        module: a ``jax_impl.nnx`` module.
        params: ``variables["params"]`` of the Linen twin (a ``{"params": ...}`` dict is
            unwrapped), nested dicts of arrays.

    Raises:
        ValueError: a path missing, unknown, or of another shape, naming the path, the
            expected and the received shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import LSTM
        >>> lstm = LSTM(4, 8, rngs=nnx.Rngs(0))
        >>> variables = lstm.linen.init(jax.random.key(1), jnp.ones((2, 3, 4)))
        >>> load_linen_params(lstm, variables)
    """
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict of arrays, got {type(params).__name__}")
    expected = {
        path: tuple(value.shape) for path, value in _flatten(nnx_params_as_linen(module)).items()
    }
    if set(params) == {"params"} and not any(path[0] == "params" for path in expected):
        params = params["params"]
    given = _flatten(params)
    check_x64(list(given.values()), "params")
    owner = type(module).__name__
    for path in sorted(expected.keys() - given.keys()):
        raise ValueError(
            f"params lack {'/'.join(path)} (expected shape {expected[path]}) that {owner} has"
        )
    for path in sorted(given.keys() - expected.keys()):
        raise ValueError(f"params hold {'/'.join(path)}, which {owner} has no parameter for")
    for path, value in given.items():
        shape = tuple(getattr(value, "shape", np.shape(value)))
        if shape != expected[path]:
            raise ValueError(
                f"parameter {'/'.join(path)} has shape {shape}, expected {expected[path]}"
            )
    for path, value in given.items():
        node = module
        for name in path:
            node = getattr(node, name)
        node.set_value(jnp.asarray(value))


# ------------------------------------------------------------------------------ sequences


_CALL_DOC = """
        Arguments:
            x: ``(B, T, *features)``, ``(T, B, ...)`` when time_major, or unbatched
                ``(T, ...)``; features ``(F,)`` (``input_size``) or ``(H, W, C)``.
            carry: in torch's layout (``initialize_carry``); None for zeros.
            deterministic: overrides ``self.deterministic`` for this call (None: keep it).
            rngs: for this call's dropout: an ``nnx.Rngs`` (its ``'dropout'`` stream), an
                ``nnx.RngStream`` or a key; None uses ``self.rngs``.
            seq_lengths: ``(B,)`` valid steps per row: torch's packed-sequence semantics.
            reset: bools in the input's layout (``(B, T)``, ``(T, B)`` when time_major,
                ``(T,)`` unbatched): zero the carry before each marked step.
            dropout_masks: optional keep masks, one per gap between layers, each shaped like
                that layer's output in the input's layout; used instead of a random draw when
                dropout is on (parity).
            mesh, batch_axis: run data-parallel, as the Linen module's call.

        Returns:
            ``(y, carry)``: y ``(..., D*H_out)`` in the input's layout, the final carry.
"""


class _Recurrent(_TorchConstructor, nnx.Module):
    """What the NNX sequence modules share: the parameters, built eagerly, and the call.

    ``linen`` is the unbound Linen module with the same options (sizes, checks, cell).
    """

    _weights_type: type = DenseWeights
    _own_arguments = (inspect.Parameter(
        "deterministic", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool
    ),)

    def __init__(self, *args: Any, **kwargs: Any):
        linen, input_size, own = self._bind(args, kwargs)
        self._build(linen, input_size, own["deterministic"], own["rngs"])

    def _build(self, linen: Any, input_size: int, deterministic: bool, rngs: Any) -> None:
        check_int(input_size, self._input_argument, 1)
        self.linen = linen
        self.input_size = input_size
        self.deterministic = deterministic
        config = linen._config()
        in_features = input_size
        for layer in range(config.num_layers):
            for direction in range(config.num_directions):
                shapes, bound, _ = linen._layer_shapes(layer, in_features)
                key = _params_key(rngs, type(self).__name__)
                name = f"layer_{layer}" + ("_reverse" if direction else "")
                setattr(self, name, _Layer(
                    torch_uniform_params(key, shapes, bound, linen.param_dtype)
                ))
            in_features = config.num_directions * config.output
        self.rngs = nnx.data(None)
        if config.dropout > 0.0 and config.num_layers > 1:
            # as nnx.Dropout: a stream of its own; with no 'dropout' (nor default) stream, a
            # call must bring one
            with contextlib.suppress(KeyError):
                self.rngs = rngs["dropout"].fork()

    # -- the Linen module's interface ------------------------------------------------

    @property
    def feature_rank(self) -> int:
        """Trailing feature axes of an input step: 1 (dense), 3 (convolutional, H W C)."""
        return self.linen.feature_rank

    @property
    def num_directions(self) -> int:
        return self.linen.num_directions

    def carry_shapes(self, batch_shape: tuple[int, ...]) -> Any:
        """The carry's shapes for ``batch_shape`` (``(B,)``, ``(B, H, W)``, or without B)."""
        return self.linen.carry_shapes(tuple(batch_shape))

    def initialize_carry(self, batch_shape: tuple[int, ...] = (), dtype=None) -> Any:
        """A zero carry in torch's layout for ``batch_shape``."""
        return self.linen.initialize_carry(tuple(batch_shape), dtype)

    def set_view(self, deterministic: Optional[bool] = None) -> None:
        """For ``nnx.view``: ``deterministic=True`` turns dropout off."""
        if deterministic is not None:
            self.deterministic = deterministic

    # -- the call ---------------------------------------------------------------------

    def _layer_weights(self) -> list[list[Any]]:
        config = self.linen._config()
        return [
            [
                getattr(self, f"layer_{layer}" + ("_reverse" if d else "")).weights(
                    self._weights_type
                )
                for d in range(config.num_directions)
            ]
            for layer in range(config.num_layers)
        ]

    def _dropout_key(self, rngs: Any) -> Array:
        rngs = self.rngs if rngs is None else rngs
        if isinstance(rngs, nnx.Rngs):
            try:
                rngs = rngs["dropout"]
            except KeyError:
                rngs = None
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        if isinstance(rngs, jax.Array):
            return rngs
        name = type(self).__name__
        raise ValueError(
            f"{name} has dropout={self.linen.dropout} and is training (deterministic=False) "
            f"but has no 'dropout' rng stream: build it with rngs=nnx.Rngs(params=0, "
            f"dropout=1) (or nnx.Rngs(0)), pass rngs= to the call, or turn dropout off with "
            f".eval() or deterministic=True"
        )

    def __call__(
        self,
        x: Array,
        carry: Any = None,
        *,
        deterministic: Optional[bool] = None,  # NNX's mode and rngs first; then Linen's options
        rngs: Any = None,
        seq_lengths: Optional[Array] = None,
        reset: Optional[Array] = None,
        dropout_masks: Optional[Sequence[Array]] = None,
        mesh: Optional[MeshLike] = None,
        batch_axis: BatchAxis = "batch",
    ) -> tuple[Array, Any]:
        config = self.linen._config()
        name = type(self).__name__
        x = check_input(x, (1 + config.feature_rank, 2 + config.feature_rank), name)
        _check_features(x, self.input_size, name, self._unit, self._input_argument)
        layout = SequenceLayout(x, self.time_major, config.feature_rank)
        if deterministic is None:
            deterministic = self.deterministic
        dropping = not deterministic and config.dropout > 0.0 and config.num_layers > 1
        return run_sequence(
            config, self.linen._cell(), self._layer_weights(), x, carry, layout,
            seq_lengths=seq_lengths, reset=reset,
            dropout_key=self._dropout_key(rngs) if dropping and dropout_masks is None else None,
            dropout_masks=dropout_masks if dropping else None,
            mesh=mesh, batch_axis=batch_axis,
        )

    __call__.__doc__ = "Runs the stack over a sequence.\n" + _CALL_DOC


class _DenseRecurrent(_Recurrent):
    @property
    def output_size(self) -> int:
        """Features of h (and of each direction's output): P if proj_size else H."""
        return self.linen.output_size


class LSTM(_DenseRecurrent):
    """torch.nn.LSTM as an NNX module: layers, bidirectional, proj_size, dropout, packed
    lengths, resets; ``jax_impl.linen.LSTM``'s math and parameter paths.

    Arguments:
        input_size: F, features of the input (checked at each call).
        hidden_size: H, the cell size.
        num_layers: stacked layers.
        use_bias: torch's ``bias``: two biases per layer, ``ih_bias`` and ``hh_bias``.
        dropout: inter-layer dropout rate (not after the last layer), while ``deterministic``
            is False (``train()``), keys from the ``'dropout'`` stream.
        bidirectional: a reverse direction per layer, outputs concatenated forward first.
        proj_size: P > 0 projects h to P features (torch's proj_size); 0 for none.
        time_major: input ``(T, B, F)`` instead of ``(B, T, F)`` (torch's ``batch_first=False``).
        dtype: computation dtype; None promotes input and parameters (Flax's rule).
        param_dtype: parameter dtype.
        precision: matmul precision; ``"highest"`` for full float32 on GPU/TPU.
        unroll: time steps per scan iteration (speed only, same result).
        backward: the gradient path, ``"batched"``, ``"autodiff"`` or ``"remat"`` (see
            ``jax_impl.LSTM``). Same values.
        deterministic: True turns dropout off; ``eval()`` / ``train()`` set it.
        rngs: an ``nnx.Rngs``: its ``'params'`` stream draws the parameters, its
            ``'dropout'`` stream (kept as ``self.rngs``) the dropout masks.

    Parameters: ``layer_{k}`` (and ``layer_{k}_reverse``) hold ``ih_kernel`` ``(F_k, 4H)``,
    ``hh_kernel`` ``(H_out, 4H)``, ``ih_bias``, ``hh_bias`` ``(4H,)``, ``proj_kernel``
    ``(H, P)``, each uniform in ``±1/sqrt(H)``. The carry is ``LSTMState(h, c)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import LSTM
        >>> lstm = LSTM(16, 64, num_layers=2, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((8, 10, 16))                                  # (B, T, F)
        >>> y, (h, c) = lstm(x)
        >>> y.shape, h.shape
        ((8, 10, 64), (2, 8, 64))
        >>> y2, carry = lstm(x, (h, c))                                 # continue the stream
        >>> y3, _ = lstm(x, seq_lengths=jnp.array([10, 5, 1, 0, 7, 9, 3, 2]))
    """

    _linen_type = _linen.LSTM
    _positional = ("hidden_size", "num_layers")


class GRU(_DenseRecurrent):
    """torch.nn.GRU as an NNX module: every option ``LSTM`` has except proj_size.

    ``jax_impl.linen.GRU``'s math (gates r, z, n; the reset gate after the hidden matmul) and
    parameter paths, 3H in place of 4H. The carry is one array ``h``, ``(L*D, B, H)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import GRU
        >>> gru = GRU(8, 32, num_layers=2, bidirectional=True, rngs=nnx.Rngs(0))
        >>> y, h = gru(jnp.ones((4, 10, 8)))
        >>> y.shape, h.shape
        ((4, 10, 64), (4, 4, 32))
    """

    _linen_type = _linen.GRU
    _positional = ("hidden_size", "num_layers")


class RNN(_DenseRecurrent):
    """torch.nn.RNN (the Elman network) as an NNX module; not ``flax.nnx.RNN``, which drives
    a cell. ``nonlinearity`` ``"tanh"`` or ``"relu"``; every option ``GRU`` has.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import RNN
        >>> rnn = RNN(8, 16, nonlinearity="relu", rngs=nnx.Rngs(0))
        >>> y, h = rnn(jnp.ones((4, 10, 8)))
        >>> h.shape
        (1, 4, 16)
    """

    _linen_type = _linen.RNN
    _positional = ("hidden_size", "num_layers")


class ConvLSTM(_Recurrent):
    """A stack of ConvLSTM layers as an NNX module, channels-last, with
    ``jax_impl.linen.ConvLSTM``'s (and torch_impl.ConvLSTM2d's) semantics.

    Arguments:
        input_channels: C, channels of the input (checked at each call).
        hidden_channels: channels of h and c.
        kernel_size: int or pair; 'same' zero padding by torch's rule (even kernels too).
        num_layers: stacked layers.
        use_bias, dilation, dropout, time_major, dtype, param_dtype, precision, unroll,
            backward, deterministic, rngs: as for ``LSTM`` (dilation: int or pair).

    Parameters: ``layer_{k}`` holds ``ih_kernel`` ``(kh, kw, C_k, 4H)``, ``hh_kernel``
    ``(kh, kw, H, 4H)``, ``ih_bias``, ``hh_bias`` ``(4H,)``, uniform in
    ``±1/sqrt(H * kh * kw)``. The input is ``(B, T, H, W, C)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import ConvLSTM
        >>> model = ConvLSTM(3, 16, 3, num_layers=2, rngs=nnx.Rngs(0))
        >>> y, (h, c) = model(jnp.ones((2, 4, 8, 8, 3)))                # (B, T, H, W, C)
        >>> y.shape, h.shape
        ((2, 4, 8, 8, 16), (2, 2, 8, 8, 16))
    """

    _weights_type = ConvWeights
    _unit, _input_argument = "channels", "input_channels"

    _linen_type = _linen.ConvLSTM
    _positional = ("hidden_channels", "kernel_size", "num_layers")
    _required = 2


# ------------------------------------------------------------------------------ cells


class _Cell(_TorchConstructor, nnx.RNNCellBase):
    """A one-step cell: ``cell(carry, x) -> (carry, y)``; drives with ``jax.lax.scan``,
    ``nnx.scan`` or ``flax.nnx.RNN``. ``linen`` is the Linen cell with the same options."""

    def __init__(self, *args: Any, **kwargs: Any):
        linen, input_size, own = self._bind(args, kwargs)
        self._build(linen, input_size, own["rngs"])

    def _build(self, linen: Any, input_size: int, rngs: Any) -> None:
        check_int(input_size, self._input_argument, 1)
        self.linen = linen
        self.input_size = input_size
        key = _params_key(rngs, type(self).__name__)
        params = torch_uniform_params(
            key, linen._shapes(input_size), linen._bound(), linen.param_dtype
        )
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))

    def __call__(self, carry: Any, x: Array) -> tuple[Any, Array]:
        """One step: ``(carry, x) -> (carry, y)``; the carry keeps the type it was given
        (``LSTMState``, or a plain tuple ``(h, c)``)."""
        _check_features(x, self.input_size, type(self).__name__, self._unit,
                        self._input_argument)
        return self.linen._step(_weights(self, self.linen._weights_type), carry, x)

    def initialize_carry(self, input_shape: tuple[int, ...], rngs: Any = None) -> Any:
        """Zeros (as torch) for an input of ``input_shape`` (``rngs`` unused, accepted for
        ``flax.nnx.RNN``)."""
        del rngs
        return self.linen.initialize_carry(None, tuple(input_shape))

    @property
    def num_feature_axes(self) -> int:
        return self.linen.num_feature_axes


class LSTMCell(_Cell):
    """One torch.nn.LSTMCell step (with torch.nn.LSTM's ``proj_size``), carry ``LSTMState(h, c)``.

    Arguments:
        input_size: F.
        hidden_size: H.
        use_bias: keep torch's two biases.
        proj_size: P > 0 projects h to P features; 0 for none.
        dtype, param_dtype, precision, rngs: as for ``LSTM``.

    Parameters ``ih_kernel``, ``hh_kernel``, ``ih_bias``, ``hh_bias``, ``proj_kernel`` at top
    level, as ``jax_impl.linen.LSTMCell``'s.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import LSTMCell
        >>> cell = LSTMCell(16, 32, rngs=nnx.Rngs(0))
        >>> carry = cell.initialize_carry((8, 16))                      # h, c: (8, 32)
        >>> carry, y = cell(carry, jnp.ones((8, 16)))
        >>> y.shape
        (8, 32)
    """

    _linen_type = _linen.LSTMCell


class GRUCell(_Cell):
    """One torch.nn.GRUCell step, carry ``h``; see ``GRU`` for the math.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import GRUCell
        >>> rnn = nnx.RNN(GRUCell(16, 32, rngs=nnx.Rngs(0)))              # Flax's own driver
        >>> rnn(jnp.ones((8, 10, 16))).shape                            # (B, T, F) -> (B, T, H)
        (8, 10, 32)
    """

    _linen_type = _linen.GRUCell


class RNNCell(_Cell):
    """One torch.nn.RNNCell step (``nonlinearity`` ``"tanh"`` or ``"relu"``), carry ``h``.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from jax_impl.nnx import RNNCell
        >>> cell = RNNCell(16, 32, nonlinearity="relu", rngs=nnx.Rngs(0))
        >>> xs = jax.numpy.ones((10, 8, 16))                            # (T, B, F)
        >>> h, ys = jax.lax.scan(cell, cell.initialize_carry((8, 16)), xs)
        >>> h.shape, ys.shape
        ((8, 32), (10, 8, 32))
    """

    _linen_type = _linen.RNNCell


class ConvLSTMCell(_Cell):
    """One ConvLSTM step, channels-last, carry ``LSTMState(h, c)`` each ``(B, H, W, hidden)``.

    Arguments:
        input_channels: C.
        hidden_channels: channels of h and c.
        kernel_size: int or pair.
        use_bias, dilation, dtype, param_dtype, precision, rngs: as for ``ConvLSTM``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import ConvLSTMCell
        >>> cell = ConvLSTMCell(3, 16, 3, rngs=nnx.Rngs(0))
        >>> carry = cell.initialize_carry((2, 8, 8, 3))
        >>> carry, y = cell(carry, jnp.ones((2, 8, 8, 3)))
        >>> y.shape
        (2, 8, 8, 16)
    """

    _unit, _input_argument = "channels", "input_channels"

    _linen_type = _linen.ConvLSTMCell
    _positional = ("hidden_channels", "kernel_size")
    _required = 2


# ------------------------------------------------------------------------------ Linen's view


class LinenView:
    """An NNX sequence module seen through Linen's functional interface, for code written
    against ``module.apply(variables, x, carry, **kwargs)`` (``jax_impl.Stateful``).

    ``apply(state, x, carry, **kwargs)`` merges ``graphdef`` with ``state`` and calls the
    module with dropout off; ``time_major``, ``feature_rank``, ``carry_shapes`` and
    ``initialize_carry`` are the module's.

    Arguments:
        module: a ``jax_impl.nnx`` LSTM, GRU, RNN or ConvLSTM; ``nnx.split`` takes its state
            now (``state``): later changes to the module are not seen.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jax_impl.nnx import GRU, LinenView
        >>> view = LinenView(GRU(3, 8, rngs=nnx.Rngs(0)))
        >>> y, h = view.apply(view.state, jnp.ones((2, 5, 3)))
        >>> h.shape
        (1, 2, 8)
    """

    def __init__(self, module: nnx.Module):
        if not isinstance(module, _Recurrent):
            raise TypeError(
                f"Stateful and LinenView need a jax_impl.nnx LSTM, GRU, RNN or ConvLSTM, got "
                f"{type(module).__name__}"
            )
        self.graphdef, self.state = nnx.split(module)
        self.linen = module.linen
        self.time_major = module.time_major
        self.feature_rank = module.feature_rank

    def carry_shapes(self, batch_shape: tuple[int, ...]) -> Any:
        return self.linen.carry_shapes(tuple(batch_shape))

    def initialize_carry(self, batch_shape: tuple[int, ...] = (), dtype=None) -> Any:
        return self.linen.initialize_carry(tuple(batch_shape), dtype)

    def apply(self, state: Any, x: Array, carry: Any = None, **kwargs) -> tuple[Array, Any]:
        """``module(x, carry, deterministic=True, **kwargs)`` with ``state``."""
        return nnx.merge(self.graphdef, state)(x, carry, deterministic=True, **kwargs)


# ------------------------------------------------------------------------------ training


def make_tbptt_step(
    loss_fn: Callable[[Array, Array], Array] = mse_loss, *, jit: bool = True
) -> Callable[..., tuple[Any, Array]]:
    """One truncated-BPTT training step per chunk for an NNX model and an ``nnx.Optimizer``.

    The NNX form of ``jax_impl.make_tbptt_step``: the model and the optimizer are updated in
    place, the carry passed along.

    Arguments:
        loss_fn: ``loss_fn(y_pred, y_target) -> scalar``; default mean squared error
            (``jax_impl.mse_loss``, torch's ``F.mse_loss``).
        jit: return the step under ``nnx.jit`` (default), or the plain function.

    Returns:
        ``step(model, optimizer, carry, x, y) -> (carry, loss)``. ``model(x, carry)`` must
        return ``(y_pred, carry)`` (a ``jax_impl.nnx`` sequence module, or your own model
        around one); ``optimizer`` an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``. The incoming
        ``carry`` is cut from the graph (``stop_gradient``: gradients flow through this chunk
        only) and donated: do not read it after the call. ``carry=None`` starts from zeros.
        Dropout runs as the model's mode says (``model.train()`` / ``model.eval()``), with its
        own rng streams.

    Example:
        >>> import jax.numpy as jnp
        >>> import optax
        >>> from flax import nnx
        >>> from jax_impl.nnx import LSTM, make_tbptt_step
        >>> model = LSTM(3, 16, rngs=nnx.Rngs(0))
        >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        >>> step = make_tbptt_step()
        >>> carry = model.initialize_carry((4,))
        >>> for x, y in [(jnp.ones((4, 8, 3)), jnp.zeros((4, 8, 16)))] * 2:
        ...     carry, loss = step(model, optimizer, carry, x, y)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")

    def step(model, optimizer, carry, x, y):
        carry = jax.lax.stop_gradient(carry)  # truncated BPTT: the chunk boundary cuts the graph

        def objective(model):
            out, new_carry = model(x, carry)
            return loss_fn(out, y), new_carry

        (loss, new_carry), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        optimizer.update(model, grads)
        return new_carry, loss

    return nnx.jit(step, donate_argnums=(2,)) if jit else step
