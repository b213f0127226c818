"""Truncated-BPTT training for jax_impl modules: one jitted optax step per chunk.

``make_tbptt_step`` builds ``step(variables, opt_state, carry, x, y) -> (variables, opt_state,
carry, loss)``: the incoming carry is cut from the graph (``stop_gradient``, torch's
``detach``), so gradients flow through the current chunk only, and the carry's buffers are
donated to the step. ``remat=True`` recomputes each cell step in the backward pass instead of
storing its intermediates (``jax.checkpoint`` on the cell inside the scan), for long chunks.

``clip_by_global_norm_torch`` is torch.nn.utils.clip_grad_norm_'s formula as an optax
transformation (optax.clip_by_global_norm's differs in the last digits), so a training loop
ported from torch follows it step for step.

Never imports torch.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from .linen import _Recurrent

Array = jax.Array
LossFn = Callable[[Array, Array], Array]
TBPTTStep = Callable[..., tuple[Any, Any, Any, Array]]

__all__ = ["make_tbptt_step", "clip_by_global_norm_torch", "mse_loss", "remat_apply"]

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing
TORCH_CLIP_EPS = 1e-6


def mse_loss(prediction: Array, target: Array) -> Array:
    """Mean squared error over every element (torch's ``F.mse_loss``, reduction ``'mean'``).

    Example:
        >>> float(mse_loss(jnp.ones((2, 3)), jnp.zeros((2, 3))))
        1.0
    """
    return jnp.mean(jnp.square(prediction - target))


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
    """Gradient clipping by global norm with torch.nn.utils.clip_grad_norm_'s formula.

    torch scales every gradient by ``min(max_norm / (norm + 1e-6), 1)``, ``norm`` being the
    2-norm of the per-tensor 2-norms; optax.clip_by_global_norm uses ``max_norm / norm`` (and
    only when ``norm >= max_norm``), a relative difference of ``1e-6 / norm`` when clipping.

    Arguments:
        max_norm: the largest global norm let through.

    Returns:
        An optax GradientTransformation (stateless).

    Example:
        >>> tx = optax.chain(clip_by_global_norm_torch(1.0), optax.adam(1e-3))
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")

    def update(updates, state, params=None):
        del params
        leaves = jax.tree_util.tree_leaves(updates)
        if not leaves:
            return updates, state
        dtype = jnp.result_type(*leaves)
        # torch: vector_norm of the stacked per-tensor norms
        norms = jnp.stack([jnp.linalg.norm(g.ravel()).astype(dtype) for g in leaves])
        total = jnp.linalg.norm(norms)
        coef = jnp.minimum(max_norm / (total + TORCH_CLIP_EPS), 1.0)  # always multiplied, as torch
        return jax.tree_util.tree_map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# ----------------------------------------------------------------------------------- remat


def remat_apply(module: Any, variables: Any, x: Array, carry: Any = None, **kwargs) -> tuple[Array, Any]:
    """``module.apply(variables, x, carry)`` with each cell step under ``jax.checkpoint``.

    The backward pass then keeps only each step's carry (h, c) and recomputes the gates, instead
    of storing every gate activation for every step: less activation memory for long chunks,
    at the price of a second forward pass through the cells. Same values as ``module.apply``:
    it is ``module.clone(backward="remat").apply``.

    Arguments:
        module: a ``jax_impl`` Linen sequence module (``LSTM``, ``GRU``, ``RNN``, ``ConvLSTM``).
        variables, x, carry, kwargs: as for ``module.apply``.

    Returns:
        ``(y, (h_n, c_n))`` as ``module.apply``.

    Example:
        >>> from jax_impl import LSTM
        >>> lstm = LSTM(hidden_size=8)
        >>> variables = lstm.init(jax.random.key(0), jnp.ones((2, 512, 4)))
        >>> y, carry = remat_apply(lstm, variables, jnp.ones((2, 512, 4)))
    """
    if not isinstance(module, _Recurrent):
        raise TypeError(
            f"remat needs a jax_impl LSTM, GRU, RNN or ConvLSTM, got {type(module).__name__}"
        )
    return module.clone(backward="remat").apply(variables, x, carry, **kwargs)


# ----------------------------------------------------------------------------------- TBPTT


def make_tbptt_step(
    module: Any,
    optimizer: optax.GradientTransformation,
    loss_fn: LossFn = mse_loss,
    *,
    remat: bool = False,
    jit: bool = True,
) -> TBPTTStep:
    """One truncated-BPTT training step per chunk, jitted, the carry donated.

    Arguments:
        module: a Flax module with ``apply(variables, x, carry) -> (y, carry)``: a
            ``jax_impl`` LSTM, GRU, RNN, ConvLSTM, or your own model around one.
        optimizer: an optax GradientTransformation (``optax.chain(clip, adam)``, ...).
        loss_fn: ``loss_fn(y_pred, y_target) -> scalar``; default mean squared error.
        remat: recompute the cell steps in the backward pass (``remat_apply``): less memory for
            long chunks; jax_impl sequence modules only.
        jit: return the jitted step (default) or the plain function (to compose further).

    Returns:
        ``step(variables, opt_state, carry, x, y, rng=None) -> (variables, opt_state, carry,
        loss)``. The incoming ``carry`` is cut from the graph (``stop_gradient``) — gradients
        flow through this chunk only — and donated: its buffers are reused for the new carry,
        so do not read it after the call. ``carry=None`` starts from zeros (a second program).
        ``rng``: a key enables the module's dropout (``deterministic=False``).

    Example:
        >>> from jax_impl import LSTM
        >>> lstm = LSTM(hidden_size=16)
        >>> variables = lstm.init(jax.random.key(0), jnp.ones((4, 32, 3)))
        >>> tx = optax.adam(1e-3)
        >>> step = make_tbptt_step(lstm, tx)
        >>> opt_state, carry = tx.init(variables["params"]), lstm.initialize_carry((4,))
        >>> chunks = [(jnp.ones((4, 32, 3)), jnp.zeros((4, 32, 16)))] * 2
        >>> for x, y in chunks:
        ...     variables, opt_state, carry, loss = step(variables, opt_state, carry, x, y)
    """
    if not hasattr(optimizer, "update") or not hasattr(optimizer, "init"):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if remat:
        if not isinstance(module, _Recurrent):
            raise TypeError(
                f"remat=True needs a jax_impl LSTM, GRU, RNN or ConvLSTM (inside your own "
                f'model, build them with backward="remat"), got {type(module).__name__}'
            )
        module = module.clone(backward="remat")

    def step(variables, opt_state, carry, x, y, rng: Optional[Array] = None):
        carry = jax.lax.stop_gradient(carry)  # truncated BPTT: the chunk boundary cuts the graph
        params = variables["params"]

        def objective(params):
            full = {**variables, "params": params}
            if rng is not None:
                out, new_carry = module.apply(
                    full, x, carry, deterministic=False, rngs={"dropout": rng}
                )
            else:
                out, new_carry = module.apply(full, x, carry)
            return loss_fn(out, y), new_carry

        (loss, new_carry), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return {**variables, "params": params}, opt_state, new_carry, loss

    return jax.jit(step, donate_argnums=(2,)) if jit else step
