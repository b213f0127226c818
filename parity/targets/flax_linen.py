"""Flax Linen's own recurrent modules as a target: ``flax.linen.RNN`` over a stock cell.

Which torch module becomes which Flax module (one layer; ``time_major = not batch_first``
unless ``to_jax(time_major=...)`` says otherwise):

* nn.LSTM -> ``nn.RNN(nn.OptimizedLSTMCell(H))``; nn.LSTMCell -> the bare cell. ``ii if ig io``
  hold ``weight_ih``'s gate blocks (kernels, no bias), ``hi hf hg ho`` ``weight_hh``'s with
  ``bias_ih + bias_hh`` (summed) as their biases. ``nn.LSTMCell`` has the same parameters and
  is accepted everywhere ``OptimizedLSTMCell`` is.
* nn.GRU / nn.GRUCell -> ``nn.GRUCell``: ``ir iz in`` (kernel, bias) and ``hr hz`` (kernel)
  and ``hn`` (kernel, bias): the r and z biases summed into ``ir`` / ``iz``, ``b_in`` in
  ``in``, ``b_hn`` in ``hn`` (the reset gate multiplies it, so it stays apart).
* nn.RNN / nn.RNNCell -> ``nn.SimpleCell``: ``i`` (kernel, the summed bias), ``h`` (kernel);
  ``nonlinearity='relu'`` is ``activation_fn=jax.nn.relu``.
* torch_impl.ConvLSTM2d / ConvLSTMCell -> ``nn.ConvLSTMCell(H, kernel_size)``: ``ih`` and
  ``hh`` convolutions (HWIO kernels, a bias each) in the gate order i, g, f, o; the cell adds
  1 to the forget gate, so ``ih``'s forget bias holds torch's minus 1 (exact to one rounding).
  Its 'SAME' padding is torch_impl's rule, even kernels included; it has no dilation, and
  without a bias its +1 cannot be cancelled (``bias=False``: unsupported).
* ``bidirectional=True`` -> ``nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))`` (its default
  ``merge_fn`` concatenates forward then backward, torch's layout).

Carries: Flax's LSTM carry is ``(c, h)``, torch's ``(h, c)``; a Bidirectional carry is
``(forward carry, backward carry)``. The port converts from and to torch's order and adds or
drops torch's layer axis. Packed sequences: ``seq_lengths`` go to Flax's RNN, which returns the
carry of each row's last valid step and (for the backward direction) reverses each row within
its length, as torch's packed sequences do; Flax leaves garbage in the padded outputs, which
the port sets to zero (torch's ``pad_packed_sequence``).

Conversions keep every value except the summed biases (back in torch: the sum in ``bias_ih``
and zeros in ``bias_hh``: equal as a function) and the shifted ConvLSTM forget bias. Flax's
LSTM, GRU and SimpleCell always have biases: a ``bias=False`` torch module gets zero biases and
comes back with ``bias=True`` (zeros). ``to_torch`` of a ConvLSTMCell with ``use_bias=False``
gives a torch_impl module whose forget bias is 1, the cell's +1.

Not expressible (a ValueError naming the option): ``num_layers > 1`` (so inter-layer dropout),
``proj_size``, ConvLSTM ``dilation != 1`` and ``bias=False``.

``parity.targets.flax_nnx`` reuses this module's tables (``table``) and port logic with NNX's
own paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.linen import recurrent

import torch_impl

from ..convert import numpy_to_tensor, torch_param_arrays
from . import (
    Piece,
    Target,
    apply_table,
    check_one_layer,
    gate_blocks,
    grads_to_torch,
    shifted,
    summed,
    table_to_torch,
    unsupported,
)

NAME = "flax.linen"

Path = tuple[str, ...]
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "convlstm": 4}


# ------------------------------------------------------------------------------ the tables


@dataclasses.dataclass(frozen=True)
class CellLayout:
    """Where one Flax cell keeps torch's arrays (paths relative to the cell).

    ``ih`` / ``hh``: the kernels of ``weight_ih`` / ``weight_hh``, one path per gate (in the
    cell's gate order) or a single path holding the gates concatenated on the last axis.
    ``bias``: where the summed biases go (LSTM: the hidden Denses; GRU: the input Denses, r and
    z summed, with ``b_in``; SimpleCell: the input Dense). ``hn_bias``: the GRU's ``b_hn``
    (None: the cell has no such bias). ConvLSTM: ``conv`` kernels (OIHW <-> HWIO), a bias per
    convolution (``ih_bias``, ``hh_bias``), and ``forget_shift`` added by the cell.
    ``order[k]``: the torch gate of the cell's k-th gate (default: torch's order).
    """

    ih: tuple[Path, ...]
    hh: tuple[Path, ...]
    bias: tuple[Path, ...] = ()
    hn_bias: Optional[Path] = None
    order: Optional[tuple[int, ...]] = None
    conv: bool = False
    ih_bias: tuple[Path, ...] = ()
    hh_bias: tuple[Path, ...] = ()
    forget_shift: float = 0.0


def _paths(*names: str) -> tuple[Path, ...]:
    return tuple(tuple(name.split("/")) for name in names)


LAYOUTS: dict[str, CellLayout] = {
    "lstm": CellLayout(
        ih=_paths("ii/kernel", "if/kernel", "ig/kernel", "io/kernel"),
        hh=_paths("hi/kernel", "hf/kernel", "hg/kernel", "ho/kernel"),
        bias=_paths("hi/bias", "hf/bias", "hg/bias", "ho/bias"),
    ),
    "gru": CellLayout(
        ih=_paths("ir/kernel", "iz/kernel", "in/kernel"),
        hh=_paths("hr/kernel", "hz/kernel", "hn/kernel"),
        bias=_paths("ir/bias", "iz/bias", "in/bias"),
        hn_bias=("hn", "bias"),
    ),
    "rnn": CellLayout(ih=_paths("i/kernel"), hh=_paths("h/kernel"), bias=_paths("i/bias")),
    "convlstm": CellLayout(
        ih=_paths("ih/kernel"), hh=_paths("hh/kernel"), order=(0, 2, 1, 3), conv=True,
        ih_bias=_paths("ih/bias"), hh_bias=_paths("hh/bias"), forget_shift=1.0,
    ),
}


def conv_gate_blocks(torch_name: str, path: Sequence[str], order: Sequence[int]) -> Piece:
    """torch's OIHW conv weight ``(G*H, C, kh, kw)`` as one HWIO kernel ``(kh, kw, C, G*H)``
    with its gate blocks in the target's ``order`` (``order[k]``: the torch gate of block k)."""
    order = tuple(order)

    def to_jax(w):
        blocks = np.split(w, len(order), axis=0)
        return (np.concatenate([blocks[g] for g in order], axis=0).transpose(2, 3, 1, 0),)

    def to_torch(kernel):
        blocks = np.split(kernel.transpose(3, 2, 0, 1), len(order), axis=0)
        return (np.concatenate([blocks[order.index(g)] for g in range(len(order))], axis=0),)

    return Piece((torch_name,), (tuple(path),), to_jax, to_torch, to_torch)


def gru_biases(
    bias_ih: str, bias_hh: str, paths: Sequence[Path], hn_path: Optional[Path]
) -> Piece:
    """torch's two GRU biases as the input biases (``b_ir + b_hr``, ``b_iz + b_hz``, ``b_in``;
    per gate or concatenated) and ``b_hn`` at ``hn_path``. Without ``hn_path`` (NNX's GRUCell)
    ``b_hn`` is dropped going to the target (``to_jax`` checks it is zero first), zeros coming
    back, and its gradient is unknown (NaN)."""
    paths = tuple(tuple(p) for p in paths)
    count = len(paths)

    def to_jax(b_ih, b_hh):
        size = b_ih.shape[0] // 3
        folded = b_ih + np.concatenate([b_hh[: 2 * size], np.zeros_like(b_hh[2 * size:])])
        inputs = tuple(np.split(folded, 3)) if count == 3 else (folded,)
        return inputs + ((b_hh[2 * size:],) if hn_path else ())

    def to_torch(*arrays):
        bias = np.concatenate(arrays[:count])
        size = bias.shape[0] // 3
        b_hn = arrays[count] if hn_path else np.zeros_like(bias[:size])
        return bias, np.concatenate([np.zeros_like(bias[: 2 * size]), b_hn])

    def grad_to_torch(*grads):
        bias = np.concatenate(grads[:count])
        size = bias.shape[0] // 3
        g_hn = grads[count] if hn_path else np.full_like(bias[:size], np.nan)
        return bias, np.concatenate([bias[: 2 * size], g_hn])

    return Piece((bias_ih, bias_hh), paths + ((tuple(hn_path),) if hn_path else ()),
                 to_jax, to_torch, grad_to_torch)


def table(kind: str, suffix: str, bias: bool, layout: CellLayout, prefix: Path = ()) -> list[Piece]:
    """torch names (``weight_ih{suffix}`` ...) <-> one Flax cell's arrays under ``prefix``.

    ``kind``: ``"lstm"``, ``"gru"``, ``"rnn"`` or ``"convlstm"`` (cells and sequences alike);
    ``layout``: the cell's paths (``LAYOUTS`` here, ``flax_nnx.LAYOUTS`` for NNX's cells).
    """
    order = layout.order or tuple(range(GATES[kind]))
    at = lambda paths: [tuple(prefix) + tuple(p) for p in paths]
    w_ih, w_hh, b_ih, b_hh = (f"{n}{suffix}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    if layout.conv:
        pieces = [conv_gate_blocks(w_ih, at(layout.ih)[0], order),
                  conv_gate_blocks(w_hh, at(layout.hh)[0], order)]
        if bias:
            ih_bias = gate_blocks(b_ih, at(layout.ih_bias), order, transpose=False)
            if layout.forget_shift:
                ih_bias = shifted(ih_bias, at(layout.ih_bias)[0], order.index(1), len(order),
                                  layout.forget_shift)
            pieces += [ih_bias, gate_blocks(b_hh, at(layout.hh_bias), order, transpose=False)]
        return pieces
    pieces = [gate_blocks(w_ih, at(layout.ih), order), gate_blocks(w_hh, at(layout.hh), order)]
    if bias:
        if kind == "gru":
            hn = at([layout.hn_bias])[0] if layout.hn_bias else None
            pieces.append(gru_biases(b_ih, b_hh, at(layout.bias), hn))
        else:
            pieces.append(summed((b_ih, b_hh),
                                 lambda name: gate_blocks(name, at(layout.bias), order, transpose=False)))
    return pieces


def check_shapes(pieces: Sequence[Piece], state: dict, tree: Any, what: str) -> None:
    """ValueError unless ``tree`` has every array of ``pieces`` with the shape ``state`` (the
    torch module's arrays) gives it, naming the parameter, the expected and the received shape."""
    expected = apply_table(pieces, state)
    for piece in pieces:
        for path in piece.paths:
            node, want = tree, expected
            for key in path:
                want = want[key]
                try:
                    node = node[key]
                except (KeyError, TypeError, IndexError):
                    raise ValueError(
                        f"{what} has no parameter {'/'.join(path)} (torch {', '.join(piece.torch)}, "
                        f"expected shape {tuple(want.shape) if hasattr(want, 'shape') else '?'})"
                    ) from None
            got = tuple(np.shape(node))
            if got != tuple(want.shape):
                raise ValueError(
                    f"{what}: parameter {'/'.join(path)} (torch {', '.join(piece.torch)}) has "
                    f"shape {got}, expected {tuple(want.shape)}"
                )


def with_zero_biases(state: dict, suffixes: Sequence[str], rows: int) -> dict:
    """``state`` with zero ``bias_ih`` / ``bias_hh`` for each suffix (a ``bias=False`` torch
    module for a Flax cell that always has biases)."""
    dtype = next(iter(state.values())).dtype
    state = dict(state)
    for suffix in suffixes:
        for name in ("bias_ih", "bias_hh"):
            state[f"{name}{suffix}"] = np.zeros(rows, dtype)
    return state


# ------------------------------------------------------------------------------ torch's side


def base_kind(spec) -> str:
    return spec.kind.removesuffix("_cell")


def check_torch(spec, module, target: str, kinds: Sequence[str]) -> None:
    """The torch module's options a Flax target cannot express: ValueError naming them."""
    check_one_layer(spec, module, target, base_kind(spec) in kinds)
    if base_kind(spec) == "convlstm":
        if tuple(module.dilation) != (1, 1):
            raise unsupported("dilation", target, tuple(module.dilation))
        if not module.bias:
            raise unsupported("bias", target, False)


def suffixes(spec, module) -> tuple[str, ...]:
    """torch's parameter suffixes, one per direction."""
    if spec.is_cell:
        return ("",)
    return ("_l0", "_l0_reverse") if getattr(module, "bidirectional", False) else ("_l0",)


def hidden_size(spec, module) -> int:
    return module.hidden_channels if base_kind(spec) == "convlstm" else module.hidden_size


def build_torch(kind: str, is_cell: bool, input_size: int, hidden: int, dtype: torch.dtype, *,
                batch_first: bool = False, bidirectional: bool = False,
                nonlinearity: str = "tanh", kernel_size=None) -> torch.nn.Module:
    """The torch module for one Flax cell (``is_cell``) or sequence module."""
    options = {"dtype": dtype}
    if kind == "convlstm":
        if is_cell:
            return torch_impl.ConvLSTMCell(input_size, hidden, tuple(kernel_size), **options)
        return torch_impl.ConvLSTM2d(input_size, hidden, tuple(kernel_size),
                                     batch_first=batch_first, **options)
    if kind == "rnn":
        options["nonlinearity"] = nonlinearity
    if is_cell:
        return {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell,
                "rnn": torch.nn.RNNCell}[kind](input_size, hidden, **options)
    return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[kind](
        input_size, hidden, batch_first=batch_first, bidirectional=bidirectional, **options)


def torch_dtype(arrays: dict) -> torch.dtype:
    dtypes = {np.asarray(a).dtype for a in arrays.values()}
    if len(dtypes) != 1:
        raise TypeError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}; expected one dtype")
    return numpy_to_tensor(np.zeros(0, dtypes.pop())).dtype


def load_torch(module: torch.nn.Module, pieces: Sequence[Piece], tree: Any, what: str) -> torch.nn.Module:
    """Checks ``tree``'s shapes against ``module``'s and loads its arrays into ``module``."""
    check_shapes(pieces, torch_param_arrays(module), tree, what)
    state = table_to_torch(pieces, tree, what)
    module.load_state_dict({k: numpy_to_tensor(v) for k, v in state.items()}, strict=True)
    return module


def nonlinearity_of(activation: Callable, what: str) -> str:
    if activation is jnp.tanh:
        return "tanh"
    if activation is jax.nn.relu:
        return "relu"
    raise ValueError(f"{what}: activation_fn {activation!r} has no torch nonlinearity "
                     "(jnp.tanh -> 'tanh', jax.nn.relu -> 'relu')")


# ------------------------------------------------------------------------------ the port's run


def make_run(spec, torch_module, structure: str, call_seq: Callable, call_cell: Callable):
    """``Port.run`` for a Flax module of ``structure`` (``"cell"``, ``"rnn"`` or
    ``"bidirectional"``), from a carry in torch's order.

    ``call_seq(variables, x, initial_carry, seq_lengths, time_major) -> (carry, y)`` runs an RNN
    or Bidirectional; ``call_cell(variables, carry, x_t) -> (carry, y_t)`` one step of a cell.
    Flax carries: ``(c, h)`` or ``h``; a Bidirectional's ``(forward, backward)``.
    """
    cell_state = spec.cell_state

    def to_flax(state):  # torch (h, c) -> Flax (c, h); (h,) -> h
        return (state[1], state[0]) if cell_state else state[0]

    def from_flax(carry):
        return (carry[1], carry[0]) if cell_state else (carry,)

    if spec.is_cell:
        def run(variables, x, carry, lengths, masks):
            if structure == "cell":
                def body(state, xt):
                    return call_cell(variables, state, xt)

                final, ys = jax.lax.scan(body, to_flax(carry), x)
            else:  # an RNN given for a torch cell: the steps are time-major
                final, ys = call_seq(variables, x, to_flax(carry), None, True)
            return ys, from_flax(final)

        return run

    time_major = not torch_module.batch_first

    def run(variables, x, carry, lengths, masks):
        if masks is not None:
            raise ValueError("a one-layer Flax RNN has no inter-layer dropout masks")
        if structure == "bidirectional":
            initial = (to_flax(tuple(s[0] for s in carry)), to_flax(tuple(s[1] for s in carry)))
        else:
            initial = to_flax(tuple(s[0] for s in carry))
        final, y = call_seq(variables, x, initial, lengths, time_major)
        if lengths is not None:  # torch pads with zeros; Flax leaves the padded steps as run
            steps = jnp.arange(y.shape[0 if time_major else 1])
            valid = (steps[:, None] < lengths[None, :]) if time_major else (steps[None, :] < lengths[:, None])
            y = jnp.where(valid.reshape(valid.shape + (1,) * (y.ndim - 2)), y, jnp.zeros((), y.dtype))
        if structure == "bidirectional":
            forward, backward = from_flax(final[0]), from_flax(final[1])
            return y, tuple(jnp.stack([f, b]) for f, b in zip(forward, backward))
        return y, tuple(s[None] for s in from_flax(final))

    return run


def check_structure(spec, torch_module, structure: str, target: str) -> None:
    """The Flax module's structure must fit the torch module."""
    if spec.is_cell:
        if structure == "bidirectional":
            raise ValueError(f"a {target} Bidirectional cannot stand for a torch {type(torch_module).__name__}")
        return
    if structure == "cell":
        raise ValueError(f"a bare {target} cell cannot stand for a torch "
                         f"{type(torch_module).__name__}: wrap it in RNN")
    wanted = "bidirectional" if getattr(torch_module, "bidirectional", False) else "rnn"
    if structure != wanted:
        raise ValueError(
            f"the torch {type(torch_module).__name__} has bidirectional="
            f"{wanted == 'bidirectional'}: a {target} "
            f"{'Bidirectional' if wanted == 'bidirectional' else 'RNN'} stands for it, "
            f"got {'a Bidirectional' if structure == 'bidirectional' else 'an RNN'}"
        )


def check_cell_kind(spec, torch_module, kinds: Sequence[str], target: str) -> None:
    for kind in kinds:
        if kind != base_kind(spec):
            raise ValueError(f"a {target} cell for {kind!r} cannot stand for a torch "
                             f"{type(torch_module).__name__}")


# ------------------------------------------------------------------------------ Linen


_CELL_KIND = {nn.OptimizedLSTMCell: "lstm", nn.LSTMCell: "lstm", nn.GRUCell: "gru",
              nn.SimpleCell: "rnn", nn.ConvLSTMCell: "convlstm"}


def _cell_kind(cell: Any) -> str:
    kind = _CELL_KIND.get(type(cell))
    if kind is None:
        raise TypeError(f"{NAME}: {type(cell).__name__} is not a stock Flax cell "
                        f"({', '.join(c.__name__ for c in _CELL_KIND)})")
    return kind


def stock_structure(obj: Any, library: Any, target: str, root: Path) -> tuple[str, list]:
    """``(structure, [(cell, path prefix)])`` of a stock Flax object: ``"bidirectional"``,
    ``"rnn"`` or ``"cell"``; the prefixes start at ``root`` (Linen's ``("params",)``).

    Arguments:
        library: ``flax.linen`` or ``flax.nnx`` (their ``RNN`` and ``Bidirectional``).
        target: the target's name, for messages.
    """
    if isinstance(obj, library.Bidirectional):
        rnns = (obj.forward_rnn, obj.backward_rnn)
        if not all(isinstance(r, library.RNN) for r in rnns):
            raise TypeError(f"{target}: a Bidirectional over {[type(r).__name__ for r in rnns]}; "
                            f"expected two {target}.RNN")
        return "bidirectional", [(rnns[0].cell, root + ("forward_rnn", "cell")),
                                 (rnns[1].cell, root + ("backward_rnn", "cell"))]
    if isinstance(obj, library.RNN):
        return "rnn", [(obj.cell, root + ("cell",))]
    return "cell", [(obj, root)]


def _structure(obj: Any) -> tuple[str, list]:
    return stock_structure(obj, nn, NAME, ("params",))


def _table_for(kind: str, structure: str, cells, suffix_list, bias: bool) -> list[Piece]:
    pieces = []
    for (_, prefix), suffix in zip(cells, suffix_list):
        pieces += table(kind, suffix, bias, LAYOUTS[kind], prefix)
    return pieces


def _new_cell(kind: str, module, dtype) -> Any:
    size = module.hidden_channels if kind == "convlstm" else module.hidden_size
    if kind == "lstm":
        return nn.OptimizedLSTMCell(size, param_dtype=dtype)
    if kind == "gru":
        return nn.GRUCell(size, param_dtype=dtype)
    if kind == "rnn":
        activation = jax.nn.relu if module.nonlinearity == "relu" else jnp.tanh
        return nn.SimpleCell(size, activation_fn=activation, param_dtype=dtype)
    return nn.ConvLSTMCell(size, kernel_size=tuple(module.kernel_size), param_dtype=dtype)


def stock_object(spec, module, state: dict, time_major, new_cell: Callable, library: Any):
    """A torch module's counterpart among Flax's stock modules, before its weights are set.

    Arguments:
        spec, module, state: the torch module's spec, the module and its arrays.
        time_major: None for the module's own layout (``not batch_first``).
        new_cell: ``new_cell(kind, module, dtype)``, the library's stock cell.
        library: ``flax.linen`` or ``flax.nnx`` (their ``RNN`` and ``Bidirectional``).

    Returns:
        ``(object, state, suffixes)``: the cell for a torch cell, else ``RNN(cell)`` or
        ``Bidirectional(RNN(cell), RNN(cell))``; ``state`` with zero biases when the torch
        module has none (Flax's LSTM, GRU and Simple cells always have biases).
    """
    kind = base_kind(spec)
    dtype = jnp.dtype(next(iter(state.values())).dtype)
    ends = suffixes(spec, module)
    if not module.bias:
        state = with_zero_biases(state, ends, GATES[kind] * hidden_size(spec, module))
    if spec.is_cell:
        return new_cell(kind, module, dtype), state, ends
    major = (not module.batch_first) if time_major is None else bool(time_major)
    if len(ends) == 2:
        forward, backward = (library.RNN(new_cell(kind, module, dtype)) for _ in ends)
        return library.Bidirectional(forward, backward, time_major=major), state, ends
    return library.RNN(new_cell(kind, module, dtype), time_major=major), state, ends


def to_jax(spec, module, state, *, time_major=None):
    """``(flax.linen module, variables)`` holding the torch weights."""
    check_torch(spec, module, NAME, tuple(LAYOUTS))
    obj, state, ends = stock_object(spec, module, state, time_major, _new_cell, nn)
    structure, cells = _structure(obj)
    tree = apply_table(_table_for(base_kind(spec), structure, cells, ends, True), state)
    return obj, jax.tree_util.tree_map(jnp.asarray, tree)


def _torch_expressible(cell: Any, kind: str, what: str) -> dict:
    """The cell's options torch can express (else ValueError): the torch constructor's."""
    options: dict = {}
    if kind in ("lstm", "gru"):
        if cell.gate_fn is not jax.nn.sigmoid or cell.activation_fn is not jnp.tanh:
            raise ValueError(f"{what}: torch's {kind.upper()} has sigmoid gates and tanh; got "
                             f"gate_fn={cell.gate_fn!r}, activation_fn={cell.activation_fn!r}")
    elif kind == "rnn":
        if cell.residual:
            raise ValueError(f"{what}: SimpleCell(residual=True) has no torch equivalent")
        options["nonlinearity"] = nonlinearity_of(cell.activation_fn, what)
    elif kind == "convlstm":
        if len(cell.kernel_size) != 2:
            raise ValueError(f"{what}: torch_impl's ConvLSTM is 2-D, got kernel_size={cell.kernel_size}")
        if cell.strides not in (None, 1, (1, 1), [1, 1]):
            raise ValueError(f"{what}: torch_impl's ConvLSTM has stride 1, got strides={cell.strides}")
        if cell.padding not in ("SAME", "same"):
            raise ValueError(f"{what}: torch_impl's ConvLSTM pads 'SAME', got padding={cell.padding!r}")
        options["kernel_size"] = tuple(cell.kernel_size)
    return options


def sequence_options(structure: str, obj: Any, what: str) -> dict:
    """batch_first and bidirectional of the torch sequence module for an RNN / Bidirectional."""
    if structure == "cell":
        return {}
    if structure == "rnn" and obj.reverse:
        raise ValueError(f"{what}: reverse=True (a backward-only RNN) has no torch equivalent")
    if structure == "bidirectional" and obj.merge_fn is not recurrent._concatenate:
        raise ValueError(f"{what}: merge_fn {obj.merge_fn!r}; torch concatenates forward and backward")
    return {"batch_first": not obj.time_major, "bidirectional": structure == "bidirectional"}


def to_torch(obj, variables=None):
    """The torch module: the cell (nn.LSTMCell / GRUCell / RNNCell, torch_impl.ConvLSTMCell) for a
    bare cell, the sequence module (batch_first = not time_major) for an RNN or Bidirectional."""
    what = f"{NAME} {type(obj).__name__}"
    if variables is None:
        raise ValueError(f"{what}: to_torch needs the module's variables")
    variables = _with_params_key(variables)
    structure, cells = _structure(obj)
    kinds = {_cell_kind(c) for c, _ in cells}
    if len(kinds) != 1 or len({c.features for c, _ in cells}) != 1:
        raise ValueError(f"{what}: forward and backward cells differ ({[type(c).__name__ for c, _ in cells]})")
    kind = kinds.pop()
    options = _torch_expressible(cells[0][0], kind, what)
    if any(_torch_expressible(c, kind, what) != options for c, _ in cells[1:]):
        raise ValueError(f"{what}: forward and backward cells have different options")
    options.update(sequence_options(structure, obj, what))
    first_kernel = variables
    for key in cells[0][1] + LAYOUTS[kind].ih[0]:
        try:
            first_kernel = first_kernel[key]
        except (KeyError, TypeError):
            raise ValueError(f"{what} has no parameter {'/'.join(cells[0][1] + LAYOUTS[kind].ih[0])}") from None
    ends = ("",) if structure == "cell" else ("_l0", "_l0_reverse")[: len(cells)]
    tree = variables
    if kind == "convlstm" and not cells[0][0].use_bias:  # the cell's +1: a forget bias of 1
        tree = _with_zero_conv_biases(variables, cells, np.asarray(first_kernel))
    leaves = {str(i): np.asarray(a) for i, a in enumerate(jax.tree_util.tree_leaves(tree))}
    module = build_torch(kind, structure == "cell", int(np.shape(first_kernel)[-2]),
                         cells[0][0].features, torch_dtype(leaves), **options)
    return load_torch(module, _table_for(kind, structure, cells, ends, True), tree, what)


def _with_params_key(variables):
    """``{"params": ...}`` (a bare params dict is accepted too)."""
    if variables is None:
        raise ValueError(f"{NAME}: a Linen module needs its variables")
    return variables if "params" in variables else {"params": variables}


def _with_zero_conv_biases(variables, cells, kernel):
    tree = jax.tree_util.tree_map(lambda a: a, dict(variables))  # a fresh nested dict
    for _, prefix in cells:
        node = tree
        for key in prefix:
            node[key] = dict(node[key])
            node = node[key]
        for conv in ("ih", "hh"):
            node[conv] = dict(node[conv], bias=np.zeros(kernel.shape[-1], kernel.dtype))
    return tree


def port(spec, torch_module, obj, variables):
    """Runs the stock Linen module (``apply``) from a carry in torch's order."""
    from ..harness import Port

    check_torch(spec, torch_module, NAME, tuple(LAYOUTS))
    structure, cells = _structure(obj)
    check_structure(spec, torch_module, structure, NAME)
    check_cell_kind(spec, torch_module, {_cell_kind(c) for c, _ in cells}, NAME)
    kind = base_kind(spec)
    what = f"{NAME} {type(obj).__name__}"
    variables = _with_params_key(variables)
    pieces = _table_for(kind, structure, cells, suffixes(spec, torch_module), torch_module.bias)
    check_shapes(pieces, torch_param_arrays(torch_module), variables, what)

    def call_seq(variables, x, carry, lengths, time_major):
        return obj.apply(variables, x, initial_carry=carry, seq_lengths=lengths,
                         return_carry=True, time_major=time_major)

    def call_cell(variables, carry, xt):
        return obj.apply(variables, carry, xt)

    run = make_run(spec, torch_module, structure, call_seq, call_cell)
    return Port(run, lambda grads: grads_to_torch(pieces, grads, f"{what} gradients")), variables


_OWNED = (nn.RNN, nn.Bidirectional) + tuple(_CELL_KIND)


def owns(obj: Any) -> bool:
    """Flax's own RNN, Bidirectional and stock cells (not carryover's jax_impl modules, which
    are Linen modules too)."""
    return isinstance(obj, _OWNED) and type(obj).__module__.startswith("flax.")


TARGET = Target(NAME, "flax", to_jax, to_torch, port, owns)
