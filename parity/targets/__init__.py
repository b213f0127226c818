"""Other JAX libraries as targets: the torch weights in the JAX code people already have.

Each library stores the same weights its own way (one Dense per gate, summed biases, ``(c, h)``
carries, another gate order, +1 on the forget gate). A target is declared once, as data:

* a weight table: ``Piece``s saying which torch parameters become which of the target's arrays
  and how (``transposed``, ``gate_blocks`` to split and reorder gates, ``summed`` biases,
  ``shifted`` forget biases), read in both directions and, for gradients, as its adjoint;
* how to build the library's object from the torch module's options, and back;
* how to run it over a sequence from a carry in torch's order (a ``harness.Port``).

``to_jax(module, target=NAME)`` and ``to_torch(obj, variables)`` dispatch here for every name
in ``TARGETS`` but ``"linen"`` and ``"nnx"`` (carryover's own modules); ``compare`` accepts the
objects. Each library's module is imported only when its target is used; a missing library is
an ImportError naming the ``carryover[interop]`` extra.

Conversions: every target keeps the torch values exactly except where a table sums two torch
biases into one array. ``to_torch`` then puts the sum in ``bias_ih`` and zeros in ``bias_hh``:
equal as a function, not as a state_dict. A shifted forget bias (Flax's ConvLSTM adds 1) is
exact to one rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = [
    "Piece", "transposed", "as_is", "gate_blocks", "summed", "shifted", "apply_table",
    "table_to_torch", "grads_to_torch", "Target", "TARGETS", "get_target", "target_of",
    "unsupported", "check_one_layer", "nest",
]

Arrays = dict[str, np.ndarray]


# ------------------------------------------------------------------------------ the vocabulary


@dataclasses.dataclass(frozen=True)
class Piece:
    """Some torch parameters <-> some arrays of the target, and how.

    Arguments:
        torch: torch parameter names (``state_dict`` keys).
        paths: the target's array paths (tuples of keys), as many as ``to_jax`` returns.
        to_jax: ``(*torch arrays) -> tuple of target arrays``.
        to_torch: ``(*target arrays) -> tuple of torch arrays``: the inverse (for a sum, one
            of the preimages: the sum and zeros).
        grad_to_torch: ``(*target gradients) -> tuple of torch gradients``: the adjoint of
            ``to_jax`` (for a sum, the same gradient for each term).
    """

    torch: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    to_jax: Callable[..., tuple]
    to_torch: Callable[..., tuple]
    grad_to_torch: Callable[..., tuple]


def as_is(torch_name: str, path: Sequence[str]) -> Piece:
    """The same array."""
    same = lambda a: (a,)
    return Piece((torch_name,), (tuple(path),), same, same, same)


def transposed(torch_name: str, path: Sequence[str]) -> Piece:
    """torch's ``(out, in)`` as ``(in, out)``."""
    flip = lambda a: (a.T,)
    return Piece((torch_name,), (tuple(path),), flip, flip, flip)


def gate_blocks(
    torch_name: str,
    paths: Sequence[Sequence[str]],
    order: Sequence[int],
    *,
    transpose: bool = True,
) -> Piece:
    """Splits a torch ``(G*H, ...)`` array into its G gate blocks, in the target's gate order.

    ``order[k]`` is the torch gate index of the target's k-th block; ``paths`` one per block
    (each block transposed when ``transpose``), or a single path that receives the blocks
    concatenated on the last axis (e.g. Keras' ``(F, 4H)`` kernel in its own gate order).
    """
    order = tuple(order)
    inverse = tuple(order.index(g) for g in range(len(order)))
    flip = (lambda b: b.T) if transpose else (lambda b: b)
    single = len(paths) == 1 and len(order) > 1

    def to_jax(a):
        blocks = np.split(a, len(order), axis=0)
        picked = [flip(blocks[g]) for g in order]
        return (np.concatenate(picked, axis=-1),) if single else tuple(picked)

    def to_torch(*arrays):
        blocks = np.split(arrays[0], len(order), axis=-1) if single else list(arrays)
        return (np.concatenate([flip(blocks[k]) for k in inverse], axis=0),)

    return Piece((torch_name,), tuple(tuple(p) for p in paths), to_jax, to_torch, to_torch)


def summed(torch_names: Sequence[str], inner: Callable[[str], Piece]) -> Piece:
    """The target holds the sum of torch parameters (e.g. ``bias_ih + bias_hh``), laid out by
    ``inner`` (a piece built for one torch name); back to torch: the sum in the first, zeros in
    the others; gradients: the target's gradient for each term."""
    layout = inner(torch_names[0])
    count = len(torch_names)

    def to_jax(*arrays):
        return layout.to_jax(sum(arrays[1:], arrays[0]))

    def to_torch(*arrays):
        (total,) = layout.to_torch(*arrays)
        return (total,) + tuple(np.zeros_like(total) for _ in range(count - 1))

    def grad_to_torch(*grads):
        (grad,) = layout.grad_to_torch(*grads)
        return (grad,) * count

    return Piece(tuple(torch_names), layout.paths, to_jax, to_torch, grad_to_torch)


def shifted(piece: Piece, path: Sequence[str], block: int, blocks: int, by: float) -> Piece:
    """``piece`` with ``by`` added to block ``block`` (of ``blocks``) of its array at ``path``
    when going to torch, subtracted going to the target (Flax's ConvLSTM forget gate adds 1
    inside its cell: its bias holds torch's minus 1). Gradients are unchanged."""
    index = piece.paths.index(tuple(path))

    def move(arrays, sign):
        arrays = list(arrays)
        parts = np.split(arrays[index].copy(), blocks, axis=-1)
        parts[block] = parts[block] + np.asarray(sign * by, parts[block].dtype)
        arrays[index] = np.concatenate(parts, axis=-1)
        return tuple(arrays)

    return Piece(
        piece.torch, piece.paths,
        lambda *a: move(piece.to_jax(*a), -1.0),
        lambda *a: piece.to_torch(*move(a, +1.0)),
        piece.grad_to_torch,
    )


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    """Nested dicts from a flat ``{path: value}`` dict: ``{("a", "b"): v}`` -> ``{"a": {"b": v}}``."""
    tree: dict = {}
    for path, value in flat.items():
        _set(tree, path, value)
    return tree


def _get(tree: Any, path: tuple[str, ...], what: str) -> np.ndarray:
    node = tree
    for key in path:
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError):
            raise ValueError(f"{what} has no array at {'/'.join(path)}") from None
    return np.asarray(node)


def apply_table(table: Sequence[Piece], state: Arrays) -> dict:
    """torch ``state`` (name -> array) through ``table``: the target's nested dict of arrays."""
    tree: dict = {}
    for piece in table:
        for path, array in zip(piece.paths, piece.to_jax(*(state[n] for n in piece.torch))):
            _set(tree, path, np.ascontiguousarray(array))
    return tree


def _back_to_torch(table: Sequence[Piece], tree: Any, what: str, gradients: bool) -> Arrays:
    state: Arrays = {}
    for piece in table:
        back = piece.grad_to_torch if gradients else piece.to_torch
        arrays = back(*(_get(tree, p, what) for p in piece.paths))
        state.update(zip(piece.torch, (np.ascontiguousarray(a) for a in arrays)))
    return state


def table_to_torch(table: Sequence[Piece], tree: Any, what: str) -> Arrays:
    """The target's arrays back to torch's names (the inverse of ``apply_table``)."""
    return _back_to_torch(table, tree, what, gradients=False)


def grads_to_torch(table: Sequence[Piece], grads: Any, what: str) -> Arrays:
    """Gradients with respect to the target's arrays as gradients of torch's parameters (the
    adjoint of ``apply_table``)."""
    return _back_to_torch(table, grads, what, gradients=True)


# ------------------------------------------------------------------------------ the registry


@dataclasses.dataclass(frozen=True)
class Target:
    """A JAX library as a conversion and comparison target.

    Arguments:
        name: the ``target=`` name.
        library: the module that must be importable (``"equinox"``, ...).
        to_jax: ``(spec, torch_module) -> (obj, variables or None)``.
        to_torch: ``(obj, variables) -> torch module``.
        port: ``(spec, torch_module, obj, variables) -> (harness.Port, variables)``.
        owns: whether an object is this library's (checked only when it is imported).
    """

    name: str
    library: str
    to_jax: Callable[[Any, Any], tuple[Any, Any]]
    to_torch: Callable[[Any, Any], Any]
    port: Callable[[Any, Any, Any, Any], tuple[Any, Any]]
    owns: Callable[[Any], bool]


# target name -> (the module declaring it, the library it needs)
_MODULES: dict[str, tuple[str, str]] = {
    "flax.linen": ("parity.targets.flax_linen", "flax"),
    "flax.nnx": ("parity.targets.flax_nnx", "flax"),
    "equinox": ("parity.targets.equinox", "equinox"),
    "keras": ("parity.targets.keras", "keras"),
}
TARGETS: tuple[str, ...] = ("linen", "nnx") + tuple(_MODULES)


def get_target(name: str) -> Target:
    """The ``Target`` called ``name``; ValueError listing the targets for an unknown name,
    ImportError naming the extra when its library is missing."""
    if name not in _MODULES:
        raise ValueError(f"target must be one of {TARGETS}, got {name!r}")
    module_name, library = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == library:
            raise ImportError(
                f"target {name!r} needs {library}: pip install \"carryover[interop]\""
            ) from error
        raise
    return module.TARGET


def target_of(obj: Any) -> Optional[Target]:
    """The target whose library made ``obj`` (among libraries already imported), or None."""
    for name, (module_name, library) in _MODULES.items():
        if library in sys.modules and importlib.util.find_spec(module_name) is not None:
            target = get_target(name)
            if target.owns(obj):
                return target
    return None


def check_one_layer(spec: Any, module: Any, target: str, known: bool) -> None:
    """What stock libraries' recurrent layers lack: the module kind (``known`` False), more
    than one layer, a projection. ValueError naming the option (``unsupported``)."""
    if not known:
        raise unsupported(f"a {type(module).__name__}", target)
    if not spec.is_cell:
        if module.num_layers != 1:
            raise unsupported("num_layers", target, module.num_layers)
        if getattr(module, "proj_size", 0):
            raise unsupported("proj_size", target, module.proj_size)


def unsupported(option: str, target: str, value: Any = None) -> ValueError:
    """The error for an option a target cannot express."""
    shown = "" if value is None else f" ({option}={value!r})"
    return ValueError(
        f"{option}{shown} cannot be expressed by target {target!r}; targets 'linen' and 'nnx' "
        "(carryover's own modules) support every option"
    )
