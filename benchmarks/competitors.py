"""What runs: each builder returns a case's competitors, with their inputs and weights ready.

Same input values on both sides (numpy, fixed seeds), float32 throughout. Layouts are each
side's natural one: torch batch-first ``(B, T, F)`` / ``(B, T, C, H, W)``, JAX ``(B, T, F)`` /
``(B, T, H, W, C)``; layout conversion is never timed.

* forward: torch under ``torch.no_grad()``; JAX ``jax.jit(module.apply)`` returning output and
  final carry, variables passed as arguments (not baked in as constants).
* forward+backward: loss = sum of the output sequence; gradients with respect to every
  parameter and the input, on both sides (``torch.autograd.grad`` / ``jax.grad`` under jit).
* the NNX modules (``jax_impl.nnx``) hold the Linen competitor's weights and run the NNX way:
  ``nnx.jit`` of a function taking the module (``nnx.grad`` with respect to its ``nnx.Param``
  state and the input for fwdbwd); and, as the fast path Flax's performance guide gives,
  ``nnx.split`` once, then ``jax.jit`` of a function calling ``nnx.merge``. Both are checked
  to compute exactly what the Linen competitor does before anything is timed.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from flax import linen as nn
from flax import nnx

import jax_impl
import jax_impl.nnx as jax_nnx

from .configs import ConvLSTMConfig, LSTMConfig
from .timing import Competitor

# Competitor names (also the keys of the results). The first of each family is the reference
# of the "ratio vs torch oneDNN" column.
TORCH_LSTM = "torch.nn.LSTM"
TORCH_LSTM_1T = "torch.nn.LSTM (1 thread)"
JAX_LSTM = "jax_impl.LSTM"
FLAX_LSTM = "flax OptimizedLSTMCell"
TORCH_GRU = "torch.nn.GRU"
TORCH_GRU_1T = "torch.nn.GRU (1 thread)"
JAX_GRU = "jax_impl.GRU"
FLAX_GRU = "flax GRUCell"
TORCH_RNN = "torch.nn.RNN"
TORCH_RNN_1T = "torch.nn.RNN (1 thread)"
JAX_RNN = "jax_impl.RNN"
FLAX_RNN = "flax SimpleCell"
# the LSTM of the same shape, run in the rounds of a GRU/RNN forward case
SAME_TORCH_LSTM = "torch.nn.LSTM (same shape)"
SAME_TORCH_LSTM_1T = "torch.nn.LSTM (same shape, 1 thread)"
SAME_JAX_LSTM = "jax_impl.LSTM (same shape)"
# the NNX modules: nnx.jit of a function taking the module (the form the target is about), and
# split once + jax.jit of a function that merges (Flax's fast path)
JAX_NNX_LSTM = "jax_impl.nnx.LSTM"
JAX_NNX_GRU = "jax_impl.nnx.GRU"
JAX_NNX_RNN = "jax_impl.nnx.RNN"
JAX_NNX_CONV = "jax_impl.nnx.ConvLSTM"
SPLIT_MERGE = " (split/merge, jax.jit)"
JAX_NNX_LSTM_SM = JAX_NNX_LSTM + SPLIT_MERGE
JAX_NNX_GRU_SM = JAX_NNX_GRU + SPLIT_MERGE
JAX_NNX_RNN_SM = JAX_NNX_RNN + SPLIT_MERGE
JAX_NNX_CONV_SM = JAX_NNX_CONV + SPLIT_MERGE
TORCH_CONV = "torch_impl.ConvLSTM2d"
TORCH_CONV_1T = "torch_impl.ConvLSTM2d (1 thread)"
TORCH_NAIVE = "torch naive loop"
JAX_CONV = "jax_impl.ConvLSTM"
FLAX_CONV = "flax ConvLSTMCell"


def block(tree):
    return jax.block_until_ready(tree)


def one_thread() -> tuple[Callable[[], None], Callable[[], None]]:
    """``before``/``after`` hooks that run a torch call on 1 thread and restore the count."""
    saved: list[int] = []

    def before():
        saved.append(torch.get_num_threads())
        torch.set_num_threads(1)

    def after():
        torch.set_num_threads(saved.pop())

    return before, after


def _torch_runner(module_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  params: list[torch.Tensor], pass_name: str) -> Callable[[], Any]:
    """``module_fn(x) -> output``; forward under no_grad, or forward + grads of sum(output)."""
    if pass_name == "fwd":
        def run():
            with torch.no_grad():
                return module_fn(x)
        return run

    xg = x.detach().clone().requires_grad_(True)

    def run():
        y = module_fn(xg)
        return torch.autograd.grad(y.sum(), [xg, *params])

    return run


def _jax_runner(apply: Callable, variables: Any, x: jax.Array, pass_name: str,
                output: Callable[[Any], jax.Array]) -> Callable[[], Any]:
    """``apply(variables, x)``, jitted; for fwdbwd the grads of sum(output(result))."""
    if pass_name == "fwd":
        f = jax.jit(apply)

        def run():
            return block(f(variables, x))
        return run

    def loss(v, xx):
        return jnp.sum(output(apply(v, xx)))

    g = jax.jit(jax.grad(loss, argnums=(0, 1)))

    def run():
        return block(g(variables, x))
    return run


def _nnx_runners(module: nnx.Module, x: jax.Array, pass_name: str,
                 output: Callable[[Any], jax.Array]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """``(idiomatic, split/merge)`` runs of ``module(x)``: the NNX counterparts of
    ``_jax_runner``, differentiating the same things (every ``nnx.Param`` and the input)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def merged(p):
        return nnx.merge(graphdef, p, rest)

    if pass_name == "fwd":
        f = nnx.jit(lambda m, xx: m(xx))
        f_sm = jax.jit(lambda p, xx: merged(p)(xx))

        def run():
            return block(f(module, x))

        def run_sm():
            return block(f_sm(params, x))
        return run, run_sm

    def loss(m, xx):
        return jnp.sum(output(m(xx)))

    g = nnx.jit(lambda m, xx: nnx.grad(loss, argnums=(0, 1))(m, xx))
    g_sm = jax.jit(jax.grad(lambda p, xx: loss(merged(p), xx), argnums=(0, 1)))

    def run():
        return block(g(module, x))

    def run_sm():
        return block(g_sm(params, x))
    return run, run_sm


def _by_path(result: Any, pass_name: str) -> dict[str, np.ndarray]:
    """A runner's result as path -> array, the same paths for Linen and NNX: forward
    ``(y, carry)``; forward+backward ``(parameter gradients, input gradient)`` with the
    parameters as Linen's ``params`` dict (NNX's ``nnx.State`` converted)."""
    if pass_name != "fwd":
        grads, dx = result
        grads = nnx.to_pure_dict(grads) if isinstance(grads, nnx.State) else grads["params"]
        result = (grads, dx)
    leaves, _ = jax.tree_util.tree_flatten_with_path(result)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def check_same_result(reference: Any, other: Any, pass_name: str, what: str) -> None:
    """Raises unless ``other`` holds exactly (bit for bit) the arrays ``reference`` holds at
    the same paths: two competitors timed against each other must compute the same thing."""
    a, b = _by_path(reference, pass_name), _by_path(other, pass_name)
    if a.keys() != b.keys():
        raise RuntimeError(f"{what}: result paths differ: {sorted(a.keys() ^ b.keys())}")
    for path, value in a.items():
        if value.shape != b[path].shape or value.dtype != b[path].dtype:
            raise RuntimeError(f"{what}: {path} is {b[path].dtype}{b[path].shape}, expected "
                               f"{value.dtype}{value.shape}")
        if not np.array_equal(value, b[path]):
            diff = float(np.max(np.abs(value.astype(np.float64) - b[path])))
            raise RuntimeError(f"{what}: {path} differs from the Linen result (max |diff| "
                               f"{diff:.3g}); refusing to time two different computations")


def nnx_competitors(module: nnx.Module, variables: Any, x: jax.Array, pass_name: str,
                    linen_run: Callable[[], Any], names: tuple[str, str], note: str,
                    output: Callable[[Any], jax.Array]) -> list[Competitor]:
    """The NNX module ``module`` given the Linen competitor's ``variables``, run both NNX ways
    (``names``: idiomatic, split/merge); each checked once against ``linen_run()``'s result.

    The check calls the runners themselves, so their compilation (and the Linen runner's)
    happens here, at build time, not in the first warm-up round.
    """
    jax_nnx.load_linen_params(module, variables)
    run, run_sm = _nnx_runners(module, x, pass_name, output)
    reference = linen_run()
    for name, r in zip(names, (run, run_sm)):
        check_same_result(reference, r(), pass_name, name)
    return [
        Competitor(names[0], "jax", run, note=f"{note}, nnx.jit, outputs bitwise = Linen's"),
        Competitor(names[1], "jax", run_sm,
                   note=f"{note}, nnx.split once + jax.jit(merge), outputs bitwise = Linen's"),
    ]


# ---------------------------------------------------------------------- LSTM, GRU, RNN


class FlaxStack(nn.Module):
    """Flax Linen's own recurrent layers: a Flax cell (default ``nn.OptimizedLSTMCell``) under
    ``nn.RNN``, stacked (and ``nn.Bidirectional``)."""

    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    cell: Any = None  # the Flax cell class (default nn.OptimizedLSTMCell)

    @nn.compact
    def __call__(self, x):
        cell = self.cell or nn.OptimizedLSTMCell
        for _ in range(self.num_layers):
            if self.bidirectional:
                x = nn.Bidirectional(
                    nn.RNN(cell(self.hidden_size)),
                    nn.RNN(cell(self.hidden_size)),
                )(x)
            else:
                x = nn.RNN(cell(self.hidden_size))(x)
        return x


FlaxLSTMStack = FlaxStack  # the LSTM-only suite's name


# Per cell type: the torch module, the jax_impl module, the Flax cell (None: no competitor), and
# the competitor names. Flax's GRUCell has torch's reset-gate placement (r multiplies
# W_hn h + b_hn) but six separate (H-wide) matmuls per step; SimpleCell is the Elman RNN.
DENSE = {
    "lstm": dict(torch=torch.nn.LSTM, jax=jax_impl.LSTM, flax=nn.OptimizedLSTMCell,
                 nnx=jax_nnx.LSTM, names=(TORCH_LSTM, TORCH_LSTM_1T, JAX_LSTM, FLAX_LSTM),
                 nnx_names=(JAX_NNX_LSTM, JAX_NNX_LSTM_SM)),
    "gru": dict(torch=torch.nn.GRU, jax=jax_impl.GRU, flax=nn.GRUCell,
                nnx=jax_nnx.GRU, names=(TORCH_GRU, TORCH_GRU_1T, JAX_GRU, FLAX_GRU),
                nnx_names=(JAX_NNX_GRU, JAX_NNX_GRU_SM)),
    "rnn_tanh": dict(torch=torch.nn.RNN, jax=jax_impl.RNN, flax=nn.SimpleCell,
                     nnx=jax_nnx.RNN, names=(TORCH_RNN, TORCH_RNN_1T, JAX_RNN, FLAX_RNN),
                     nnx_names=(JAX_NNX_RNN, JAX_NNX_RNN_SM)),
}


def dense_names(cell: str) -> tuple[str, str, str, str]:
    """``(torch, torch 1 thread, jax_impl, flax)`` competitor names of a cell type."""
    return DENSE[cell]["names"]


def dense_nnx_names(cell: str) -> tuple[str, str]:
    """``(nnx.jit, split/merge)`` names of a cell type's NNX competitors."""
    return DENSE[cell]["nnx_names"]


def _torch_dense(cfg: LSTMConfig, input_size: int) -> torch.nn.Module:
    kwargs = dict(batch_first=True, num_layers=cfg.num_layers, bidirectional=cfg.bidirectional)
    if cfg.proj_size:
        kwargs["proj_size"] = cfg.proj_size
    if cfg.cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cfg.cell[4:]
    return DENSE[cfg.cell]["torch"](input_size, cfg.hidden_size, **kwargs)


def _jax_dense(cfg: LSTMConfig) -> nn.Module:
    kwargs = dict(num_layers=cfg.num_layers, bidirectional=cfg.bidirectional)
    if cfg.proj_size:
        kwargs["proj_size"] = cfg.proj_size
    if cfg.cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cfg.cell[4:]
    return DENSE[cfg.cell]["jax"](cfg.hidden_size, **kwargs)


def _nnx_dense(cfg: LSTMConfig) -> nnx.Module:
    kwargs = dict(bidirectional=cfg.bidirectional)
    if cfg.proj_size:
        kwargs["proj_size"] = cfg.proj_size
    if cfg.cell.startswith("rnn_"):
        kwargs["nonlinearity"] = cfg.cell[4:]
    return DENSE[cfg.cell]["nnx"](cfg.input_size, cfg.hidden_size, cfg.num_layers,
                                  rngs=nnx.Rngs(0), **kwargs)


def torch_rnn_kernel(cfg: LSTMConfig, pass_name: str) -> str:
    """Which ATen kernel torch dispatches to for this config (profiled on a tiny copy): oneDNN
    (``mkldnn_rnn_layer``) for the LSTM without projection; torch 2.x's GRU and RNN on the CPU
    run ATen's own loop (``aten::gru`` / ``aten::rnn_tanh``: one input matmul over the whole
    sequence, then per step an ``addmm`` and the gate ops)."""
    from torch.profiler import ProfilerActivity, profile

    m = _torch_dense(cfg, 3)
    x = torch.randn(2, 3, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if pass_name == "fwd":
            with torch.no_grad():
                m(x)
        else:
            x.requires_grad_(True)
            y = m(x)[0]
            torch.autograd.grad(y.sum(), [x, *m.parameters()])
    names = sorted({e.name for e in prof.events()})
    hits = [n for n in names if "rnn" in n.lower() or "lstm_cell" in n.lower()
            or n in ("aten::gru", "aten::lstm") or n.startswith("aten::_thnn")]
    if any("mkldnn" in n for n in hits):
        return "oneDNN (" + ", ".join(n for n in hits if "mkldnn" in n) + ")"
    return "native ATen (" + (", ".join(hits) or "no rnn kernel seen") + ")"


def torch_lstm_kernel(cfg: LSTMConfig, pass_name: str) -> str:
    return torch_rnn_kernel(cfg, pass_name)


def dense_competitors(cfg: LSTMConfig, pass_name: str) -> list[Competitor]:
    """torch (default threads: the reference; 1 thread), jax_impl (Linen), jax_impl.nnx (two
    ways, see ``nnx_competitors``) and Flax's own cell under ``nn.RNN`` for an LSTM, GRU or
    RNN configuration.

    For a GRU or RNN forward pass the LSTM of the same shape runs in the same rounds too (torch
    on both thread counts, jax_impl), so that the cell's ratio is compared with the LSTM's
    paired, round by round, rather than across cases run minutes apart.
    """
    # proj_size: torch says once that oneDNN can't and falls back (recorded in the note)
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
    torch_name, torch_1t_name, jax_name, flax_name = dense_names(cfg.cell)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((cfg.batch, cfg.steps, cfg.input_size), dtype=np.float32)
    xt = torch.from_numpy(x_np)
    xj = jnp.asarray(x_np)

    model = _jax_dense(cfg)
    variables = model.init(jax.random.key(0), xj)
    run_jax = _jax_runner(model.apply, variables, xj, pass_name, output=lambda r: r[0])

    out = _torch_dense_pair(cfg, xt, pass_name, torch_name, torch_1t_name) + [
        Competitor(jax_name, "jax", run_jax, note="jit"),
    ]
    out += nnx_competitors(_nnx_dense(cfg), variables, xj, pass_name, run_jax,
                           dense_nnx_names(cfg.cell), note="Linen's weights",
                           output=lambda r: r[0])
    if cfg.proj_size == 0:
        flax_model = FlaxStack(cfg.hidden_size, cfg.num_layers, cfg.bidirectional,
                               cell=DENSE[cfg.cell]["flax"])
        flax_vars = flax_model.init(jax.random.key(0), xj)
        run_flax = _jax_runner(flax_model.apply, flax_vars, xj, pass_name, output=lambda r: r)
        out.append(Competitor(flax_name, "jax", run_flax, note="nn.RNN, jit"))
    if cfg.cell != "lstm" and pass_name == "fwd":
        lstm_cfg = dataclasses.replace(cfg, cell="lstm")
        jlstm = _jax_dense(lstm_cfg)
        run_jlstm = _jax_runner(jlstm.apply, jlstm.init(jax.random.key(0), xj), xj, pass_name,
                                output=lambda r: r[0])
        out += _torch_dense_pair(lstm_cfg, xt, pass_name, SAME_TORCH_LSTM, SAME_TORCH_LSTM_1T)
        out.append(Competitor(SAME_JAX_LSTM, "jax", run_jlstm, note="jit"))
    return out


def _torch_dense_pair(cfg: LSTMConfig, xt: torch.Tensor, pass_name: str, name: str,
                      one_thread_name: str) -> list[Competitor]:
    """The torch module of ``cfg`` (seed 0) at torch's thread count and on one thread."""
    torch.manual_seed(0)
    module = _torch_dense(cfg, cfg.input_size)
    run = _torch_runner(lambda x: module(x)[0], xt, list(module.parameters()), pass_name)
    kernel = torch_rnn_kernel(cfg, pass_name)
    before, after = one_thread()
    return [
        Competitor(name, "torch", run, note=kernel),
        Competitor(one_thread_name, "torch", run, before=before, after=after, note=kernel),
    ]


def lstm_competitors(cfg: LSTMConfig, pass_name: str) -> list[Competitor]:
    return dense_competitors(cfg, pass_name)


# -------------------------------------------------------------------------------- ConvLSTM


def naive_convlstm(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                   kernel: int) -> torch.Tensor:
    """The common hand-written ConvLSTM: per step one conv2d over cat([x, h]), gates i,f,g,o.

    x: ``(B, T, C, H, W)``; returns the last layer's h at every step, ``(B, T, Hc, H, W)``.
    """
    batch, _, _, height, width = x.shape
    seq = list(x.unbind(1))
    for w, b in zip(weights, biases):
        hc = w.shape[0] // 4
        h = x.new_zeros(batch, hc, height, width)
        c = h
        outputs = []
        for xt in seq:
            gates = F.conv2d(torch.cat([xt, h], dim=1), w, b, padding=kernel // 2)
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        seq = outputs
    return torch.stack(seq, dim=1)


class FlaxConvLSTMStack(nn.Module):
    """Flax Linen's own ConvLSTM: ``nn.ConvLSTMCell`` under ``nn.RNN``, stacked (NHWC)."""

    hidden_channels: int
    kernel: int
    num_layers: int = 1

    @nn.compact
    def __call__(self, x):
        for _ in range(self.num_layers):
            x = nn.RNN(nn.ConvLSTMCell(self.hidden_channels, (self.kernel, self.kernel)))(x)
        return x


def _torch_impl():
    """``torch_impl.ConvLSTM2d`` (written alongside this suite; None if it is not importable)."""
    try:
        import torch_impl  # noqa: PLC0415

        return torch_impl.ConvLSTM2d
    except Exception:  # noqa: BLE001
        return None


def convlstm_competitors(cfg: ConvLSTMConfig, pass_name: str) -> list[Competitor]:
    rng = np.random.default_rng(0)
    shape_nchw = (cfg.batch, cfg.steps, cfg.in_channels, cfg.height, cfg.width)
    x_np = rng.standard_normal(shape_nchw, dtype=np.float32)
    xt = torch.from_numpy(x_np)
    out: list[Competitor] = []

    ConvLSTM2d = _torch_impl()
    if ConvLSTM2d is not None:
        torch.manual_seed(0)
        conv = ConvLSTM2d(cfg.in_channels, cfg.hidden_channels, cfg.kernel,
                          num_layers=cfg.num_layers, batch_first=True)
        run_conv = _torch_runner(lambda x: conv(x)[0], xt, list(conv.parameters()), pass_name)
        out.append(Competitor(TORCH_CONV, "torch", run_conv, note="NCHW, F.conv2d (oneDNN)"))
        if pass_name == "fwd":  # 1 thread: forward only, to bound the run time
            before, after = one_thread()
            out.append(Competitor(TORCH_CONV_1T, "torch", run_conv, before=before, after=after,
                                  note="NCHW, F.conv2d (oneDNN)"))

    torch.manual_seed(0)
    weights, biases = [], []
    bound = 1.0 / math.sqrt(cfg.hidden_channels * cfg.kernel * cfg.kernel)
    c_in = cfg.in_channels
    for _ in range(cfg.num_layers):
        weights.append(torch.empty(4 * cfg.hidden_channels, c_in + cfg.hidden_channels,
                                   cfg.kernel, cfg.kernel).uniform_(-bound, bound))
        biases.append(torch.empty(4 * cfg.hidden_channels).uniform_(-bound, bound))
        c_in = cfg.hidden_channels
    for p in weights + biases:
        p.requires_grad_(True)
    out.append(Competitor(
        TORCH_NAIVE, "torch",
        _torch_runner(lambda x: naive_convlstm(x, weights, biases, cfg.kernel), xt,
                      weights + biases, pass_name),
        note="NCHW, conv over cat([x, h])",
    ))

    xj = jnp.asarray(np.ascontiguousarray(x_np.transpose(0, 1, 3, 4, 2)))  # NHWC
    model = jax_impl.ConvLSTM(cfg.hidden_channels, cfg.kernel, num_layers=cfg.num_layers)
    variables = model.init(jax.random.key(0), xj)
    run_jax = _jax_runner(model.apply, variables, xj, pass_name, lambda r: r[0])
    out.append(Competitor(JAX_CONV, "jax", run_jax, note="NHWC, jit"))
    nnx_model = jax_nnx.ConvLSTM(cfg.in_channels, cfg.hidden_channels, cfg.kernel,
                                 cfg.num_layers, rngs=nnx.Rngs(0))
    out += nnx_competitors(nnx_model, variables, xj, pass_name, run_jax,
                           (JAX_NNX_CONV, JAX_NNX_CONV_SM), note="NHWC, Linen's weights",
                           output=lambda r: r[0])

    flax_model = FlaxConvLSTMStack(cfg.hidden_channels, cfg.kernel, cfg.num_layers)
    flax_vars = flax_model.init(jax.random.key(0), xj)
    out.append(Competitor(
        FLAX_CONV, "jax", _jax_runner(flax_model.apply, flax_vars, xj, pass_name, lambda r: r),
        note="NHWC, nn.RNN, jit",
    ))
    return out


# ------------------------------------------------------------------------------------ peak


TORCH_MM = "torch.mm"
TORCH_MM_1T = "torch.mm (1 thread)"
JAX_DOT = "jnp.dot (jit)"


def sgemm_competitors(n: int) -> list[Competitor]:
    """float32 n x n matmuls: torch default threads (the peak), torch 1 thread, XLA."""
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    a, b = torch.from_numpy(a_np), torch.from_numpy(b_np)
    before, after = one_thread()
    aj, bj = jnp.asarray(a_np), jnp.asarray(b_np)
    dot = jax.jit(jnp.dot)
    return [
        Competitor(TORCH_MM, "torch", lambda: torch.mm(a, b), note="MKL sgemm"),
        Competitor(TORCH_MM_1T, "torch", lambda: torch.mm(a, b), before=before, after=after),
        Competitor(JAX_DOT, "jax", lambda: block(dot(aj, bj))),
    ]
