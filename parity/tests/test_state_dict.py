"""Whole-checkpoint conversion: ``parity.state_dict`` and ``python -m parity convert``."""

from __future__ import annotations

import doctest
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import jax_impl
import torch_impl
from parity import compare, to_jax
from parity import convert_checkpoint as cli_module
from parity import state_dict as state_dict_module
from parity.convert_checkpoint import main
from parity.state_dict import convert_state_dict, find_recurrent, load_converted, save_converted
from parity.tests.torch_threads import one_torch_thread  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
HAS_GRU = hasattr(jax_impl, "GRU")
needs_gru = pytest.mark.skipif(not HAS_GRU, reason="GRU port not merged yet")
ENTRY = "import sys; from parity.convert_checkpoint import main; sys.exit(main(sys.argv[1:]))"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Model(torch.nn.Module):
    """An embedding, an LSTM at ``encoder.rnn``, a second recurrent module at ``decoder.*``
    and a linear head: the recurrent parts are found among the rest."""

    def __init__(self, decoder: str = "lstm"):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.encoder = torch.nn.Module()
        self.encoder.rnn = torch.nn.LSTM(8, 16, num_layers=2, bidirectional=True, proj_size=5, batch_first=True)
        self.decoder = torch.nn.Module()
        if decoder == "gru":
            self.decoder.gru = torch.nn.GRU(10, 12, bidirectional=True, batch_first=True)
        else:
            self.decoder.lstm = torch.nn.LSTM(10, 12, bias=False, batch_first=True)
        self.head = torch.nn.Linear(12, 4)


def _model(decoder: str = "lstm", dtype: torch.dtype = torch.float32) -> Model:
    torch.manual_seed(0)
    return Model(decoder).to(dtype).eval()


def _save(model: torch.nn.Module, path, fmt: str) -> str:
    path = str(path) + fmt
    if fmt == ".safetensors":
        safetensors.torch.save_file(model.state_dict(), path)
    else:  # a training checkpoint: the state_dict under "model", other entries around it
        torch.save({"model": model.state_dict(), "epoch": 3, "lr": 0.1}, path)
    return path


def _max_error(got, ref: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref.detach().double().numpy())))


def _check_sequence_module(module, variables, torch_module, x: torch.Tensor, atol: float) -> None:
    """The JAX module's output (and state) against the live torch module's."""
    with torch.no_grad():
        ref_y, ref_state = torch_module(x)
    y, state = module.apply(variables, jnp.asarray(x.numpy()))
    assert _max_error(y, ref_y) <= atol
    if isinstance(ref_state, tuple):  # LSTM: (h, c)
        for got, ref in zip(state, ref_state):
            assert _max_error(got, ref) <= atol


def _untouched(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("embed.", "head."))}


# ------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("fmt", [".pt", ".safetensors"])
def test_cli_converts_a_checkpoint_and_back(tmp_path, capsys, fmt):
    model = _model()
    checkpoint = _save(model, tmp_path / "model", fmt)
    out = str(tmp_path / "converted.safetensors")
    assert main([checkpoint, "--out", out, "--batch-first"]) == 0
    printed = capsys.readouterr().out
    for text in ("encoder.rnn", "decoder.lstm", "proj_size=5", "embed.weight", "head.bias", "(4, 12)"):
        assert text in printed

    converted = load_converted(out)
    assert sorted(converted) == ["decoder.lstm", "encoder.rnn"]  # a .safetensors file sorts its names
    assert converted.configs["encoder.rnn"]["torch"] == dict(
        input_size=8, hidden_size=16, num_layers=2, bias=True, batch_first=True, bidirectional=True, proj_size=5
    )
    assert converted.configs["decoder.lstm"]["torch"]["bias"] is False
    x = torch.randn(2, 6, 8)
    _check_sequence_module(*converted["encoder.rnn"], model.encoder.rnn, x, 1e-5)
    _check_sequence_module(*converted["decoder.lstm"], model.decoder.lstm, torch.randn(2, 6, 10), 1e-5)
    expected = _untouched(model)
    assert sorted(converted.untouched) == sorted(expected)
    assert all(torch.equal(converted.untouched[k], v) for k, v in expected.items())

    back = str(tmp_path / "back.safetensors")
    assert main([out, "--to", "torch", "--out", back]) == 0
    restored, original = safetensors.torch.load_file(back), model.state_dict()
    assert sorted(restored) == sorted(original)
    for name, tensor in original.items():  # bit for bit, dtype included
        assert restored[name].dtype == tensor.dtype and torch.equal(restored[name], tensor), name


def test_cli_float64_checkpoint_within_1e_12(tmp_path):
    model = _model(dtype=torch.float64)
    checkpoint = _save(model, tmp_path / "model64", ".pt")
    out = str(tmp_path / "converted64.safetensors")
    assert main([checkpoint, "--out", out, "--batch-first"]) == 0
    with pytest.raises(TypeError, match="enable_x64"):  # float64 needs x64: never on silently
        load_converted(out)
    with jax.enable_x64(True):
        converted = load_converted(out)
        assert converted.configs["encoder.rnn"]["dtype"] == "float64"
        x = torch.randn(2, 6, 8, dtype=torch.float64)
        _check_sequence_module(*converted["encoder.rnn"], model.encoder.rnn, x, 1e-12)
        x = torch.randn(2, 6, 10, dtype=torch.float64)
        _check_sequence_module(*converted["decoder.lstm"], model.decoder.lstm, x, 1e-12)
    assert not jax.config.jax_enable_x64


def test_cli_validate_passes_and_reports_a_mismatch(tmp_path, capsys, monkeypatch):
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({"rnn": torch.nn.LSTM(3, 4), "cell": torch_impl.ConvLSTMCell(2, 3, 3)})
    checkpoint = _save(model, tmp_path / "small", ".safetensors")
    out = str(tmp_path / "small-jax.safetensors")
    assert main([checkpoint, "--out", out, "--validate"]) == 0
    printed = capsys.readouterr().out
    assert "validation" in printed and "pass" in printed and "FAIL" not in printed

    real = state_dict_module.load_converted

    def perturbed(path, **kwargs):  # a port that is off by 1e-3: the validation must say so
        converted = real(path, **kwargs)
        for prefix, (module, variables) in converted.modules.items():
            converted.modules[prefix] = (module, jax.tree_util.tree_map(lambda a: a + 1e-3, variables))
        return converted

    monkeypatch.setattr(state_dict_module, "load_converted", perturbed)
    assert main([checkpoint, "--out", out, "--validate"]) == 1
    assert "FAIL" in capsys.readouterr().out


class Refused:
    """Pickled by reference: a weights-only load must refuse it without running anything."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cli_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    assert main([str(tmp_path / "missing.pt"), "--out", out]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err

    linear = str(tmp_path / "linear.pt")
    torch.save(torch.nn.Linear(2, 3).state_dict(), linear)
    assert main([linear, "--out", out]) == 2
    assert "has no recurrent module" in capsys.readouterr().err

    odd = str(tmp_path / "odd.pt")
    torch.save({"epoch": 1, "notes": "none"}, odd)
    assert main([odd, "--out", out]) == 2
    assert "no state_dict" in capsys.readouterr().err

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert main([str(broken), "--out", out]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err

    state = torch.nn.LSTM(2, 3, num_layers=3).state_dict()
    del state["weight_ih_l1"]
    gap = str(tmp_path / "gap.pt")
    torch.save(state, gap)
    assert main([gap, "--out", out]) == 2
    assert "weight_ih_l1 is missing" in capsys.readouterr().err

    assert main([linear, "--out", out, "--to", "torch"]) == 2  # --to torch reads converted files
    assert "linear.pt is not a readable safetensors file" in capsys.readouterr().err
    plain = str(tmp_path / "plain.safetensors")
    safetensors.torch.save_file(torch.nn.LSTM(2, 3).state_dict(), plain)
    assert main([plain, "--out", out, "--to", "torch"]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err
    assert main([linear, "--out", out, "--to", "torch", "--batch-first"]) == 2
    assert "--batch-first" in capsys.readouterr().err
    assert main([linear]) == 2  # argparse: --out is required
    assert not os.path.exists(out)


def test_cli_refuses_a_pickle_that_is_not_weights_only(tmp_path):
    """In a fresh interpreter, through the documented entry: exit 2, a message, no traceback,
    and the pickled call never ran."""
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": torch.nn.LSTM(2, 3).state_dict(), "extra": Refused(str(marker))}, evil)
    result = subprocess.run(
        [sys.executable, "-c", ENTRY, str(evil), "--out", str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not a weights-only checkpoint" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------------ the library


def _same_port(converted, prefix: str, torch_module: torch.nn.Module) -> None:
    """Inferred from the names and shapes alone, the port equals ``to_jax`` of the live module."""
    module, variables = converted[prefix]
    ref_module, ref_variables = to_jax(torch_module)
    assert module == ref_module
    flat = jax.tree_util.tree_leaves_with_path(variables)
    ref_flat = jax.tree_util.tree_leaves_with_path(ref_variables)
    assert [p for p, _ in flat] == [p for p, _ in ref_flat]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat, ref_flat))


def test_convert_state_dict_infers_every_supported_kind():
    torch.manual_seed(2)
    model = torch.nn.ModuleDict({
        "lstm": torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, proj_size=3, bias=False),
        "cell": torch.nn.LSTMCell(4, 6),
        "conv": torch_impl.ConvLSTM2d(3, 4, (3, 2), num_layers=2, batch_first=True, dilation=2),
        "convcell": torch_impl.ConvLSTMCell(2, 3, 4, bias=False),
        "norm": torch.nn.BatchNorm1d(3),
    }).eval()
    converted = convert_state_dict(
        model.state_dict(), batch_first={"conv": True}, dilation={"conv": 2}
    )
    assert dict(converted.items()).keys() == {"lstm", "cell", "conv", "convcell"}
    assert {p: c["kind"] for p, c in converted.configs.items()} == {
        "lstm": "lstm", "cell": "lstm_cell", "conv": "convlstm", "convcell": "convlstm_cell"
    }
    assert converted.configs["lstm"]["torch"] == dict(
        input_size=5, hidden_size=7, num_layers=2, bias=False, batch_first=False, bidirectional=True, proj_size=3
    )
    assert converted.configs["conv"]["torch"] == dict(
        input_channels=3, hidden_channels=4, kernel_size=[3, 2], num_layers=2, bias=True, batch_first=True,
        dilation=[2, 2]
    )
    assert converted.configs["conv"]["num_params"] == sum(p.numel() for p in model["conv"].parameters())
    assert list(converted.untouched) == [k for k in model.state_dict() if k.startswith("norm.")]
    for prefix in converted:
        _same_port(converted, prefix, model[prefix])
    # and they run like the torch modules (the parity harness: float32 within 1e-5)
    compare(model["conv"], torch.randn(2, 6, 3, 8, 8), jax_module=converted["conv"][0],
            variables=converted["conv"][1]).assert_ok()
    compare(model["cell"], torch.randn(6, 2, 4), jax_module=converted["cell"][0],
            variables=converted["cell"][1]).assert_ok()
    # the whole checkpoint back, bit for bit
    back = converted.to_torch_state_dict()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in model.state_dict().items())


def test_convert_state_dict_float64_needs_x64_scoped():
    lstm = torch.nn.LSTM(3, 4, num_layers=2).double()
    with pytest.raises(TypeError, match="x64"):
        convert_state_dict(lstm.state_dict())
    with jax.enable_x64(True):
        module, variables = convert_state_dict(lstm.state_dict())[""]
        assert variables["params"]["layer_1"]["ih_kernel"].dtype == jnp.float64
        _check_sequence_module(module, variables, lstm, torch.randn(6, 2, 3, dtype=torch.float64), 1e-12)


def test_save_and_load_keep_configs_order_and_untouched(tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LSTM(4, 5), torch.nn.LSTMCell(5, 2))
    model[0].bias.data = model[0].bias.data.to(torch.bfloat16)  # numpy has no bfloat16: kept anyway
    converted = convert_state_dict(model.state_dict())
    path = tmp_path / "c.safetensors"
    save_converted(converted, path)
    loaded = load_converted(path)
    assert list(loaded) == ["1", "2"] and loaded.configs == converted.configs
    assert loaded.untouched["0.bias"].dtype == torch.bfloat16
    assert all(torch.equal(loaded.untouched[k], v) for k, v in converted.untouched.items())
    for prefix in loaded:
        assert loaded[prefix][0] == converted[prefix][0]


def test_load_converted_refuses_foreign_and_tampered_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(torch.nn.LSTM(2, 3).state_dict(), plain)
    with pytest.raises(ValueError, match="not a converted checkpoint"):
        load_converted(plain)
    with pytest.raises(FileNotFoundError):
        load_converted(tmp_path / "missing.safetensors")

    good = tmp_path / "good.safetensors"
    save_converted(convert_state_dict({"rnn." + k: v for k, v in torch.nn.LSTM(2, 3).state_dict().items()}), good)
    tensors = safetensors.torch.load_file(good)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as reader:
        metadata = reader.metadata()
    del tensors["rnn/params/layer_0/hh_bias"]
    tampered = tmp_path / "tampered.safetensors"
    safetensors.torch.save_file(tensors, tampered, metadata=metadata)
    with pytest.raises(ValueError, match=r"rnn.*layer_0/hh_bias"):
        load_converted(tampered)

    forged = dict(metadata, modules=metadata["modules"].replace("jax_impl.LSTM", "os.system"))
    safetensors.torch.save_file(safetensors.torch.load_file(good), tampered, metadata=forged)
    with pytest.raises(ValueError, match="names class 'os.system'"):  # metadata never picks code
        load_converted(tampered)


def _lstm_state(prefix: str = "rnn.", **kwargs) -> dict:
    return {prefix + k: v for k, v in torch.nn.LSTM(3, 4, **kwargs).state_dict().items()}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("rnn.weight_ih_l1"), r"rnn: parameter rnn\.weight_ih_l1 is missing"),
        (lambda s: s.pop("rnn.bias_hh_l2"), r"rnn: parameter rnn\.bias_hh_l2 is missing"),
        (lambda s: s.update({"rnn.bias_ih_l1": s["rnn.bias_ih_l1"].double()}),
         r"rnn: rnn\.bias_ih_l1 is torch\.float64 while rnn\.weight_ih_l0 is torch\.float32"),
        (lambda s: s.update({"rnn.weight_hh_l0": torch.zeros(10, 4)}), r"rnn\.weight_hh_l0 has shape \(10, 4\)"),
        (lambda s: s.update({"rnn.weight_hh_l1": torch.zeros(12, 3)}), r"rnn\.weight_hh_l1 has shape \(12, 3\), expected \(16, 4\)"),
        (lambda s: s.update({"rnn.weight_hr_l0": torch.zeros(2, 3)}), r"rnn\.weight_hh_l0 has shape \(16, 4\), expected \(12, 2\)"),
        (lambda s: s.update({"rnn.weight_ih": torch.zeros(16, 3)}), r"rnn: ambiguous"),
        (lambda s: s.update({"rnn.weight_ih_l0_reverse": torch.zeros(16, 3)}), r"rnn\.weight_hh_l0_reverse is missing"),
        (lambda s: s.update({"rnn.weight_ih_l0": torch.zeros(16, 3, dtype=torch.int64)}), r"rnn\.weight_ih_l0 has dtype torch\.int64"),
        (lambda s: s.update({"rnn.weight_hh_l0": torch.zeros(16, 4, 1)}), r"rnn\.weight_hh_l0 has shape \(16, 4, 1\); expected rank 2"),
    ],
    ids=["layer gap", "one bias", "mixed dtypes", "no gate multiple", "wrong layer shape", "proj mismatch",
         "cell and stack", "half a direction", "integer weights", "rank 3"],
)
def test_inconsistent_groups_raise_naming_prefix_and_parameter(edit, message):
    state = _lstm_state(num_layers=3)
    edit(state)
    with pytest.raises(ValueError, match=message):
        find_recurrent(state)


def test_keywords_per_prefix_and_skip():
    torch.manual_seed(4)
    model = torch.nn.ModuleDict({"a": torch.nn.LSTM(3, 4), "b": torch.nn.LSTM(3, 4, batch_first=True)})
    state = model.state_dict()
    converted = convert_state_dict(state, batch_first={"b": True})
    assert converted["a"][0].time_major and not converted["b"][0].time_major
    _same_port(converted, "b", model["b"])
    with pytest.raises(ValueError, match="batch_first names 'c', which is no recurrent module"):
        find_recurrent(state, batch_first={"c": True})
    with pytest.raises(ValueError, match="nonlinearity names 'a', a lstm, which takes no nonlinearity"):
        find_recurrent(state, nonlinearity={"a": "relu"})
    with pytest.raises(ValueError, match="nonlinearity must be 'tanh' or 'relu'"):
        find_recurrent(state, nonlinearity="sigmoid")
    groups, others = find_recurrent(state, skip=["a"])
    assert list(groups) == ["b"] and list(others) == [k for k in state if k.startswith("a.")]
    state["b.weight_hh_l0"] = torch.zeros(5, 5)  # a broken group can be left alone
    assert list(convert_state_dict(state, skip={"b"})) == ["a"]


def test_gru_and_rnn_are_inferred():
    """Inference needs no JAX port: the kinds and configurations of GRU / RNN and their cells."""
    model = torch.nn.ModuleDict({
        "gru": torch.nn.GRU(3, 5, num_layers=2, bidirectional=True),
        "rnn": torch.nn.RNN(3, 5, nonlinearity="relu", bias=False, batch_first=True),
        "gcell": torch.nn.GRUCell(3, 5), "rcell": torch.nn.RNNCell(3, 5, nonlinearity="relu"),
    })
    groups, _ = find_recurrent(
        model.state_dict(), batch_first={"rnn": True}, nonlinearity={"rnn": "relu", "rcell": "relu"}
    )
    assert {p: g.kind for p, g in groups.items()} == {"gru": "gru", "rnn": "rnn", "gcell": "gru_cell", "rcell": "rnn_cell"}
    assert groups["gru"].config == dict(
        input_size=3, hidden_size=5, num_layers=2, bias=True, batch_first=False, bidirectional=True
    )
    assert groups["rnn"].config["nonlinearity"] == "relu" and groups["rnn"].config["bias"] is False
    for prefix, group in groups.items():
        built = group.build()
        assert type(built) is type(model[prefix]) and repr(built) == repr(model[prefix])


@pytest.mark.skipif(HAS_GRU, reason="the GRU port is merged")
def test_gru_conversion_raises_until_the_port_is_merged():
    with pytest.raises(TypeError, match="cannot convert a torch.nn.modules.rnn.GRU"):
        convert_state_dict(torch.nn.GRU(3, 5).state_dict())


@needs_gru
def test_cli_gru_decoder(tmp_path):
    model = _model("gru")
    out = str(tmp_path / "converted.safetensors")
    assert main([_save(model, tmp_path / "model", ".pt"), "--out", out, "--batch-first"]) == 0
    converted = load_converted(out)
    assert converted.configs["decoder.gru"]["kind"] == "gru"
    assert converted.configs["decoder.gru"]["torch"]["bidirectional"] is True
    _check_sequence_module(*converted["encoder.rnn"], model.encoder.rnn, torch.randn(2, 6, 8), 1e-5)
    _check_sequence_module(*converted["decoder.gru"], model.decoder.gru, torch.randn(2, 6, 10), 1e-5)
    back = str(tmp_path / "back.safetensors")
    assert main([out, "--to", "torch", "--out", back]) == 0
    restored = safetensors.torch.load_file(back)
    assert all(torch.equal(restored[k], v) for k, v in model.state_dict().items())


@needs_gru
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_gru_and_rnn_ports_match(dtype, atol):
    torch.manual_seed(5)
    model = torch.nn.ModuleDict({
        "gru": torch.nn.GRU(3, 5, num_layers=2, bidirectional=True),
        "rnn": torch.nn.RNN(3, 5, nonlinearity="relu", bias=False),
        "gcell": torch.nn.GRUCell(3, 5), "rcell": torch.nn.RNNCell(3, 5, nonlinearity="relu"),
    }).to(dtype)
    with jax.enable_x64(dtype == torch.float64):
        converted = convert_state_dict(model.state_dict(), nonlinearity={"rnn": "relu", "rcell": "relu"})
        for prefix in ("gru", "rnn"):
            _same_port(converted, prefix, model[prefix])
            _check_sequence_module(*converted[prefix], model[prefix], torch.randn(6, 2, 3, dtype=dtype), atol)
        for prefix in ("gcell", "rcell"):
            _same_port(converted, prefix, model[prefix])


# ------------------------------------------------------------------------------------ docs


@pytest.mark.parametrize("module", [state_dict_module, cli_module], ids=["state_dict", "convert_checkpoint"])
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(module)
    assert result.attempted >= 5 and result.failed == 0
