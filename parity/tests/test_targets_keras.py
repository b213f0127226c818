"""The keras target: torch weights in Keras 3 layers (JAX backend), compared through the harness
(full, chunked, packed, grads by torch name), both ways, a layer built by hand, wrong ports that
must fail, and the options Keras cannot express."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras' first import

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import torch_impl  # noqa: E402
from parity import compare, to_jax, to_torch  # noqa: E402
from parity.report import FORWARD_ATOL  # noqa: E402
from parity.tests.torch_threads import one_torch_thread  # noqa: E402, F401  (autouse)

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":
    pytest.skip("keras was imported with another backend", allow_module_level=True)

# zeros at build (the weights are then set): Keras' default initializers take seconds to compile
FAST = {"kernel_initializer": "zeros", "recurrent_initializer": "zeros"}

# name -> (torch module, input shape, compare options)
CASES = {
    "lstm": (lambda: torch.nn.LSTM(4, 5, batch_first=True), (2, 6, 4), {"chunks": 3}),
    "lstm-time-major": (lambda: torch.nn.LSTM(4, 5), (6, 2, 4), {"chunks": [2, 4]}),
    "gru": (lambda: torch.nn.GRU(4, 5, batch_first=True), (2, 6, 4), {"chunks": 3}),
    "rnn-tanh": (lambda: torch.nn.RNN(4, 5, batch_first=True), (2, 6, 4), {"chunks": 3}),
    "rnn-relu": (lambda: torch.nn.RNN(4, 5, nonlinearity="relu"), (6, 2, 4), {"chunks": 3}),
    "convlstm-k3": (lambda: torch_impl.ConvLSTM2d(2, 3, 3, batch_first=True), (2, 4, 2, 5, 6),
                    {"chunks": 2}),
    "convlstm-k2x4": (lambda: torch_impl.ConvLSTM2d(2, 3, (2, 4)), (4, 2, 2, 5, 6),
                      {"chunks": 2}),
    "convlstm-dilated": (lambda: torch_impl.ConvLSTM2d(2, 3, (3, 2), dilation=(2, 1),
                                                       batch_first=True), (2, 4, 2, 6, 5),
                         {"chunks": 2}),
    "lstm-bidirectional": (lambda: torch.nn.LSTM(4, 5, bidirectional=True, batch_first=True),
                           (2, 6, 4), {"chunks": 3}),
    "gru-bidirectional": (lambda: torch.nn.GRU(4, 5, bidirectional=True), (6, 2, 4),
                          {"chunks": 3}),
    "lstm-cell": (lambda: torch.nn.LSTMCell(4, 5), (6, 2, 4), {"chunks": 3}),
    "gru-cell": (lambda: torch.nn.GRUCell(4, 5), (6, 2, 4), {"chunks": 3}),
    "rnn-cell": (lambda: torch.nn.RNNCell(4, 5, nonlinearity="relu"), (6, 2, 4), {"chunks": 3}),
}


def _convert(module, dtype=torch.float64):
    with jax.enable_x64(dtype == torch.float64):
        layer, variables = to_jax(module, target="keras")
    assert variables is None
    return layer


def _outputs(module, x, state=None):
    """A torch module's output and state, cells stepped over time."""
    with torch.no_grad():
        if isinstance(module, torch.nn.RNNCellBase):
            ys = []
            for step in x:
                state = module(step, state)
                ys.append(state[0] if isinstance(state, tuple) else state)
            return [torch.stack(ys), *(state if isinstance(state, tuple) else (state,))]
        y, state = module(x, state)
        return [y, *(state if isinstance(state, tuple) else (state,))]


# float64 validates every case; float32 runs of these variants go to the slow step
SLOW_IN_FLOAT32 = {"convlstm-dilated", "gru-bidirectional", "lstm-time-major"}


PORT_CASES = [
    pytest.param(name, dtype, id=f"{name}-{tag}",
                 marks=[pytest.mark.slow] if tag == "f32" and name in SLOW_IN_FLOAT32 else [])
    for name in sorted(CASES) for dtype, tag in ((torch.float64, "f64"), (torch.float32, "f32"))
]


@pytest.mark.parametrize("name, dtype", PORT_CASES)
def test_keras_port_matches_torch(name, dtype):
    torch.manual_seed(0)
    make, shape, options = CASES[name]
    module = make().to(dtype)
    layer = _convert(module, dtype)
    report = compare(module, torch.randn(*shape, dtype=dtype), jax_module=layer,
                     initial_state="random", grads=True, **options)
    report.assert_ok()
    if dtype == torch.float64:
        assert report.worst("output") <= 1e-14


@pytest.mark.parametrize("name", ["lstm", "lstm-time-major", "gru", "rnn-relu",
                                  "lstm-bidirectional", "gru-bidirectional"])
def test_packed_lengths_match_torch(name):
    """Keras' mask keeps the state past each length (torch's packed final state); the port
    zeroes the outputs there (torch's pad_packed_sequence)."""
    torch.manual_seed(1)
    make, shape, _ = CASES[name]
    module = make().double()
    report = compare(module, torch.randn(*shape, dtype=torch.float64),
                     jax_module=_convert(module), seq_lengths=[6, 3], initial_state="random",
                     grads=True)
    report.assert_ok()


@pytest.mark.parametrize("name", ["lstm", "gru", "rnn-relu", "convlstm-k2x4", "convlstm-dilated",
                                  "lstm-cell", "gru-cell", "lstm-bidirectional"])
def test_round_trip_is_the_same_function(name):
    """torch -> Keras -> torch: summed biases come back as (sum, zeros) and a dilated
    ConvLSTM as its zero-stuffed undilated twin: equal as functions, in float64."""
    torch.manual_seed(2)
    make, shape, _ = CASES[name]
    module = make().double()
    back = to_torch(_convert(module))
    assert type(back) is type(module)
    x = torch.randn(*shape, dtype=torch.float64)
    time_major = getattr(module, "batch_first", True) is False  # to_torch's are batch-first
    want, got = _outputs(module, x), _outputs(back, x.transpose(0, 1) if time_major else x)
    if time_major:
        got[0] = got[0].transpose(0, 1)
    for a, b in zip(want, got):
        assert (a - b).abs().max().item() <= FORWARD_ATOL[torch.float64]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_gru_round_trip_is_bit_exact(bidirectional):
    """The GRU keeps both biases (Keras' (2, 3H) bias): the state_dict comes back bit for bit."""
    torch.manual_seed(3)
    module = torch.nn.GRU(4, 5, batch_first=True, bidirectional=bidirectional).double()
    layer = _convert(module)
    assert isinstance(layer, keras.layers.Bidirectional) == bidirectional
    back = to_torch(layer)
    assert back.batch_first and back.bidirectional == bidirectional
    for key, tensor in module.state_dict().items():
        assert back.state_dict()[key].dtype == tensor.dtype
        assert torch.equal(back.state_dict()[key], tensor), key


def test_summed_bias_goes_back_as_the_sum_and_zeros():
    torch.manual_seed(4)
    module = torch.nn.LSTM(4, 5).double()
    back = to_torch(_convert(module)).state_dict()
    assert torch.equal(back["bias_hh_l0"], torch.zeros_like(back["bias_hh_l0"]))
    assert torch.equal(back["bias_ih_l0"], module.bias_ih_l0 + module.bias_hh_l0)
    assert torch.equal(back["weight_ih_l0"], module.weight_ih_l0)


def test_the_layer_is_a_plain_keras_layer():
    """Called by Keras itself (mask included), and its config survives from_config."""
    torch.manual_seed(5)
    module = torch.nn.LSTM(4, 5, batch_first=True)
    layer = _convert(module, torch.float32)
    assert isinstance(layer, keras.layers.LSTM) and layer.built
    x = torch.randn(2, 6, 4)
    mask = np.arange(6)[None, :] < np.array([[6], [3]])
    y, h, c = layer(x.numpy(), mask=mask)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 3]), batch_first=True,
                                                     enforce_sorted=False)
    with torch.no_grad():
        y_t, (h_t, c_t) = module(packed)
        y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(y_t, batch_first=True, total_length=6)
    np.testing.assert_allclose(np.asarray(y), y_t.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(h), h_t[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(c), c_t[0].numpy(), atol=1e-6)
    twin = keras.layers.LSTM.from_config(layer.get_config())
    twin.build((None, None, 4))
    twin.set_weights(layer.get_weights())
    np.testing.assert_array_equal(np.asarray(twin(x.numpy())[0]), np.asarray(layer(x.numpy())[0]))


def test_a_saved_model_loads_with_the_same_function(tmp_path):
    """The layer's activations (carryover>tanh, ...) are registered with keras.saving."""
    torch.manual_seed(5)
    layer = _convert(torch.nn.GRU(4, 5, batch_first=True), torch.float32)
    model = keras.Sequential([keras.Input((6, 4)), layer])
    model.save(tmp_path / "gru.keras")
    loaded = keras.saving.load_model(tmp_path / "gru.keras")
    assert loaded.layers[0].get_config()["activation"]["config"] == "carryover>tanh"
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype("float32")
    for a, b in zip(model(x), loaded(x)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_layer_built_by_hand_passes():
    """A user's own Keras LSTM (Keras' default activations), weights copied by user code."""
    torch.manual_seed(6)
    lstm = torch.nn.LSTM(4, 5, batch_first=True)
    layer = keras.layers.LSTM(5, return_sequences=True, return_state=True)
    layer.build((None, None, 4))
    sd = {k: v.detach().numpy() for k, v in lstm.state_dict().items()}
    layer.set_weights([sd["weight_ih_l0"].T, sd["weight_hh_l0"].T,
                       sd["bias_ih_l0"] + sd["bias_hh_l0"]])
    x = torch.randn(2, 6, 4)
    compare(lstm, x, jax_module=layer, chunks=3, initial_state="random", grads=True).assert_ok()
    compare(lstm, x, jax_module=layer, seq_lengths=[4, 6], grads=True).assert_ok()


def test_default_tanh_is_float32_inside_a_float64_layer():
    """Keras' "tanh" computes float64 in float32: a float64 layer with the defaults is ~1e-7
    off (what the module docstring says), the converted layer (carryover>tanh) ~1e-16."""
    torch.manual_seed(7)
    lstm = torch.nn.LSTM(4, 5, batch_first=True).double()
    with jax.enable_x64(True):
        ours = to_jax(lstm, target="keras")[0]
        layer = keras.layers.LSTM(5, return_sequences=True, return_state=True, dtype="float64",
                                  **FAST)
        layer.build((None, None, 4))
        layer.set_weights(ours.get_weights())
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    report = compare(lstm, x, jax_module=layer)
    assert not report.ok and 1e-10 < report.worst("output") < 1e-6
    assert compare(lstm, x, jax_module=ours).worst("output") <= 1e-14


# ------------------------------------------------------------------------------ wrong ports


def _swap_i_f(a):
    i, f, g, o = np.split(np.asarray(a), 4, axis=-1)
    return np.concatenate([f, i, g, o], axis=-1)


def test_gate_order_swapped_fails():
    torch.manual_seed(8)
    module = torch.nn.LSTM(4, 5, batch_first=True).double()
    layer = _convert(module)
    with jax.enable_x64(True):
        swapped = [jnp.asarray(_swap_i_f(v.value)) for v in layer.trainable_variables]
    report = compare(module, torch.randn(2, 6, 4, dtype=torch.float64), jax_module=layer,
                     variables=swapped, initial_state="random")
    assert not report.ok
    assert {c.tensor for c in report.failures} >= {"output", "h_n", "c_n"}


def test_bias_dropped_fails():
    """A layer without a bias: the forward differs and the gradient check names the bias."""
    torch.manual_seed(9)
    module = torch.nn.LSTM(4, 5, batch_first=True).double()
    with jax.enable_x64(True):
        layer = keras.layers.LSTM(5, use_bias=False, return_sequences=True, return_state=True,
                                  dtype="float64", **FAST)
        layer.build((None, None, 4))
        layer.set_weights(_convert(module).get_weights()[:2])
    report = compare(module, torch.randn(2, 6, 4, dtype=torch.float64), jax_module=layer,
                     grads=True)
    assert not report.ok
    assert any(c.tensor == "output" for c in report.failures)
    assert any(c.tensor == "grad/params" and "bias" in c.note for c in report.failures)


class _SwappedCarryLSTM(keras.layers.LSTM):
    """Reads and returns its state as [c, h] where Keras' and torch's order is [h, c]."""

    def call(self, sequences, initial_state=None, mask=None, training=False):
        h, c = initial_state
        y, h, c = super().call(sequences, initial_state=[c, h], mask=mask, training=training)
        return y, c, h


def test_carry_order_swapped_fails():
    torch.manual_seed(10)
    module = torch.nn.LSTM(4, 5, batch_first=True).double()
    with jax.enable_x64(True):
        layer = _SwappedCarryLSTM(5, return_sequences=True, return_state=True, dtype="float64",
                                  **FAST)
        layer.build((None, None, 4))
        layer.set_weights(_convert(module).get_weights())
    report = compare(module, torch.randn(2, 6, 4, dtype=torch.float64), jax_module=layer,
                     chunks=3, initial_state="random")
    assert not report.ok
    assert any(c.tensor == "h_n" for c in report.failures)
    assert any(c.run.startswith("chunks") and c.tensor == "output" for c in report.failures)


def test_gru_reset_before_fails():
    """reset_after=False (reset gate before the recurrent matmul, one bias row): runs, and is
    reported, not raised."""
    torch.manual_seed(11)
    module = torch.nn.GRU(4, 5, batch_first=True).double()
    ours = _convert(module)
    with jax.enable_x64(True):
        layer = keras.layers.GRU(5, reset_after=False, return_sequences=True, return_state=True,
                                 dtype="float64", **FAST)
        layer.build((None, None, 4))
        kernel, recurrent, bias = ours.get_weights()
        layer.set_weights([kernel, recurrent, bias[0] + bias[1]])
    report = compare(module, torch.randn(2, 6, 4, dtype=torch.float64), jax_module=layer,
                     initial_state="random", grads=True)
    assert not report.ok
    assert any(c.tensor == "output" for c in report.failures)
    assert any(c.tensor == "grad/params" and "bias" in c.note for c in report.failures)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("make, option", [
    (lambda: torch.nn.LSTM(4, 5, num_layers=2), "num_layers"),
    (lambda: torch.nn.LSTM(4, 5, proj_size=3), "proj_size"),
    (lambda: torch_impl.ConvLSTMCell(2, 3, 3), "ConvLSTMCell"),
])
def test_unsupported_torch_options_name_the_option(make, option):
    with pytest.raises(ValueError, match=rf"{option}.*'keras'.*'linen' and 'nnx'"):
        to_jax(make(), target="keras")


def test_time_major_is_unsupported():
    with pytest.raises(ValueError, match=r"time_major.*'keras'.*'linen' and 'nnx'"):
        to_jax(torch.nn.LSTM(4, 5), target="keras", time_major=True)


@pytest.mark.parametrize("make, option", [
    (lambda: keras.layers.LSTM(5, go_backwards=True, **FAST), "go_backwards"),
    (lambda: keras.layers.GRU(5, reset_after=False, **FAST), "reset_after"),
    (lambda: keras.layers.LSTM(5, activation="relu", **FAST), "activation"),
    (lambda: keras.layers.GRU(5, recurrent_activation="hard_sigmoid", **FAST), "recurrent_activation"),
    (lambda: keras.layers.ConvLSTM2D(3, 3, strides=2, **FAST), "strides"),
    (lambda: keras.layers.ConvLSTM2D(3, 3, **FAST), "padding"),
    (lambda: keras.layers.ConvLSTM2D(3, 3, padding="same", dilation_rate=2,
                                             **FAST), "dilation_rate"),
    (lambda: keras.layers.Bidirectional(keras.layers.LSTM(5, **FAST), merge_mode="sum"),
     "merge_mode"),
    (lambda: keras.layers.Bidirectional(
        keras.layers.LSTM(5, **FAST),
        backward_layer=keras.layers.LSTM(5, go_backwards=True, use_bias=False, **FAST)),
     "backward_layer with other options"),
])
def test_unsupported_keras_options_name_the_option(make, option):
    layer = make()
    layer.build((None, None, 8, 8, 2) if isinstance(layer, keras.layers.ConvLSTM2D)
                else (None, None, 4))
    with pytest.raises(ValueError, match=rf"{option}.*'keras'.*'linen' and 'nnx'"):
        to_torch(layer)


def test_a_layer_of_other_sizes_is_a_value_error():
    module = torch.nn.LSTM(4, 5, batch_first=True)
    layer = keras.layers.LSTM(6, return_sequences=True, return_state=True, **FAST)
    layer.build((None, None, 4))
    with pytest.raises(ValueError, match=r"kernel .*expected shape \(4, 20\), received \(4, 24\)"):
        compare(module, torch.randn(2, 6, 4), jax_module=layer)


def test_a_layer_without_sequences_or_states_is_a_value_error():
    layer = keras.layers.LSTM(5, **FAST)
    layer.build((None, None, 4))
    with pytest.raises(ValueError, match="return_sequences=True and return_state=True"):
        compare(torch.nn.LSTM(4, 5, batch_first=True), torch.randn(2, 6, 4), jax_module=layer)


@pytest.mark.slow  # a fresh interpreter importing torch, keras and JAX
def test_another_keras_backend_is_a_clear_error():
    """keras imported with the torch backend: converting says what to do."""
    script = textwrap.dedent("""
        import os
        os.environ["KERAS_BACKEND"] = "torch"
        import keras, torch
        from parity import to_jax
        try:
            to_jax(torch.nn.LSTM(4, 5), target="keras")
        except RuntimeError as error:
            print(error)
    """)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))), timeout=300)
    assert "needs Keras' JAX backend" in done.stdout, done.stdout + done.stderr
    assert "backend 'torch'" in done.stdout
