"""``jax_impl.nnx``: the Flax NNX modules, against the Linen modules they mirror.

* outputs and final carry bit for bit equal to the Linen module's with the same parameters
  (float64): LSTM (2 layers, bidirectional, proj_size, with an initial carry, seq_lengths and
  reset), GRU, RNN relu, ConvLSTM and the four cells;
* ``nnx.state(m, nnx.Param)`` has the paths and shapes of Linen's ``variables["params"]``;
  missing parameters (no bias) are absent; ``load_linen_params`` / ``nnx_params_as_linen``;
* dropout: ``eval()`` is deterministic and equals Linen's deterministic call; ``train()`` with
  ``dropout_masks`` equals Linen's; without masks it draws from the module's ``'dropout'``
  stream, and a missing stream is a ValueError naming the fix;
* ``nnx.split`` / ``merge`` / ``state`` / ``jit`` / ``grad`` / ``Optimizer`` / ``eval_shape``;
* ``Stateful(nnx_module)`` equals ``Stateful(linen_module, variables)``; the NNX TBPTT step
  equals the Linen one;
* bad input: the Linen module's messages (the same checks), plus the input size;
* the eager construction time of LSTM(256, 256, 2) (printed), and the docstring examples.
"""

from __future__ import annotations

import doctest
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_impl
import jax_impl.nnx as jnnx

from jax_test_helpers import init_variables, shapes_of, to_numpy

B, T = 3, 5


def _linen_params(module, x, rng, dtype=None):
    """Random Linen-style params for ``module`` (a Linen module) on input ``x``."""
    if isinstance(module, jax_impl.linen._Cell):
        carry = module.initialize_carry(None, x.shape)
        return init_variables(module, carry, x, rng=rng, dtype=dtype)["params"]
    return init_variables(module, x, rng=rng, dtype=dtype)["params"]


def _assert_bitwise(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(leaves_a, leaves_b):
        u, v = np.asarray(u), np.asarray(v)
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


# (NNX constructor, Linen twin, input shape)
SEQUENCE_CASES = {
    "lstm-l2-bi-proj": (
        lambda **kw: jnnx.LSTM(3, 6, 2, bidirectional=True, proj_size=4, **kw),
        jax_impl.LSTM(hidden_size=6, num_layers=2, bidirectional=True, proj_size=4),
        (B, T, 3),
    ),
    "gru-l2-bi-nobias": (
        lambda **kw: jnnx.GRU(3, 5, 2, bidirectional=True, use_bias=False, **kw),
        jax_impl.GRU(hidden_size=5, num_layers=2, bidirectional=True, use_bias=False),
        (B, T, 3),
    ),
    "rnn-relu-time-major": (
        lambda **kw: jnnx.RNN(3, 5, 2, nonlinearity="relu", time_major=True, **kw),
        jax_impl.RNN(hidden_size=5, num_layers=2, nonlinearity="relu", time_major=True),
        (T, B, 3),
    ),
    "convlstm-l2": (
        lambda **kw: jnnx.ConvLSTM(2, 3, (3, 2), 2, dilation=(1, 2), **kw),
        jax_impl.ConvLSTM(hidden_channels=3, kernel_size=(3, 2), num_layers=2, dilation=(1, 2)),
        (2, 4, 5, 6, 2),
    ),
}

CELL_CASES = {
    "lstm-cell-proj": (
        lambda **kw: jnnx.LSTMCell(3, 6, proj_size=2, **kw),
        jax_impl.LSTMCell(hidden_size=6, proj_size=2),
        (B, 3),
    ),
    "gru-cell": (lambda **kw: jnnx.GRUCell(3, 5, **kw), jax_impl.GRUCell(hidden_size=5), (B, 3)),
    "rnn-cell-relu-nobias": (
        lambda **kw: jnnx.RNNCell(3, 5, nonlinearity="relu", use_bias=False, **kw),
        jax_impl.RNNCell(hidden_size=5, nonlinearity="relu", use_bias=False),
        (B, 3),
    ),
    "convlstm-cell": (
        lambda **kw: jnnx.ConvLSTMCell(2, 3, 3, dilation=2, **kw),
        jax_impl.ConvLSTMCell(hidden_channels=3, kernel_size=3, dilation=2),
        (B, 5, 6, 2),
    ),
}


# ----------------------------------------------------------------------- bitwise to Linen


def _float64_twins(case, rng):
    """``(NNX module, Linen twin, its float64 params loaded into both, x, shape)``."""
    make, linen, shape = case
    model = make(param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    x = rng.standard_normal(shape)
    params = _linen_params(linen, x, rng, dtype=jnp.float64)
    assert shapes_of(nnx_params := jnnx.nnx_params_as_linen(model)) == shapes_of(params)
    assert all(a.dtype == jnp.float64 for a in jax.tree_util.tree_leaves(nnx_params))
    jnnx.load_linen_params(model, params)
    return model, linen, params, x, shape


@pytest.mark.parametrize("case", list(SEQUENCE_CASES))
def test_sequence_module_equals_linen_bitwise_in_float64(case, x64, rng):
    model, linen, params, x, shape = _float64_twins(SEQUENCE_CASES[case], rng)
    steps, batch = shape[:2] if model.time_major else shape[:2][::-1]
    carry = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape), model.initialize_carry((batch,) + shape[2:-1])
    )
    lengths = np.array([steps, 2] + [0] * (batch - 2))
    reset = np.zeros((steps, batch) if model.time_major else (batch, steps), bool)
    reset[1, 1] = True
    for kwargs in ({}, {"seq_lengths": lengths, "reset": reset}):
        got = model(x, carry, **kwargs)
        want = linen.apply({"params": params}, x, carry, **kwargs)
        _assert_bitwise(got, want)
    unbatched = x[:, 0] if model.time_major else x[0]
    _assert_bitwise(model(unbatched), linen.apply({"params": params}, unbatched))


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_cell_equals_linen_bitwise_in_float64(case, x64, rng):
    cell, linen, params, x, shape = _float64_twins(CELL_CASES[case], rng)
    carry = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape), cell.initialize_carry(shape)
    )
    assert shapes_of(carry) == shapes_of(linen.initialize_carry(None, shape))
    got = cell(carry, x)
    _assert_bitwise(got, linen.apply({"params": params}, carry, x))
    if isinstance(carry, tuple):  # the carry type is kept: LSTMState, or a plain tuple
        assert type(got[0]) is type(carry)
        assert type(cell(tuple(carry), x)[0]) is tuple


def test_cell_drives_flax_nnx_rnn(rng):
    cell = jnnx.GRUCell(3, 4, rngs=nnx.Rngs(0))
    x = rng.standard_normal((B, T, 3)).astype(np.float32)
    ys = nnx.RNN(cell)(x)
    h = cell.initialize_carry((B, 3))
    for t in range(T):
        h, y = cell(h, x[:, t])
        np.testing.assert_allclose(ys[:, t], y, atol=1e-6)


# --------------------------------------------------------------------- parameters, paths


def _paths(module):
    return sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(
        nnx.state(module, nnx.Param)))


LSTM_L2_BI_PROJ_PATHS = [
    f"{layer}/{name}"
    for layer in ("layer_0", "layer_0_reverse", "layer_1", "layer_1_reverse")
    for name in ("hh_bias", "hh_kernel", "ih_bias", "ih_kernel", "proj_kernel")
]


def test_paths_are_the_linen_paths():
    lstm = jnnx.LSTM(3, 6, 2, bidirectional=True, proj_size=4, rngs=nnx.Rngs(0))
    assert _paths(lstm) == LSTM_L2_BI_PROJ_PATHS
    shapes = shapes_of(jnnx.nnx_params_as_linen(lstm))
    assert shapes["layer_0"] == {"ih_kernel": (3, 24), "hh_kernel": (4, 24), "ih_bias": (24,),
                                 "hh_bias": (24,), "proj_kernel": (6, 4)}
    assert shapes["layer_1_reverse"]["ih_kernel"] == (8, 24)
    assert _paths(jnnx.GRU(3, 4, use_bias=False, rngs=nnx.Rngs(0))) == [
        "layer_0/hh_kernel", "layer_0/ih_kernel"]
    assert not hasattr(jnnx.GRU(3, 4, use_bias=False, rngs=nnx.Rngs(0)).layer_0, "ih_bias")
    assert _paths(jnnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))) == [
        "hh_bias", "hh_kernel", "ih_bias", "ih_kernel"]
    assert _paths(jnnx.ConvLSTMCell(2, 3, 3, use_bias=False, rngs=nnx.Rngs(0))) == [
        "hh_kernel", "ih_kernel"]


def test_init_is_torch_uniform_and_follows_the_rngs():
    lstm = jnnx.LSTM(8, 16, 2, rngs=nnx.Rngs(0))
    bound = 1 / np.sqrt(16)
    for value in jax.tree_util.tree_leaves(jnnx.nnx_params_as_linen(lstm)):
        value = np.asarray(value)
        assert value.dtype == np.float32 and np.abs(value).max() <= bound
        assert np.abs(value).max() > 0.9 * bound and abs(value.mean()) < 0.1 * bound
    conv = jnnx.ConvLSTMCell(2, 4, 3, rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(conv.ih_kernel[...])).max() <= 1 / np.sqrt(4 * 9)
    again = jnnx.nnx_params_as_linen(jnnx.LSTM(8, 16, 2, rngs=nnx.Rngs(0)))
    _assert_bitwise(jnnx.nnx_params_as_linen(lstm), again)
    other = jnnx.nnx_params_as_linen(jnnx.LSTM(8, 16, 2, rngs=nnx.Rngs(1)))
    assert not np.array_equal(other["layer_0"]["ih_kernel"], again["layer_0"]["ih_kernel"])
    # every layer-direction draws its own values
    assert not np.array_equal(again["layer_0"]["hh_kernel"], again["layer_1"]["hh_kernel"])
    # built under a trace (nnx.jit) or abstractly, the same values / shapes
    traced = nnx.jit(lambda: jnnx.LSTM(8, 16, 2, rngs=nnx.Rngs(0)))()
    _assert_bitwise(jnnx.nnx_params_as_linen(traced), again)
    abstract = nnx.eval_shape(lambda: jnnx.LSTM(8, 16, 2, rngs=nnx.Rngs(0)))
    assert shapes_of(jnnx.nnx_params_as_linen(abstract)) == shapes_of(again)


def test_load_linen_params_checks_paths_and_shapes(rng):
    lstm = jnnx.LSTM(3, 4, rngs=nnx.Rngs(0))
    params = jax.tree_util.tree_map(np.asarray, jnnx.nnx_params_as_linen(lstm))
    jnnx.load_linen_params(lstm, {"params": params})  # a variables dict is unwrapped
    wrong = {"layer_0": {**params["layer_0"], "hh_kernel": np.zeros((5, 16), np.float32)}}
    with pytest.raises(ValueError, match=r"parameter layer_0/hh_kernel has shape \(5, 16\), "
                                         r"expected \(4, 16\)"):
        jnnx.load_linen_params(lstm, wrong)
    missing = {"layer_0": {k: v for k, v in params["layer_0"].items() if k != "ih_bias"}}
    with pytest.raises(ValueError, match=r"params lack layer_0/ih_bias \(expected shape "
                                         r"\(16,\)\) that LSTM has"):
        jnnx.load_linen_params(lstm, missing)
    extra = {**params, "layer_1": params["layer_0"]}
    with pytest.raises(ValueError, match=r"params hold layer_1/hh_bias, which LSTM has no "
                                         r"parameter for"):
        jnnx.load_linen_params(lstm, extra)
    with pytest.raises(TypeError, match="x64 mode is off"):
        jnnx.load_linen_params(lstm, jax.tree_util.tree_map(
            lambda a: a.astype(np.float64), params))
    new = {"layer_0": {k: rng.standard_normal(v.shape).astype(np.float32)
                       for k, v in params["layer_0"].items()}}
    jnnx.load_linen_params(lstm, new)
    _assert_bitwise(jnnx.nnx_params_as_linen(lstm), jax.tree_util.tree_map(jnp.asarray, new))


# ------------------------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropping():
    """An LSTM with inter-layer dropout, its Linen twin and params, an input."""
    model = jnnx.LSTM(3, 4, 3, dropout=0.5, rngs=nnx.Rngs(params=0, dropout=1))
    params = jnnx.nnx_params_as_linen(model)
    x = np.random.default_rng(5).standard_normal((B, T, 3)).astype(np.float32)
    return model, params, x


def test_dropout_is_on_by_default_and_eval_train_switch_it(dropping):
    model, params, x = dropping
    assert model.deterministic is False  # nnx.Dropout's default
    model.eval()
    assert model.deterministic is True
    y1, _ = model(x)
    y2, _ = model(x)
    _assert_bitwise(y1, y2)
    _assert_bitwise(y1, model.linen.apply({"params": params}, x)[0])
    model.train()
    assert model.deterministic is False
    count = int(model.rngs.count[...])
    t1, _ = model(x)
    t2, _ = model(x)
    assert int(model.rngs.count[...]) == count + 2  # one key per call from the stream
    assert not np.array_equal(t1, t2) and not np.array_equal(t1, y1)
    _assert_bitwise(model(x, deterministic=True)[0], y1)  # a per-call override
    _assert_bitwise(nnx.view(model, deterministic=True)(x)[0], y1)


def test_train_with_masks_equals_linen_with_the_same_masks(dropping):
    model, params, x = dropping
    model.train()
    keep = np.random.default_rng(6)
    masks = [keep.random((B, T, 4)) > 0.5 for _ in range(2)]
    got = model(x, dropout_masks=masks)
    want = model.linen.apply({"params": params}, x, deterministic=False, dropout_masks=masks)
    _assert_bitwise(got, want)
    # a key brought to the call: the same masks for the same key, the stream untouched
    count = int(model.rngs.count[...])
    _assert_bitwise(model(x, rngs=jax.random.key(3)), model(x, rngs=jax.random.key(3)))
    assert not np.array_equal(model(x, rngs=jax.random.key(4))[0],
                              model(x, rngs=jax.random.key(3))[0])
    assert int(model.rngs.count[...]) == count


def test_missing_dropout_stream_is_value_error_naming_the_fix(dropping):
    _, _, x = dropping
    model = jnnx.LSTM(3, 4, 3, dropout=0.5, rngs=nnx.Rngs(params=0))
    assert model.rngs is None
    with pytest.raises(ValueError, match=r"LSTM has dropout=0.5 and is training \("
                                         r"deterministic=False\) but has no 'dropout' rng "
                                         r"stream: build it with rngs=nnx.Rngs\(params=0, "
                                         r"dropout=1\)"):
        model(x)
    model(x, rngs=nnx.Rngs(dropout=2))  # a stream brought to the call
    model.eval()
    model(x)  # no dropout, no stream needed
    assert jnnx.LSTM(3, 4, 1, dropout=0.5, rngs=nnx.Rngs(0)).rngs is None  # nothing to drop


# -------------------------------------------------------------------- the NNX transforms


@pytest.fixture(scope="module")
def gru():
    model = jnnx.GRU(3, 4, 2, bidirectional=True, rngs=nnx.Rngs(0))
    x = np.random.default_rng(7).standard_normal((B, T, 3)).astype(np.float32)
    return model, x


def test_split_merge_state_and_jit(gru):
    model, x = gru
    y, h = model(x)
    graphdef, state = nnx.split(model)
    assert _paths(model) == sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(state))
    _assert_bitwise(nnx.merge(graphdef, state)(x), (y, h))
    params = nnx.state(model, nnx.Param)
    _assert_bitwise(params["layer_1_reverse"]["hh_kernel"][...],
                    model.layer_1_reverse.hh_kernel[...])
    jitted = nnx.jit(lambda m, x: m(x))
    got = jitted(model, x)
    want = jax.jit(model.linen.apply)({"params": jnnx.nnx_params_as_linen(model)}, x)
    _assert_bitwise(got, want)
    np.testing.assert_allclose(got[0], y, atol=1e-6)
    # nnx.update writes back
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    clone = nnx.merge(graphdef, state)
    nnx.update(clone, zeros)
    assert not np.any(clone(x)[1])


def test_grad_equals_linen_grad_and_optimizer_steps(gru):
    model, x = gru
    model = nnx.clone(model)
    target = np.ones((B, T, 8), np.float32)

    def loss(m):
        return jnp.mean(jnp.square(m(x)[0] - target))

    grads = nnx.grad(loss)(model)
    params = jnnx.nnx_params_as_linen(model)
    linen_grads = jax.grad(
        lambda p: jnp.mean(jnp.square(model.linen.apply({"params": p}, x)[0] - target))
    )(params)
    np.testing.assert_equal(to_numpy(nnx.to_pure_dict(grads)), to_numpy(linen_grads))
    optimizer = nnx.Optimizer(model, optax.sgd(0.5), wrt=nnx.Param)
    optimizer.update(model, grads)
    stepped = jnnx.nnx_params_as_linen(model)
    expected = optax.apply_updates(params, jax.tree_util.tree_map(lambda g: -0.5 * g,
                                                                  linen_grads))
    np.testing.assert_allclose(to_numpy(stepped)["layer_0"]["ih_kernel"],
                               to_numpy(expected)["layer_0"]["ih_kernel"], atol=1e-7)
    assert int(optimizer.step[...]) == 1


def test_tbptt_step_equals_the_linen_step():
    model = jnnx.LSTM(3, 4, rngs=nnx.Rngs(0))
    linen, variables = model.linen, {"params": jnnx.nnx_params_as_linen(model)}
    tx = optax.adam(1e-2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step = jnnx.make_tbptt_step()
    linen_step = jax_impl.make_tbptt_step(linen, tx)
    opt_state = tx.init(variables["params"])
    data = np.random.default_rng(8).standard_normal((3, 2, 2, 6, 3)).astype(np.float32)
    carry, linen_carry = None, None
    losses = []
    for x, y in data:
        y = y[..., :1].repeat(4, -1)
        carry, loss = step(model, optimizer, carry, x, y)
        variables, opt_state, linen_carry, linen_loss = linen_step(
            variables, opt_state, linen_carry, x, y)
        np.testing.assert_allclose(loss, linen_loss, rtol=1e-6)
        losses.append(float(loss))
    np.testing.assert_allclose(to_numpy(carry), to_numpy(linen_carry), atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(jnnx.nnx_params_as_linen(model))["layer_0"]["hh_kernel"],
        to_numpy(variables["params"])["layer_0"]["hh_kernel"], atol=1e-6)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        jnnx.make_tbptt_step(loss_fn=3)


# ------------------------------------------------------------------------------ Stateful


def test_stateful_with_an_nnx_module_equals_stateful_with_linen():
    model = jnnx.LSTM(3, 4, 2, rngs=nnx.Rngs(0))
    params = jnnx.nnx_params_as_linen(model)
    stream = jax_impl.Stateful(model)
    linen_stream = jax_impl.Stateful(jax_impl.LSTM(hidden_size=4, num_layers=2),
                                     {"params": params})
    rng = np.random.default_rng(9)
    for steps in (4, 3, 4):
        x = rng.standard_normal((B, steps, 3)).astype(np.float32)
        _assert_bitwise(stream(x), linen_stream(x))
    _assert_bitwise(stream.carry, linen_stream.carry)
    assert stream.compilations == linen_stream.compilations
    with pytest.raises(TypeError, match="Stateful and LinenView need a jax_impl.nnx LSTM, GRU, "
                                        "RNN or ConvLSTM, got GRUCell"):
        jax_impl.Stateful(jnnx.GRUCell(3, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="Stateful needs the variables of a Linen module"):
        jax_impl.Stateful(jax_impl.LSTM(hidden_size=4))


# ---------------------------------------------------------------------------- bad inputs


def _message(call):
    try:
        call()
    except (TypeError, ValueError) as error:
        return type(error), str(error)
    raise AssertionError("no error raised")


@pytest.fixture(scope="module")
def pair():
    model = jnnx.LSTM(2, 4, 2, bidirectional=True, dropout=0.5, rngs=nnx.Rngs(0))
    return model, {"params": jnnx.nnx_params_as_linen(model)}


BAD_CALLS = {
    "rank": (np.zeros((B,), np.float32), {}),
    "int-input": (np.zeros((B, T, 2), np.int32), {}),
    "carry-not-pair": (np.zeros((B, T, 2), np.float32), {"carry": np.zeros((4, B, 4))}),
    "carry-shape": (np.zeros((B, T, 2), np.float32),
                    {"carry": (np.zeros((2, B, 4)), np.zeros((4, B, 4)))}),
    "lengths-shape": (np.zeros((B, T, 2), np.float32), {"seq_lengths": np.array([5, 5])}),
    "lengths-range": (np.zeros((B, T, 2), np.float32), {"seq_lengths": np.array([5, 6, 1])}),
    "reset-dtype": (np.zeros((B, T, 2), np.float32), {"reset": np.zeros((B, T), np.int32)}),
    "masks-count": (np.zeros((B, T, 2), np.float32), {"dropout_masks": []}),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_the_linen_message(pair, case):
    model, variables = pair
    x, kwargs = BAD_CALLS[case]
    kwargs = dict(kwargs)
    carry = kwargs.pop("carry", None)
    got = _message(lambda: model(x, carry, **kwargs))
    want = _message(lambda: model.linen.apply(variables, x, carry, deterministic=False,
                                              rngs={"dropout": jax.random.key(0)}, **kwargs))
    assert got == want


def test_input_size_differing_from_the_constructor_is_value_error():
    x7 = np.zeros((B, T, 7), np.float32)
    with pytest.raises(ValueError, match="LSTM input has 7 features, expected input_size 8"):
        jnnx.LSTM(8, 4, rngs=nnx.Rngs(0))(x7)
    with pytest.raises(ValueError, match="GRU input has 7 features, expected input_size 8"):
        nnx.jit(lambda m, x: m(x))(jnnx.GRU(8, 4, rngs=nnx.Rngs(0)), x7)
    with pytest.raises(ValueError, match="ConvLSTM input has 7 channels, expected "
                                         "input_channels 2"):
        jnnx.ConvLSTM(2, 4, 3, rngs=nnx.Rngs(0))(np.zeros((B, T, 5, 5, 7), np.float32))
    with pytest.raises(ValueError, match="LSTMCell input has 7 features, expected input_size 3"):
        cell = jnnx.LSTMCell(3, 4, rngs=nnx.Rngs(0))
        cell(cell.initialize_carry((B, 3)), x7[:, 0])
    with pytest.raises(ValueError, match="ConvLSTMCell input has 7 channels, expected "
                                         "input_channels 2"):
        cell = jnnx.ConvLSTMCell(2, 4, 3, rngs=nnx.Rngs(0))
        cell(cell.initialize_carry((B, 5, 5, 2)), np.zeros((B, 5, 5, 7), np.float32))


@pytest.mark.parametrize(
    "make,error,message",
    [
        (lambda r: jnnx.LSTM(3, 4, proj_size=4, rngs=r), ValueError,
         r"proj_size must be smaller than hidden_size \(4\), got 4"),
        (lambda r: jnnx.GRU(3, 4, dropout=1.0, rngs=r), ValueError,
         r"dropout must lie in \[0, 1\), got 1.0"),
        (lambda r: jnnx.RNN(3, 4, nonlinearity="gelu", rngs=r), ValueError,
         r"nonlinearity must be 'tanh' or 'relu', got 'gelu'"),
        (lambda r: jnnx.ConvLSTM(3, 4, 0, rngs=r), ValueError, r"kernel_size must be >= 1, got 0"),
        (lambda r: jnnx.LSTM(0, 4, rngs=r), ValueError, r"input_size must be >= 1, got 0"),
        (lambda r: jnnx.ConvLSTMCell(3.0, 4, 3, rngs=r), TypeError,
         r"input_channels must be an int, got float"),
        (lambda r: jnnx.LSTM(3, 4, backward="fast", rngs=r), ValueError, r"backward must be"),
        (lambda r: jnnx.LSTM(3, 4, rngs=None), TypeError,
         r"LSTM draws its parameters from rngs, an nnx.Rngs: pass rngs=nnx.Rngs\(0\)"),
        (lambda r: jnnx.GRU(3, 4, proj_size=2, rngs=r), TypeError,
         r"GRU\(\): got an unexpected keyword argument 'proj_size'"),
        (lambda r: jnnx.GRU(3, 4, 1, True, rngs=r), TypeError,
         r"GRU\(\): too many positional arguments"),
        (lambda r: jnnx.ConvLSTM(3, 4, rngs=r), TypeError,
         r"ConvLSTM\(\): missing a required argument: 'kernel_size'"),
        (lambda r: jnnx.RNNCell(3, 4), TypeError, r"RNNCell\(\): missing a required argument: 'rngs'"),
    ],
    ids=["proj", "dropout", "nonlinearity", "kernel", "input-size", "input-float", "backward",
         "no-rngs", "gru-proj", "positional", "no-kernel", "cell-no-rngs"],
)
def test_constructors_validate_their_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make(nnx.Rngs(0))


@pytest.mark.parametrize("cls, positional", [
    (jnnx.LSTM, ["input_size", "hidden_size", "num_layers"]),
    (jnnx.GRU, ["input_size", "hidden_size", "num_layers"]),
    (jnnx.RNN, ["input_size", "hidden_size", "num_layers"]),
    (jnnx.ConvLSTM, ["input_channels", "hidden_channels", "kernel_size", "num_layers"]),
    (jnnx.LSTMCell, ["input_size", "hidden_size"]),
    (jnnx.GRUCell, ["input_size", "hidden_size"]),
    (jnnx.RNNCell, ["input_size", "hidden_size"]),
    (jnnx.ConvLSTMCell, ["input_channels", "hidden_channels", "kernel_size"]),
])
def test_signature_is_torch_order_then_the_linen_fields(cls, positional):
    """The constructor is declared once from the Linen twin: torch's positional arguments,
    then every other Linen field keyword-only with the Linen default, then rngs."""
    import dataclasses
    import inspect

    parameters = inspect.signature(cls).parameters
    kinds = [p.kind for p in parameters.values()]
    assert list(parameters)[: len(positional)] == positional
    assert kinds.count(inspect.Parameter.POSITIONAL_OR_KEYWORD) == len(positional)
    fields = {f.name: f.default for f in dataclasses.fields(cls._linen_type)
              if f.name not in ("parent", "name")}
    for name, default in fields.items():
        if name not in positional:
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
            assert parameters[name].default == default, name
    assert list(parameters)[-1] == "rngs" and parameters["rngs"].default is inspect.Parameter.empty
    # every option reads back from the module, as given
    options = {name: 2 for name in ("num_layers",) if name in fields}
    module = cls(3, 5, *([3] if "kernel_size" in positional else []), **options,
                 rngs=nnx.Rngs(0))
    for name in fields:
        assert getattr(module, name) == getattr(module.linen, name), name
    assert getattr(module, positional[0]) == 3


# -------------------------------------------------------------------- construction, docs


def test_eager_construction_time_lstm_256_256_2(capsys):
    jnnx.LSTM(4, 8, rngs=nnx.Rngs(0))  # what a process pays once (Rngs, its fold_in)
    rngs, times = nnx.Rngs(1), []
    for _ in range(3):
        start = time.perf_counter()
        lstm = jnnx.LSTM(256, 256, 2, rngs=rngs)
        jax.block_until_ready(nnx.state(lstm))
        times.append(time.perf_counter() - start)
    with capsys.disabled():
        print(f"\nnnx.LSTM(256, 256, 2) eager construction: first {times[0] * 1e3:.1f} ms, "
              f"best of 3 {min(times) * 1e3:.1f} ms")
    assert lstm.layer_1.ih_kernel[...].shape == (256, 1024)


def test_docstring_examples_run():
    result = doctest.testmod(jnnx, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 30 and result.failed == 0


def test_jax_impl_nnx_is_imported_on_first_use():
    assert jax_impl.nnx is jnnx
    assert "nnx" not in jax_impl.__all__
