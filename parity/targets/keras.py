"""Keras 3 (JAX backend) as a target: ``keras.layers.LSTM``, ``GRU``, ``SimpleRNN``,
``ConvLSTM2D`` and the cells ``LSTMCell``, ``GRUCell``, ``SimpleRNNCell``.

Keras needs its JAX backend: importing this module sets ``KERAS_BACKEND=jax`` unless set (it
must come before keras' first import); a layer of keras imported with another backend is a
RuntimeError saying so when it is converted or compared.

Weights, per torch module (one layer; a bidirectional one is a ``keras.layers.Bidirectional(
layer, merge_mode="concat")`` whose forward and backward layers hold ``*_l0`` and
``*_l0_reverse``):

* nn.LSTM / LSTMCell -> ``LSTM`` / ``LSTMCell``: ``kernel (F, 4H)``, ``recurrent_kernel
  (H, 4H)`` in torch's gate order (i, f, c, o), ``bias (4H,) = bias_ih + bias_hh``.
* nn.GRU / GRUCell -> ``GRU`` / ``GRUCell`` with ``reset_after=True``: gates z, r, h (torch's
  r, z, n reordered), ``bias (2, 3H)``: row 0 ``bias_ih``, row 1 ``bias_hh`` (lossless: the
  reset gate multiplies the recurrent n bias, as in torch).
* nn.RNN / RNNCell -> ``SimpleRNN`` / ``SimpleRNNCell`` (tanh or relu), ``bias = bias_ih +
  bias_hh``.
* torch_impl.ConvLSTM2d -> ``ConvLSTM2D(padding="same", data_format="channels_last")``:
  ``kernel (kh, kw, C, 4F)``, ``recurrent_kernel (kh, kw, F, 4F)``, gates i, f, c, o, ``bias =
  bias_ih + bias_hh``. Keras' "same" padding puts the odd pixel of an even kernel at the
  right/bottom, like torch. Keras' ``dilation_rate`` dilates only the input convolution while
  torch_impl dilates both, so a dilated torch module becomes an undilated layer with both
  kernels zero-stuffed to ``dilation * (kernel - 1) + 1`` taps (the same function; its
  ``to_torch`` is an undilated ConvLSTM2d with those kernels). Keras builds a ConvLSTM2D for one
  frame size: the layer from ``to_jax`` is built for 1x1 frames with the cell's frame-size
  check lifted, so it runs on any frame size when given ``initial_state=[h, c]`` (Keras' own
  zero state has the built size); to fix a size, rebuild: ``new =
  keras.layers.ConvLSTM2D.from_config(layer.get_config()); new.build((None, None, H, W, C));
  new.set_weights(layer.get_weights())``.

Activations: Keras' ``"tanh"`` computes in float32 for float64 inputs (``ops.tanh`` casts with
Keras' floatx), so a float64 layer built with the defaults matches torch only to ~1e-7 (outputs
4e-8 to 9e-8 measured for an LSTM and a GRU, 16 units, 20 steps). The
layers built here use ``carryover>tanh``, ``carryover>sigmoid`` and ``carryover>relu``: the
same functions in float32 (and bfloat16) and dtype-preserving in float64, registered with
``keras.saving`` (loading a saved model needs this module imported). They are not Keras' own
objects, so Keras never takes its cuDNN LSTM path for them (the port is the plain scan on every
device). A layer a user builds with the defaults is compared as it is: within the float32 bound
in float32, about 1e-7 off in float64 (over the 1e-12 bound).

Running (``port``): ``layer.stateless_call`` with the trainable variables (a list in
``layer.trainable_variables`` order, each weight found by identity) as the differentiated
variables, batch-major (a time-major torch module's input is transposed), the carry in torch's
order (``[h, c]`` is also Keras'; a Bidirectional takes ``[h_fwd, c_fwd, h_bwd, c_bwd]``),
packed lengths as Keras' ``mask`` with the outputs past each length set to zero (torch's
``pad_packed_sequence``; Keras keeps the state there, as torch does, and its backward layer
starts at each sequence's last step, as torch's reverse direction does). The layer must return
sequences and states (``return_sequences=True, return_state=True``; ``to_jax`` builds it so,
with ``zero_output_for_mask=True``). A layer whose kernels do not fit the torch module is a
ValueError naming the weight and both shapes; other differences (a missing bias, a GRU with
``reset_after=False``) run and are reported by the comparison.

Not expressible (ValueError): ``num_layers > 1``, ``proj_size``, ``time_major=True`` (Keras
layers are batch-major), torch_impl.ConvLSTMCell (Keras exports no ConvLSTM cell); back to
torch: ``go_backwards`` (outside a Bidirectional), GRU ``reset_after=False``, activations other
than tanh (relu for SimpleRNN) and sigmoid, ConvLSTM ``strides``, ``padding="valid"`` and
``dilation_rate``, a Bidirectional's ``merge_mode`` other than ``"concat"`` or a backward
layer unlike its forward one. ``to_torch`` ignores what only matters in training or for the call
(``dropout``, ``recurrent_dropout``, ``stateful``, ``unroll``, regularizers, constraints):
torch's dropout is between layers and a one-layer module has none.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_impl  # noqa: E402

from ..mapping import CONV  # noqa: E402
from . import (  # noqa: E402
    Piece,
    Target,
    apply_table,
    as_is,
    check_one_layer,
    gate_blocks,
    grads_to_torch,
    nest,
    summed,
    table_to_torch,
    transposed,
    unsupported,
)

NAME = "keras"
GRU_ORDER = (1, 0, 2)  # Keras' z, r, h as torch's gate indices (r, z, n)


def _require_jax_backend() -> None:
    backend = keras.backend.backend()
    if backend != "jax":
        raise RuntimeError(
            f"target {NAME!r} needs Keras' JAX backend, but keras was imported with backend "
            f"{backend!r}: set os.environ['KERAS_BACKEND'] = 'jax' before keras is first imported"
        )


# ------------------------------------------------------------------------------ activations


@keras.saving.register_keras_serializable(package="carryover", name="tanh")
def tanh(x):
    """``tanh`` in the input's dtype (Keras' ``"tanh"`` computes float64 in float32)."""
    return jnp.tanh(x)


@keras.saving.register_keras_serializable(package="carryover", name="sigmoid")
def sigmoid(x):
    """``sigmoid`` in the input's dtype (what Keras' ``"sigmoid"`` computes on JAX)."""
    return jax.nn.sigmoid(x)


@keras.saving.register_keras_serializable(package="carryover", name="relu")
def relu(x):
    """``relu`` in the input's dtype."""
    return jax.nn.relu(x)


def _known_activations() -> dict[str, tuple]:
    return {
        "tanh": (tanh, keras.activations.tanh, keras.ops.tanh, jnp.tanh, jax.nn.tanh),
        "sigmoid": (sigmoid, keras.activations.sigmoid, keras.ops.sigmoid, jax.nn.sigmoid),
        "relu": (relu, keras.activations.relu, keras.ops.relu, jax.nn.relu),
    }


def _activation_name(fn: Any) -> str:
    for name, fns in _known_activations().items():
        if any(fn is f for f in fns):
            return name
    return getattr(fn, "__name__", repr(fn))


# ------------------------------------------------------------------------------ the tables

Path = tuple[str, ...]


def _gru_biases(bias_ih: str, bias_hh: str, path: Path) -> Piece:
    """torch's two GRU biases as Keras' ``bias (2, 3H)``, each row in Keras' gate order."""
    rows = [gate_blocks(name, [path], GRU_ORDER, transpose=False) for name in (bias_ih, bias_hh)]

    def to_jax(b_ih, b_hh):
        return (np.stack([rows[0].to_jax(b_ih)[0], rows[1].to_jax(b_hh)[0]]),)

    def to_torch(bias):
        return rows[0].to_torch(bias[0])[0], rows[1].to_torch(bias[1])[0]

    # a permutation and a stack: the adjoint is the inverse
    return Piece((bias_ih, bias_hh), (path,), to_jax, to_torch, to_torch)


def _conv_kernel(torch_name: str, path: Path, dilation: tuple[int, int]) -> Piece:
    """torch's ``(4F, C, kh, kw)`` as Keras' ``(kh, kw, C, 4F)``; for a dilation, zero-stuffed
    to ``d * (k - 1) + 1`` taps (Keras dilates only its input convolution). Back and for
    gradients: the taps at the dilated positions (sub-sampling, the adjoint of stuffing)."""
    dh, dw = dilation

    def to_jax(weight):
        kernel = CONV.to_jax(weight)
        if (dh, dw) == (1, 1):
            return (kernel,)
        kh, kw = kernel.shape[:2]
        stuffed = np.zeros((dh * (kh - 1) + 1, dw * (kw - 1) + 1) + kernel.shape[2:], kernel.dtype)
        stuffed[::dh, ::dw] = kernel
        return (stuffed,)

    def to_torch(kernel):
        return (CONV.to_torch(np.asarray(kernel)[::dh, ::dw]),)

    return Piece((torch_name,), (path,), to_jax, to_torch, to_torch)


def _table(kind: str, suffix: str, bias: bool, dilation: tuple[int, int] = (1, 1),
           prefix: Path = ()) -> list[Piece]:
    """torch names (``weight_ih{suffix}`` ...) <-> the Keras layer's weights (``prefix +
    (kernel,)`` ...)."""
    ih, hh = f"weight_ih{suffix}", f"weight_hh{suffix}"
    biases = (f"bias_ih{suffix}", f"bias_hh{suffix}")
    kernel, recurrent, bias_path = (prefix + (n,) for n in ("kernel", "recurrent_kernel", "bias"))
    if kind.startswith("gru"):
        table = [gate_blocks(ih, [kernel], GRU_ORDER), gate_blocks(hh, [recurrent], GRU_ORDER)]
        return table + ([_gru_biases(*biases, bias_path)] if bias else [])
    if kind == "convlstm":
        table = [_conv_kernel(ih, kernel, dilation), _conv_kernel(hh, recurrent, dilation)]
    else:  # LSTM (Keras' i, f, c, o is torch's order) and RNN
        table = [transposed(ih, kernel), transposed(hh, recurrent)]
    if bias:
        table.append(summed(biases, lambda name: as_is(name, bias_path)))
    return table


def _torch_table(spec, module) -> list[Piece]:
    """The table of a torch module: one layer, or its two directions under ``forward`` and
    ``backward`` (a ``keras.layers.Bidirectional``)."""
    if spec.is_cell:
        return _table(spec.kind, "", module.bias)
    if getattr(module, "bidirectional", False):
        return (_table(spec.kind, "_l0", module.bias, prefix=("forward",))
                + _table(spec.kind, "_l0_reverse", module.bias, prefix=("backward",)))
    dilation = tuple(module.dilation) if spec.kind == "convlstm" else (1, 1)
    return _table(spec.kind, "_l0", module.bias, dilation)


def _at(tree: dict, path: Path) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ------------------------------------------------------------------------------ torch -> Keras


def _layer_classes() -> dict[str, type]:
    return {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "rnn": keras.layers.SimpleRNN,
            "convlstm": keras.layers.ConvLSTM2D, "lstm_cell": keras.layers.LSTMCell,
            "gru_cell": keras.layers.GRUCell, "rnn_cell": keras.layers.SimpleRNNCell}


def _check(spec, module, time_major=None) -> None:
    check_one_layer(spec, module, NAME, spec.kind in _layer_classes())
    if time_major:
        raise unsupported("time_major", NAME, True)


def _weights(layer: Any) -> dict[Path, Any]:
    """The layer's weight variables by path: ``(kernel,)``, ``(recurrent_kernel,)``,
    ``(bias,)``; under ``forward`` / ``backward`` for a Bidirectional."""
    if isinstance(layer, keras.layers.Bidirectional):
        return {(side,) + path: variable
                for side, sub in (("forward", layer.forward_layer),
                                  ("backward", layer.backward_layer))
                for path, variable in _weights(sub).items()}
    cell = getattr(layer, "cell", layer)
    return {(name,): getattr(cell, name) for name in ("kernel", "recurrent_kernel", "bias")
            if getattr(cell, name, None) is not None}


def _build(layer: Any, shape: tuple) -> None:
    """Builds the layer with zeros for weights (they are overwritten; Keras' orthogonal and
    Glorot initializers cost seconds to compile), its initializers then put back as they were
    (its config is that of a layer made with Keras' defaults)."""
    cell = getattr(layer, "cell", layer)
    names = ("kernel_initializer", "recurrent_initializer", "bias_initializer")
    saved = {name: getattr(cell, name) for name in names}
    for name in names:
        setattr(cell, name, keras.initializers.Zeros())
    try:
        layer.build(shape)
    finally:
        for name, value in saved.items():
            setattr(cell, name, value)


def to_jax(spec, module, state, *, time_major=None):
    """``(Keras layer, None)``: a built layer holding the torch weights."""
    _require_jax_backend()
    _check(spec, module, time_major)
    dtype = np.dtype(state["weight_ih" if spec.is_cell else "weight_ih_l0"].dtype).name
    arrays = apply_table(_torch_table(spec, module), state)
    activation = relu if getattr(module, "nonlinearity", "tanh") == "relu" else tanh
    common = dict(activation=activation, use_bias=module.bias, dtype=dtype)
    if not spec.kind.startswith("rnn"):
        common["recurrent_activation"] = sigmoid
    if spec.kind.startswith("gru"):
        common["reset_after"] = True
    if not spec.is_cell:
        common.update(return_sequences=True, return_state=True)
    cls = _layer_classes()[spec.kind]
    if spec.kind == "convlstm":
        kernel_size = arrays["kernel"].shape[:2]
        layer = cls(module.hidden_channels, kernel_size, padding="same",
                    data_format="channels_last", **common)
        _build(layer, (None, None, 1, 1, module.input_channels))
        # weights do not depend on the frame size: lift the cell's check of the built size
        layer.cell.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: module.input_channels})
    elif spec.is_cell:
        layer = cls(module.hidden_size, **common)
        _build(layer, (None, module.input_size))
    else:
        layer = cls(module.hidden_size, zero_output_for_mask=True, **common)
        shape = (None, None, module.input_size)
        if module.bidirectional:  # the backward layer: a copy with go_backwards=True
            layer = keras.layers.Bidirectional(layer, merge_mode="concat", dtype=dtype)
            _build(layer.forward_layer, shape)
            _build(layer.backward_layer, shape)
            layer.build(shape)
        else:
            _build(layer, shape)
    for path, variable in _weights(layer).items():
        variable.assign(_at(arrays, path))
    return layer, None


# ------------------------------------------------------------------------------ Keras -> torch


def _kind_of(layer: Any) -> str:
    if isinstance(layer, keras.layers.Bidirectional):
        kind = _kind_of(layer.forward_layer)
        if kind not in ("lstm", "gru", "rnn"):
            raise unsupported(f"a Bidirectional {type(layer.forward_layer).__name__}", NAME)
        return kind
    for kind, cls in _layer_classes().items():
        if isinstance(layer, cls):
            return kind
    raise TypeError(f"not a supported Keras layer: {type(layer).__name__}")


def _check_layer_options(kind: str, layer: Any, backwards: bool = False) -> None:
    """Options of a Keras layer torch cannot express (ValueError naming them)."""
    if isinstance(layer, keras.layers.Bidirectional):
        if layer.merge_mode != "concat":
            raise unsupported("merge_mode", NAME, layer.merge_mode)
        if _kind_of(layer.backward_layer) != kind:
            raise unsupported("a backward_layer of another kind", NAME)
        _check_layer_options(kind, layer.forward_layer)
        _check_layer_options(kind, layer.backward_layer, backwards=True)
        forward, backward = (_options(kind, sub) for sub in
                             (layer.forward_layer, layer.backward_layer))
        if forward != backward:
            raise unsupported("a backward_layer with other options", NAME,
                              {k: v for k, v in backward.items() if forward[k] != v})
        return
    cell = getattr(layer, "cell", layer)
    if getattr(layer, "go_backwards", False) != backwards:
        raise unsupported("go_backwards", NAME, not backwards)
    if kind.startswith("gru") and not cell.reset_after:
        raise unsupported("reset_after", NAME, False)
    allowed = ("tanh", "relu") if kind.startswith("rnn") else ("tanh",)
    name = _activation_name(cell.activation)
    if name not in allowed:
        raise unsupported("activation", NAME, name)
    if hasattr(cell, "recurrent_activation"):
        name = _activation_name(cell.recurrent_activation)
        if name != "sigmoid":
            raise unsupported("recurrent_activation", NAME, name)
    if kind == "convlstm":
        if tuple(cell.strides) != (1, 1):
            raise unsupported("strides", NAME, tuple(cell.strides))
        if cell.padding != "same":
            raise unsupported("padding", NAME, cell.padding)
        if tuple(cell.dilation_rate) != (1, 1):
            raise ValueError(
                str(unsupported("dilation_rate", NAME, tuple(cell.dilation_rate)))
                + " (Keras dilates only the input convolution, torch_impl.ConvLSTM2d both)"
            )


def _options(kind: str, layer: Any) -> dict:
    """The torch constructor options a Keras layer (not a Bidirectional) stands for."""
    cell = getattr(layer, "cell", layer)
    options = {"bias": bool(cell.use_bias)}
    if kind.startswith("rnn"):
        options["nonlinearity"] = _activation_name(cell.activation)
    return options


def to_torch(layer, variables=None):
    """The torch module (nn.LSTM / GRU / RNN ``batch_first=True``, bidirectional for a
    ``keras.layers.Bidirectional``, torch_impl.ConvLSTM2d ``batch_first=True``, or the cell)
    with the layer's weights; ``variables``: other values for the layer's trainable variables
    (a list in their order), default the layer's own."""
    _require_jax_backend()
    kind = _kind_of(layer)
    _check_layer_options(kind, layer)
    if not getattr(layer, "built", False):
        raise ValueError(f"the Keras {type(layer).__name__} is not built: it has no weights yet")
    bidirectional = isinstance(layer, keras.layers.Bidirectional)
    single = layer.forward_layer if bidirectional else layer
    options = _options(kind, single)
    weights = {path: np.asarray(v.value) for path, v in _weights(layer).items()}
    if variables is not None:
        weights.update(_by_path(layer, variables))
    if kind.endswith("_cell"):
        table = _table(kind, "", options["bias"])
    elif bidirectional:
        table = (_table(kind, "_l0", options["bias"], prefix=("forward",))
                 + _table(kind, "_l0_reverse", options["bias"], prefix=("backward",)))
    else:
        table = _table(kind, "_l0", options["bias"])
    state = table_to_torch(table, nest(weights), f"{NAME} {type(layer).__name__}")
    from ..convert import numpy_to_tensor

    first = next(iter(state.values()))
    options["dtype"] = numpy_to_tensor(np.zeros(0, first.dtype)).dtype
    kernel = weights[("forward", "kernel") if bidirectional else ("kernel",)]
    cell = getattr(single, "cell", single)
    if kind == "convlstm":  # Keras' kernels are (kh, kw, in, out) in either data_format
        module = torch_impl.ConvLSTM2d(kernel.shape[2], cell.filters, tuple(kernel.shape[:2]),
                                       batch_first=True, **options)
    else:
        torch_class = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN,
                       "lstm_cell": torch.nn.LSTMCell, "gru_cell": torch.nn.GRUCell,
                       "rnn_cell": torch.nn.RNNCell}[kind]
        if not kind.endswith("_cell"):
            options.update(batch_first=True, bidirectional=bidirectional)
        module = torch_class(kernel.shape[0], cell.units, **options)
    module.load_state_dict({k: numpy_to_tensor(v) for k, v in state.items()})
    return module


def _by_path(layer: Any, values: Any) -> dict[Path, Any]:
    """Arrays in ``layer.trainable_variables`` order (the port's variables, or gradients) by
    weight path; trainable variables that are no weight of the table are left out."""
    variables = layer.trainable_variables
    if len(values) != len(variables):
        raise ValueError(
            f"expected {len(variables)} arrays (the layer's trainable variables "
            f"{[v.path for v in variables]}), got {len(values)}"
        )
    path_of = {id(v): path for path, v in _weights(layer).items()}
    return {path_of[id(v)]: a for v, a in zip(variables, values) if id(v) in path_of}


# ------------------------------------------------------------------------------ the port


def port(spec, module, layer, variables):
    """Runs the layer (``stateless_call``) from a carry in torch's order."""
    from ..convert import torch_param_arrays
    from ..harness import Port

    _require_jax_backend()
    _check(spec, module)
    kind = _kind_of(layer)
    bidirectional = isinstance(layer, keras.layers.Bidirectional)
    cell_port = kind.endswith("_cell")
    if cell_port != spec.is_cell:
        raise ValueError(
            f"a Keras {type(layer).__name__} cannot run a torch {type(module).__name__}: "
            + ("use the Keras cell" if spec.is_cell else "use the Keras layer, not its cell")
        )
    if bidirectional != bool(getattr(module, "bidirectional", False)):
        raise ValueError(
            f"a Keras {type(layer).__name__} cannot run a torch {type(module).__name__} with "
            f"bidirectional={not bidirectional}: a bidirectional module is a "
            "keras.layers.Bidirectional(merge_mode='concat')"
        )
    if bidirectional and layer.merge_mode != "concat":
        raise unsupported("merge_mode", NAME, layer.merge_mode)
    if kind == "convlstm" and tuple(layer.cell.dilation_rate) != (1, 1):
        _check_layer_options(kind, layer)  # the dilation error
    if not cell_port and not (layer.return_sequences and layer.return_state):
        raise ValueError(
            f"the Keras {type(layer).__name__} must be built with return_sequences=True and "
            f"return_state=True to be compared (got return_sequences={layer.return_sequences}, "
            f"return_state={layer.return_state})"
        )
    table = _torch_table(spec, module)
    torch_arrays = torch_param_arrays(module)
    expected = {path: a.shape for piece in table
                for path, a in zip(piece.paths, piece.to_jax(*(torch_arrays[n]
                                                               for n in piece.torch)))}
    got = _weights(layer)
    for path, shape in expected.items():  # a layer of other sizes cannot run on the inputs
        if path[-1] != "bias" and (path not in got or tuple(got[path].shape) != shape):
            received = tuple(got[path].shape) if path in got else None
            raise ValueError(
                f"the Keras {type(layer).__name__}'s {'/'.join(path)} does not fit the torch "
                f"{type(module).__name__}: expected shape {shape}, received {received}"
            )
    trainable = layer.trainable_variables
    variables = list([v.value for v in trainable] if variables is None else variables)
    others = [v.value for v in layer.non_trainable_variables]
    channels_first = kind == "convlstm" and layer.cell.data_format == "channels_first"
    time_major = spec.is_cell or not module.batch_first
    directions = 2 if bidirectional else 1

    def to_layer(a):  # channels-last frames as the layer takes them
        return jnp.moveaxis(a, -1, -3) if channels_first else a

    def from_layer(a):
        return jnp.moveaxis(a, -3, -1) if channels_first else a

    def run_layer(variables, x, carry, lengths, masks):
        if masks is not None:
            raise ValueError(f"the {NAME} port has one layer: no inter-layer dropout masks")
        batched = x.ndim == 2 + spec.feature_rank
        xs = x if batched else x[None]
        xs = jnp.swapaxes(xs, 0, 1) if (batched and time_major) else xs
        # [h, c] per direction, forward first (Bidirectional's order), batched
        states = [s[d] if batched else s[d][None] for d in range(directions) for s in carry]
        mask = None
        if lengths is not None:
            mask = jnp.arange(xs.shape[1])[None, :] < jnp.asarray(lengths)[:, None]
        outputs, _ = layer.stateless_call(variables, others, to_layer(xs),
                                          initial_state=[to_layer(s) for s in states], mask=mask)
        y, *final = (from_layer(o) for o in outputs)
        if mask is not None:  # torch's pad_packed_sequence: zeros past each length
            y = jnp.where(mask.reshape(mask.shape + (1,) * (y.ndim - 2)), y, jnp.zeros_like(y))
        y = jnp.swapaxes(y, 0, 1) if (batched and time_major) else y
        if not batched:
            y, final = y[0], [s[0] for s in final]
        count = len(carry)
        return y, tuple(jnp.stack(final[k::count]) for k in range(count))

    def run_cell(variables, x, carry, lengths, masks):
        if lengths is not None:
            raise ValueError("cells take no packed lengths")
        batched = x.ndim == 3
        xs = x if batched else x[:, None]
        states = [s if batched else s[None] for s in carry]

        def body(states, xt):
            (h, new), _ = layer.stateless_call(variables, others, xt, states)
            return (list(new) if isinstance(new, (list, tuple)) else [new]), h

        final, ys = jax.lax.scan(body, states, xs)
        if not batched:
            ys, final = ys[:, 0], [s[0] for s in final]
        return ys, tuple(final)

    def grads_as_torch(grads):
        named = _by_path(layer, grads)
        for piece in table:
            for path in piece.paths:
                if path not in named:
                    raise ValueError(f"the Keras layer has no trainable {'/'.join(path)} for "
                                     f"torch's {', '.join(piece.torch)}")
                if np.shape(named[path]) != expected[path]:
                    raise ValueError(f"the Keras layer's {'/'.join(path)} has shape "
                                     f"{np.shape(named[path])}, expected {expected[path]} for "
                                     f"torch's {', '.join(piece.torch)}")
        return grads_to_torch(table, nest({p: np.asarray(g) for p, g in named.items()}),
                              f"{NAME} gradients")

    return Port(run_cell if cell_port else run_layer, grads_as_torch), variables


def _owns(obj: Any) -> bool:
    return isinstance(obj, tuple(_layer_classes().values()) + (keras.layers.Bidirectional,))


TARGET = Target(NAME, "keras", to_jax, to_torch, port, owns=_owns)
