"""Reading compiled HLO text: which collectives a program runs, and which run inside loops.

Used by the sharding tests to show that a program split along the batch runs no collective in
its time loop (``jax.jit(f).lower(...).compile().as_text()`` is the input). Test-only: it
lived in ``jax_impl.sharding`` before, but nothing in the library calls it.

Importing it: modules under ``tests/`` write ``from hlo import collectives, loop_collectives``
(``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path`` for them, as it does
``tests/jax_impl/`` for ``jax_test_helpers``); ``parity/tests/`` modules, whose package root is
the repository root, write ``from tests.hlo import ...``; a script run as a file puts
``tests/`` on ``sys.path`` itself (see ``tests/sharding_script.py``).
"""

from __future__ import annotations

import re

__all__ = ["COLLECTIVE_OPS", "collectives", "loop_collectives"]
COLLECTIVE_OPS = (
    "all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter",
    "collective-broadcast", "ragged-all-to-all",
)
_OP = re.compile(r"\s(" + "|".join(COLLECTIVE_OPS) + r")(?:-start|-done)?\(")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLED = re.compile(
    r"\b(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """HLO module text -> ``{computation name: its instruction lines}``."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _HEADER.match(line)
            if match and not line.startswith((" ", "\t", "HloModule")):
                current = computations.setdefault(match.group(1), [])
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    return computations


def _called(lines: list[str]) -> set[str]:
    names: set[str] = set()
    for line in lines:
        names.update(_CALLED.findall(line))
        for group in _BRANCHES.findall(line):
            names.update(n.strip().lstrip("%") for n in group.split(",") if n.strip())
    return names


def collectives(hlo_text: str) -> list[tuple[str, str]]:
    """Every collective op in an HLO module's text, as ``(computation, op)`` pairs.

    Example:
        >>> text = jax.jit(jnp.sin).lower(jnp.ones(3)).compile().as_text()
        >>> collectives(text)
        []
    """
    return [
        (name, match.group(1))
        for name, lines in _computations(hlo_text).items()
        for line in lines
        for match in _OP.finditer(line)
    ]


def loop_collectives(hlo_text: str) -> tuple[list[tuple[str, str]], int]:
    """The collective ops that run inside a ``while`` loop (the time loop's body and condition,
    and every computation they call, however deep).

    Arguments:
        hlo_text: an HLO module's text, e.g. ``jax.jit(f).lower(...).compile().as_text()``.

    Returns:
        ``(found, loops)``: ``found`` the ``(computation, op)`` pairs inside loops; ``loops``
        how many while bodies were seen (0 means there was no loop to check).

    Example:
        >>> loop = lambda x: jax.lax.fori_loop(0, 3, lambda i, a: a * 2, x)
        >>> loop_collectives(jax.jit(loop).lower(jnp.ones(3)).compile().as_text())
        ([], 1)
    """
    computations = _computations(hlo_text)
    bodies = {m for lines in computations.values() for line in lines
              for m in _WHILE_BODY.findall(line)}
    inside: set[str] = set()
    frontier = set(bodies)
    for lines in computations.values():  # loop conditions count as the loop too
        for line in lines:
            if " while(" in line:
                frontier.update(re.findall(r"\bcondition=%?([\w.\-]+)", line))
    while frontier:
        name = frontier.pop()
        if name in inside or name not in computations:
            continue
        inside.add(name)
        frontier |= _called(computations[name])
    found = [
        (name, match.group(1))
        for name in sorted(inside)
        for line in computations[name]
        for match in _OP.finditer(line)
    ]
    return found, len(bodies)
