"""``CustomPort``: validate your own JAX function against torch, gradients included.

A hand-written scan or a custom multi-layer Flax module has its own parameter tree, layout and
carry. Declare them, and ``compare`` runs it like any other port: full and chunked with the
carry passed along in your carry's own form, initial states, and gradients reported under
torch's parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .convert import torch_param_arrays
from .targets import Piece, apply_table, grads_to_torch

__all__ = ["CustomPort"]

CARRY_ORDERS = ("hc", "ch", "h")


@dataclasses.dataclass(frozen=True)
class CustomPort:
    """Your JAX function ``apply(params, x, carry) -> (y, carry)`` as a port ``compare`` runs.

    Arguments:
        apply: the function. ``x`` in your layout (``time_major`` below; channels-last for a
            ConvLSTM), ``y`` in the same layout, ``carry`` as declared below.
        table: where each torch parameter lives in ``params``: ``parity.targets`` pieces
            (``transposed("weight_ih_l0", ("layer_0", "Wi", "kernel"))``, ``gate_blocks``,
            ``summed``, ...). The gradients of ``params`` are reported under these torch names
            (a summed bias's gradient is checked against each term's).
        time_major: your ``x`` and ``y`` are ``(T, B, ...)``; else ``(B, T, ...)``.
        carry_order: ``"hc"`` (torch's), ``"ch"`` (Flax's LSTM cells), or ``"h"`` (one array).
        per_layer: your carry is a list with one entry per layer (each in ``carry_order``, its
            arrays ``(B, ...)``); else torch's stacked arrays ``(layers * directions, B, ...)``.
        lengths: your ``apply`` takes ``seq_lengths=`` (torch's packed-sequence semantics);
            else ``compare(seq_lengths=...)`` is refused for this port.

    Example:
        >>> from parity import compare
        >>> from parity.targets import as_is, summed, transposed
        >>> def elman(params, x, h):                # a hand-written scan: x (B, T, F), h (1, B, H)
        ...     def step(h, xt):
        ...         h = jnp.tanh(xt @ params["x"]["kernel"] + params["x"]["bias"]
        ...                      + h @ params["h"]["kernel"])
        ...         return h, h
        ...     h, ys = jax.lax.scan(step, h[0], jnp.swapaxes(x, 0, 1))
        ...     return jnp.swapaxes(ys, 0, 1), h[None]
        >>> table = [transposed("weight_ih_l0", ("x", "kernel")),
        ...          transposed("weight_hh_l0", ("h", "kernel")),
        ...          summed(("bias_ih_l0", "bias_hh_l0"), lambda n: as_is(n, ("x", "bias")))]
        >>> rnn = torch.nn.RNN(3, 8, batch_first=True)
        >>> port = CustomPort(elman, table, carry_order="h")
        >>> compare(rnn, torch.randn(2, 5, 3), jax_module=port,
        ...         variables=port.params_from_torch(rnn), chunks=[2, 3], grads=True).ok
        True
    """

    apply: Callable[..., tuple[Any, Any]]
    table: Sequence[Piece]
    time_major: bool = False
    carry_order: str = "hc"
    per_layer: bool = False
    lengths: bool = False

    def __post_init__(self):
        if not callable(self.apply):
            raise TypeError(f"apply must be callable, got {type(self.apply).__name__}")
        if self.carry_order not in CARRY_ORDERS:
            raise ValueError(f"carry_order must be one of {CARRY_ORDERS}, got {self.carry_order!r}")
        if not self.table or not all(isinstance(p, Piece) for p in self.table):
            raise TypeError("table must be a non-empty list of parity.targets pieces")

    def params_from_torch(self, torch_module: Any) -> dict:
        """``params`` for ``apply`` from a torch module's weights, through ``table``."""
        state = torch_param_arrays(torch_module)
        missing = sorted({n for p in self.table for n in p.torch} - set(state))
        if missing:
            raise ValueError(f"table names torch parameters the module lacks: {missing}")
        if any(a.dtype == np.float64 for a in state.values()) and not jax.config.jax_enable_x64:
            raise TypeError(
                "float64 weights need JAX's x64 mode: call params_from_torch inside "
                "`with jax.enable_x64(True):`"
            )
        return jax.tree_util.tree_map(jnp.asarray, apply_table(self.table, state))

    # -- the harness's view ----------------------------------------------------------------

    def _carry_in(self, carry: tuple) -> Any:
        """Torch's stacked ``(h, c)`` / ``(h,)`` as the port's carry."""
        ordered = carry[::-1] if self.carry_order == "ch" else carry
        if self.carry_order == "h":
            ordered = carry[0]
        if not self.per_layer:
            return ordered
        layers = jax.tree_util.tree_leaves(carry)[0].shape[0]
        return [jax.tree_util.tree_map(lambda a, k=k: a[k], ordered) for k in range(layers)]

    def _carry_out(self, carry: Any) -> tuple:
        if self.per_layer:
            carry = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *carry)
        if self.carry_order == "h":
            return (carry,)
        carry = tuple(carry)
        return carry[::-1] if self.carry_order == "ch" else carry

    def port(self, spec: Any, torch_module: Any):
        """The ``harness.Port`` that runs ``apply`` on torch's inputs."""
        from .harness import Port

        if (self.carry_order == "h") == spec.cell_state:
            raise ValueError(
                f"carry_order {self.carry_order!r} does not fit a {type(torch_module).__name__}, "
                f"whose state is {'(h, c)' if spec.cell_state else 'h'}"
            )
        torch_time_major = spec.is_cell or not getattr(torch_module, "batch_first", False)
        swap = torch_time_major != self.time_major

        def run(params, x, carry, lengths, masks):
            del masks  # inter-layer dropout cannot be given to a user's function
            batched = x.ndim == 2 + spec.feature_rank
            flip = swap and batched
            x = jnp.swapaxes(x, 0, 1) if flip else x
            if lengths is not None:
                if not self.lengths:
                    raise ValueError("this CustomPort takes no seq_lengths (lengths=False)")
                y, carry = self.apply(params, x, self._carry_in(carry), seq_lengths=lengths)
            else:
                y, carry = self.apply(params, x, self._carry_in(carry))
            return (jnp.swapaxes(y, 0, 1) if flip else y), self._carry_out(carry)

        def grads_as_torch(grads) -> dict[str, np.ndarray]:
            return grads_to_torch(self.table, grads, "the CustomPort's params")

        return Port(run, grads_as_torch)
