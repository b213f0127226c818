"""Property-based tests (Hypothesis): random configurations agree across torch and JAX.

Properties, over the module kinds (nn.LSTM, nn.GRU, nn.RNN with tanh or relu, their cells, the
ConvLSTM and its cell), random sizes, layers 1-3, directions, proj_size (LSTM), nonlinearity
(RNN), bias, kernel sizes (even ones too), dilation, batch_first / time_major, batch (unbatched
too), chunk partitions, sequence lengths and row resets:

- parity within docs/design.md's bounds (``compare(...).ok``), float64 (bound 1e-12) and float32;
- chunk invariance on each side (chunked stream == one full run);
- streams with row resets: torch stream == JAX stream == one JAX run with a reset mask;
- round trips are exact: ``to_torch(to_jax(m))`` gives the same state_dict bit for bit, dtypes
  kept; streams and checkpoints keep weights and state bit for bit.

Profiles (``tests/conftest.py``): ``ci`` (default) is derandomized and sized to run this file
in about two minutes on two cores; sizes come from small sets so compiled JAX programs are
reused across examples (``pytest --hypothesis-show-statistics`` lists the module kinds each
property drew). The release check runs at least 200 examples per property::

    HYPOTHESIS_PROFILE=release pytest parity/tests/test_properties.py
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import torch_impl
from parity import compare, stream_to_jax, stream_to_torch, to_jax, to_torch
from parity.checkpoint import load_stream, save_stream
from parity.mapping import CHANNELS_LAST


def _profile() -> str:
    """The loaded profile's name; registers the profiles when tests/conftest.py was not
    collected (this file run on its own)."""
    try:  # "release" is ours alone (Hypothesis itself has a built-in "ci")
        settings.get_profile("release")
    except InvalidArgument:
        path = Path(__file__).resolve().parents[2] / "tests" / "conftest.py"
        spec = importlib.util.spec_from_file_location("carryover_test_profiles", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return os.environ.get("HYPOTHESIS_PROFILE", "ci")


PROFILE = _profile()


def examples(ci: int) -> settings:
    """``ci`` examples under the ci profile (sized to its time budget); the profile's own
    count (>= 200) under any other."""
    if PROFILE == "ci":
        return settings(max_examples=ci)
    return settings(max_examples=max(200, settings.default.max_examples))


from parity.tests.torch_threads import one_torch_thread  # noqa: F401, E402  (autouse)

BOUND = {torch.float64: 1e-12, torch.float32: 1e-5}
# Small sets: a configuration drawn twice reuses its compiled programs.
STEPS = 6
PARTITIONS = [[6], [3, 3], [2, 4], [1, 5], [2, 2, 2], [4, 1, 1]]
SPATIAL = [(3, 3), (4, 5)]
# The dense recurrent kinds (a sequence of (..., input_size) steps); their carries: (h, c) for
# the LSTM, h alone for the GRU and the RNN.
DENSE = ("lstm", "gru", "rnn")


# ------------------------------------------------------------------------------ strategies


@st.composite
def dense_options(draw, kind: str = "lstm", cell: bool = False, bidirectional: bool = True) -> dict:
    """nn.LSTM / nn.GRU / nn.RNN (or their cells) constructor options from small sets:
    proj_size for the LSTM, nonlinearity for the RNN; ``bidirectional=False`` keeps to one
    direction (a chunked bidirectional stream is not a full run)."""
    options = dict(
        input_size=draw(st.sampled_from([1, 3])),
        hidden_size=draw(st.sampled_from([2, 4])),
        bias=draw(st.booleans()),
    )
    if kind == "rnn":
        options["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    if not cell:
        options.update(
            num_layers=draw(st.integers(1, 3)),
            bidirectional=draw(st.booleans()) if bidirectional else False,
            batch_first=draw(st.booleans()),
        )
        if kind == "lstm":
            options["proj_size"] = draw(st.sampled_from([0, 0, 1]))
    return options


def options_for(kind: str, bidirectional: bool = True):
    """The options strategy of any kind (``"gru_cell"``, ``"convlstm"``, ...)."""
    base, cell = kind.removesuffix("_cell"), kind.endswith("_cell")
    if base == "convlstm":
        return convlstm_options(cell=cell)
    return dense_options(base, cell=cell, bidirectional=bidirectional)


@st.composite
def convlstm_options(draw, cell: bool = False) -> dict:
    """ConvLSTM2d (or ConvLSTMCell) options: kernels 1-4 (even too), square or not, dilation."""
    size = st.sampled_from([1, 2, 3, 4])
    kernel = draw(st.one_of(size, st.tuples(size, size)))
    options = dict(
        input_channels=draw(st.sampled_from([1, 2])),
        hidden_channels=draw(st.sampled_from([1, 2])),
        kernel_size=kernel,
        bias=draw(st.booleans()),
        dilation=draw(st.sampled_from([1, 2, (1, 2)])),
    )
    if not cell:
        options.update(num_layers=draw(st.integers(1, 3)), batch_first=draw(st.booleans()))
    return options


def build(kind: str, options: dict, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A torch module of ``kind`` with seeded weights."""
    torch.manual_seed(seed)
    make = {
        "lstm": torch.nn.LSTM,
        "lstm_cell": torch.nn.LSTMCell,
        "gru": torch.nn.GRU,
        "gru_cell": torch.nn.GRUCell,
        "rnn": torch.nn.RNN,
        "rnn_cell": torch.nn.RNNCell,
        "convlstm": torch_impl.ConvLSTM2d,
        "convlstm_cell": torch_impl.ConvLSTMCell,
    }[kind]
    return make(**options, dtype=dtype)


STATEFUL = {
    "lstm": torch_impl.StatefulLSTM,
    "gru": torch_impl.StatefulGRU,
    "rnn": torch_impl.StatefulRNN,
    "convlstm": torch_impl.StatefulConvLSTM,
}


def parts(state: Any) -> tuple:
    """A state as a tuple: ``(h, c)`` stays, the one tensor (array) ``h`` of a GRU / RNN becomes
    ``(h,)``."""
    return tuple(state) if isinstance(state, tuple) else (state,)


def torch_input(
    kind: str, options: dict, batch: Optional[int], steps: int, dtype, seed: int,
    spatial: tuple[int, int] = (3, 3),
) -> torch.Tensor:
    """A sequence in torch's layout for the module (unbatched when ``batch`` is None)."""
    features = (options["input_size"],) if kind in DENSE else (options["input_channels"], *spatial)
    if batch is None:
        shape = (steps, *features)
    elif options.get("batch_first", False):
        shape = (batch, steps, *features)
    else:
        shape = (steps, batch, *features)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=dtype, generator=generator)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN of the same payload)."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


seeds = st.integers(0, 2**16)


# ------------------------------------------------------------------------------ parity


@examples(ci=15)
@given(
    kind=st.sampled_from(DENSE), data=st.data(), batch=st.sampled_from([None, 1, 2]),
    chunks=st.sampled_from(PARTITIONS), random_state=st.booleans(), seed=seeds,
)  # fmt: skip
def test_dense_parity_float64(kind, data, batch, chunks, random_state, seed):
    event(f"kind={kind}")
    options = data.draw(dense_options(kind), label="options")
    module = build(kind, options, torch.float64, seed)
    x = torch_input(kind, options, batch, STEPS, torch.float64, seed + 1)
    report = compare(module, x, chunks=chunks, initial_state="random" if random_state else None,
                     seed=seed)  # fmt: skip
    report.assert_ok()
    assert report.worst() <= BOUND[torch.float64]


@examples(ci=7)
@given(kind=st.sampled_from(DENSE), data=st.data(), seed=seeds)
def test_packed_lengths_parity_float64(kind, data, seed):
    """seq_lengths (torch's packed sequences; torch refuses length 0, so 1..T)."""
    event(f"kind={kind}")
    options = data.draw(dense_options(kind), label="options")
    batch = data.draw(st.sampled_from([2, 3]), label="batch")
    lengths = data.draw(st.lists(st.integers(1, STEPS), min_size=batch, max_size=batch), label="lengths")
    module = build(kind, options, torch.float64, seed)
    x = torch_input(kind, options, batch, STEPS, torch.float64, seed + 1)
    compare(module, x, seq_lengths=lengths, initial_state="random", seed=seed).assert_ok()


@examples(ci=8)
@given(
    options=convlstm_options(), batch=st.sampled_from([None, 2]), spatial=st.sampled_from(SPATIAL),
    chunks=st.sampled_from(PARTITIONS[:4]), seed=seeds,
)  # fmt: skip
def test_convlstm_parity_float64(options, batch, spatial, chunks, seed):
    module = build("convlstm", options, torch.float64, seed)
    x = torch_input("convlstm", options, batch, STEPS, torch.float64, seed + 1, spatial)
    compare(module, x, chunks=chunks, initial_state="random", seed=seed).assert_ok()


ALL_KINDS = ["lstm", "gru", "rnn", "convlstm", "lstm_cell", "gru_cell", "rnn_cell", "convlstm_cell"]


@pytest.mark.parametrize("kind", ALL_KINDS)
@examples(ci=2)
@given(data=st.data(), seed=seeds)
def test_parity_float32(kind, data, seed):
    """float32, every kind, cells too (a cell is driven over a time-major sequence of steps)."""
    event(f"kind={kind}")
    options = data.draw(options_for(kind), label="options")
    module = build(kind, options, torch.float32, seed)
    base = kind.removesuffix("_cell")
    x = torch_input(base, options, 2, STEPS, torch.float32, seed + 1)
    chunks = None if kind.endswith("_cell") else data.draw(st.sampled_from(PARTITIONS[:3]), label="chunks")
    report = compare(module, x, chunks=chunks, seed=seed)
    report.assert_ok()
    assert report.worst() <= BOUND[torch.float32]


# ------------------------------------------------------------------------------ chunking


@examples(ci=100)
@given(
    kind=st.sampled_from([*DENSE, "convlstm"]), data=st.data(), batch=st.sampled_from([None, 1, 2]),
    chunks=st.sampled_from(PARTITIONS), seed=seeds,
)  # fmt: skip
def test_torch_stream_chunked_equals_full_float64(kind, data, batch, chunks, seed):
    """Torch side: a StatefulWrapper fed chunk by chunk == the module on the whole sequence."""
    event(f"kind={kind}")
    options = data.draw(options_for(kind, bidirectional=False), label="options")
    module = build(kind, options, torch.float64, seed)
    x = torch_input(kind, options, batch, STEPS, torch.float64, seed + 1)
    time_axis = 1 if (batch is not None and options.get("batch_first")) else 0
    stream = torch_impl.StatefulWrapper(module)
    with torch.no_grad():
        y_full, state_full = module(x)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(stream(x.narrow(time_axis, start, n)))
            start += n
    y = torch.cat(pieces, time_axis)
    state = parts(stream.get_state())
    assert len(state) == len(parts(state_full)) == (1 if kind in ("gru", "rnn") else 2)
    for got, ref in ((y, y_full), *zip(state, parts(state_full))):
        assert got.dtype == torch.float64 and got.shape == ref.shape
        assert float((got - ref).abs().max()) <= BOUND[torch.float64]


@st.composite
def reset_plans(draw, batch: int) -> tuple[list[int], list[Optional[list[bool]]]]:
    """A partition and, before each chunk but the first, a row reset mask or None."""
    chunks = draw(st.sampled_from([[3, 3], [2, 2, 2], [2, 4]]))  # few buckets: few compiles
    masks = [None] + [
        draw(st.one_of(st.none(), st.lists(st.booleans(), min_size=batch, max_size=batch)))
        for _ in chunks[1:]
    ]
    return chunks, masks


@examples(ci=7)
@given(kind=st.sampled_from([*DENSE, "convlstm"]), data=st.data(), seed=seeds)
def test_streams_with_resets_agree_and_equal_one_masked_run(kind, data, seed):
    """float64: torch stream == JAX stream (row resets between chunks) == one JAX run with
    the reset mask. The JAX side is chunk invariant, resets included."""
    event(f"kind={kind}")
    options = data.draw(options_for(kind, bidirectional=False), label="options")
    batch = 2
    chunks, masks = data.draw(reset_plans(batch), label="plan")
    torch_stream = STATEFUL[kind](**options, dtype=torch.float64)
    torch.manual_seed(seed)
    for p in torch_stream.parameters():  # seeded weights, same on both sides
        torch.nn.init.uniform_(p, -0.5, 0.5)
    x = torch_input(kind, options, batch, STEPS, torch.float64, seed + 1)
    batch_first = options.get("batch_first", False)
    time_axis = 1 if batch_first else 0
    to_jax_layout = (lambda a: a) if kind in DENSE else CHANNELS_LAST.to_jax

    with jax.enable_x64(True):
        jax_stream = stream_to_jax(torch_stream)
        reset = np.zeros((STEPS, batch), bool)  # (T, B)
        ys_t, ys_j, start = [], [], 0
        for n, mask in zip(chunks, masks):
            if mask is not None:
                torch_stream.reset_states(torch.tensor(mask))
                jax_stream.reset(np.array(mask))
                reset[start] = mask
            chunk = x.narrow(time_axis, start, n)
            with torch.no_grad():
                ys_t.append(torch_stream(chunk).numpy())
            ys_j.append(np.asarray(jax_stream(to_jax_layout(chunk.numpy()))))
            start += n
        module, variables = jax_stream.module, jax_stream.variables
        y_once, carry_once = module.apply(
            variables, to_jax_layout(x.numpy()), reset=reset.T if batch_first else reset
        )
        carry_stream = jax_stream.carry
    y_t = to_jax_layout(np.concatenate(ys_t, time_axis))
    y_j = np.concatenate(ys_j, time_axis)
    states_t = [to_jax_layout(t.numpy()) for t in parts(torch_stream.get_state())]
    bound = BOUND[torch.float64]
    assert np.max(np.abs(y_j - y_t)) <= bound and np.max(np.abs(np.asarray(y_once) - y_j)) <= bound
    assert len(states_t) == len(parts(carry_stream)) == len(parts(carry_once))
    for t_state, j_state, once in zip(states_t, parts(carry_stream), parts(carry_once)):
        assert np.max(np.abs(np.asarray(j_state) - t_state)) <= bound
        assert np.max(np.abs(np.asarray(once) - np.asarray(j_state))) <= bound


# ------------------------------------------------------------------------------ round trips


@examples(ci=150)
@given(
    kind=st.sampled_from(ALL_KINDS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]), data=st.data(), seed=seeds,
)  # fmt: skip
def test_module_round_trip_is_exact(kind, dtype, data, seed):
    """to_torch(to_jax(m)) == m bit for bit, dtypes and options included (nn.RNN's
    nonlinearity, which its repr leaves out, too); and the JAX variables survive the way back
    (to_jax(to_torch(...)))."""
    event(f"kind={kind}")
    options = data.draw(options_for(kind), label="options")
    module = build(kind, options, dtype, seed)
    with jax.enable_x64(dtype == torch.float64):
        jax_module, variables = to_jax(module)
        back = to_torch(jax_module, variables)
        jax_again, variables_again = to_jax(back)
    assert type(back) is type(module) and back.extra_repr() == module.extra_repr()
    assert getattr(back, "nonlinearity", None) == getattr(module, "nonlinearity", None)
    original, returned = module.state_dict(), back.state_dict()
    assert list(returned) == list(original)
    for name, tensor in original.items():
        assert bitwise_equal(returned[name], tensor), name
    assert jax_again == jax_module
    flat = jax.tree_util.tree_leaves_with_path(variables)
    flat_again = dict(jax.tree_util.tree_leaves_with_path(variables_again))
    for path, leaf in flat:
        again = flat_again[path]
        assert again.dtype == leaf.dtype and np.asarray(again).tobytes() == np.asarray(leaf).tobytes()


@examples(ci=60)
@given(
    kind=st.sampled_from([*DENSE, "convlstm"]), dtype=st.sampled_from([torch.float32, torch.float64]),
    batch=st.sampled_from([None, 2]), data=st.data(), seed=seeds,
)  # fmt: skip
def test_stream_and_checkpoint_round_trips_are_exact(kind, dtype, batch, data, seed):
    """torch stream -> JAX stream -> torch stream, and -> file -> either framework: weights
    and carried state bit for bit, the state's form (``(h, c)`` or ``h``) and type kept."""
    event(f"kind={kind}")
    options = data.draw(options_for(kind), label="options")
    torch.manual_seed(seed)
    source = STATEFUL[kind](**options, dtype=dtype)
    with torch.no_grad():  # one step for the state's shapes, then a random state in its place
        _, state = source.module(torch_input(kind, options, batch, 1, dtype, seed))
    random = tuple(torch.randn(t.shape, dtype=dtype) for t in parts(state))
    source.set_state(random if isinstance(state, tuple) else random[0])

    def same(stream: Any) -> None:
        assert type(stream) is type(source)
        assert getattr(stream.module, "nonlinearity", None) == getattr(source.module, "nonlinearity", None)
        for name, tensor in source.module.state_dict().items():
            assert bitwise_equal(stream.module.state_dict()[name], tensor), name
        got, ref = stream.get_state(), source.get_state()
        assert isinstance(got, tuple) == isinstance(ref, tuple)
        assert len(parts(got)) == len(parts(ref))
        for g, r in zip(parts(got), parts(ref)):
            assert bitwise_equal(g, r)

    with jax.enable_x64(dtype == torch.float64):
        same(stream_to_torch(stream_to_jax(source)))
        with tempfile.TemporaryDirectory() as directory:
            path = save_stream(source, Path(directory) / "s.safetensors", position=seed)
            loaded, position = load_stream(path, "torch", expect=source)
            assert position == seed
            same(loaded)
            jax_loaded, _ = load_stream(path, "jax")
            same(stream_to_torch(jax_loaded))
