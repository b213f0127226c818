"""``python -m parity convert``: a whole torch checkpoint to JAX (and back), in one command.

Usage::

    python -m parity convert CHECKPOINT --out OUT.safetensors [--target linen|nnx]
        [--batch-first] [--nonlinearity relu] [--dilation N] [--skip PREFIX] [--validate]
    python -m parity convert CONVERTED.safetensors --to torch --out STATE_DICT.safetensors [--validate]

``CHECKPOINT`` is a ``.pt``/``.pth`` file (read with ``torch.load(weights_only=True)``: a file
that pickles anything but tensors and plain containers is refused, never unpickled) holding a
state_dict, or a dict whose ``"state_dict"`` or ``"model"`` entry is one; or a
``.safetensors`` file. Every recurrent module in it is found by its parameter names and
converted (``parity.state_dict.convert_state_dict``); ``OUT`` holds the JAX variables, the
configurations and the tensors left alone (``parity.state_dict.load_converted`` reads it).
Two tables say what was converted and what was left alone.

``--to torch`` goes back: a converted file to a torch state_dict (safetensors) under the
original names, equal bit for bit to the checkpoint it came from.

``--validate`` runs ``parity.compare`` on each module (random input: batch 2, 6 steps;
ConvLSTM frames 8x8) between the torch module and the JAX module read back from the file.

Exit status: 0 done (and matching); 1 a validation mismatch; 2 a usage or input error (a
message on stderr: missing file, unreadable or not weights-only checkpoint, no recurrent
module, inconsistent parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import re
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

PROG = "python -m parity convert"
MAX_UNTOUCHED_ROWS = 200


class InputError(ValueError):
    """A checkpoint this command cannot use; the message says why (exit status 2)."""


# ------------------------------------------------------------------------------------ reading


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def _unpickler_reason(error: BaseException) -> str:
    """The line of torch's weights-only refusal that names what was refused."""
    for line in str(error).splitlines():
        line = line.strip()
        if line.startswith("WeightsUnpickler error:"):
            return line.split(". Please use")[0].removeprefix("WeightsUnpickler error: ")
    return _first_line(error)


def extract_state_dict(obj: Any, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict in what ``torch.load`` returned: the dict itself when all its values are
    tensors, else its ``"state_dict"`` or ``"model"`` entry.

    Arguments:
        obj: the loaded object.
        name: for messages (the file name).

    Returns:
        ``name -> tensor``.

    Raises:
        InputError: no state_dict in it.

    Example:
        >>> import torch
        >>> checkpoint = {"epoch": 3, "model": torch.nn.Linear(2, 1).state_dict()}
        >>> sorted(extract_state_dict(checkpoint))
        ['bias', 'weight']
    """

    def is_state_dict(value: Any) -> bool:
        return (
            isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
        )

    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if is_state_dict(obj.get(key)):
                return dict(obj[key])
        entries = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:8])
        raise InputError(
            f"{name} holds a dict but no state_dict: expected a dict of tensors, or a dict whose "
            f"'state_dict' or 'model' entry is one (it has {{{entries}}})"
        )
    raise InputError(f"{name} holds a {type(obj).__name__}, expected a state_dict (a dict of tensors)")


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A torch state_dict from a ``.pt``/``.pth`` (weights only) or ``.safetensors`` file.

    Arguments:
        path: the file.

    Returns:
        ``name -> tensor`` on the CPU.

    Raises:
        InputError: a missing, unreadable or not weights-only file, or one with no state_dict.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> torch.save({"state_dict": torch.nn.LSTM(2, 3).state_dict(), "epoch": 7}, path)
        >>> sorted(read_checkpoint(path))
        ['bias_hh_l0', 'bias_ih_l0', 'weight_hh_l0', 'weight_ih_l0']
    """
    file = Path(path)
    if not file.exists():
        raise InputError(f"{path}: no such file")
    if not file.is_file():
        raise InputError(f"{path} is not a file")
    if file.suffix == ".safetensors":
        import safetensors.torch
        from safetensors import safe_open

        from .state_dict import FORMAT

        try:
            with safe_open(str(file), framework="pt") as reader:
                converted = (reader.metadata() or {}).get("format") == FORMAT
            if converted:
                raise InputError(f"{path} is already a converted checkpoint; `--to torch` converts it back")
            return safetensors.torch.load_file(str(file), device="cpu")
        except InputError:
            raise
        except Exception as error:  # safetensors raises its own error type
            raise InputError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None
    try:
        obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{path} is not a weights-only checkpoint: it pickles objects other than tensors and "
            f"plain containers, and this command does not unpickle those (save "
            f"model.state_dict() instead): {_unpickler_reason(error)}"
        ) from None
    except Exception as error:  # a corrupt zip, not a torch file, ...
        raise InputError(f"{path} is not a readable torch checkpoint ({_first_line(error)})") from None
    return extract_state_dict(obj, path)


# ------------------------------------------------------------------------------------ tables


def _config_text(config: dict) -> str:
    def value(v: Any) -> str:
        return f"({', '.join(map(str, v))})" if isinstance(v, (list, tuple)) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in config.items())


def _modules_table(configs: dict[str, dict], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in ("prefix", "kind", "configuration", "dtype", "#parameters"):
        table.add_column(column, justify="right" if column == "#parameters" else "left",
                         overflow="fold")
    for prefix, config in configs.items():
        table.add_row(prefix or "(root)", config["kind"], _config_text(config["torch"]),
                      config["dtype"], f"{config['num_params']:,}")
    return table


def _untouched_table(untouched: dict[str, torch.Tensor]):
    from rich.table import Table

    table = Table(title=f"left alone: {len(untouched)} tensors", title_justify="left")
    for column in ("name", "shape", "dtype"):
        table.add_column(column, overflow="fold")
    for name, tensor in list(untouched.items())[:MAX_UNTOUCHED_ROWS]:
        table.add_row(name, str(tuple(tensor.shape)), str(tensor.dtype).replace("torch.", ""))
    if len(untouched) > MAX_UNTOUCHED_ROWS:
        table.add_row(f"... and {len(untouched) - MAX_UNTOUCHED_ROWS} more", "", "")
    return table


def _validation_table(rows: list[tuple[str, str, str, Any]]):
    from rich.table import Table

    table = Table(title="validation: JAX vs torch, max abs error", title_justify="left")
    for column in ("prefix", "kind", "dtype", "checks", "bound", "result"):
        table.add_column(column, overflow="fold")
    for prefix, kind, dtype, report in rows:
        if isinstance(report, str):
            table.add_row(prefix or "(root)", kind, dtype, "", "", f"[red]error[/red] {report}")
            continue
        checks = ", ".join(f"{c.tensor} {c.max_abs:.2g}" for c in report.checks)
        bound = f"{max(c.bound for c in report.checks):.0e}" if report.checks else ""
        result = "[green]pass[/green]" if report.ok else "[red]FAIL[/red]"
        table.add_row(prefix or "(root)", kind, dtype, checks, bound, result)
    return table


# ------------------------------------------------------------------------------------ validation


def validation_input(kind: str, config: dict, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A small random input for a module: batch 2, 6 steps (time-major steps for a cell),
    ConvLSTM frames 8x8.

    Example:
        >>> import torch
        >>> config = {"input_size": 3, "hidden_size": 4, "batch_first": True}
        >>> tuple(validation_input("lstm", config, torch.float32).shape)
        (2, 6, 3)
    """
    batch, steps = 2, 6
    if kind.startswith("convlstm"):
        features: tuple[int, ...] = (config["input_channels"], 8, 8)
    else:
        features = (config["input_size"],)
    lead = (batch, steps) if config.get("batch_first", False) else (steps, batch)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*lead, *features, generator=generator, dtype=dtype)


def _validate(pairs: dict[str, tuple[torch.nn.Module, Any, Any]], configs: dict[str, dict], console) -> int:
    """``compare`` each ``prefix -> (torch module, jax module, variables)``; prints the table.

    Returns:
        0 all match, 1 a mismatch, 2 a module that could not be compared.
    """
    import jax

    from .harness import compare

    rows, status = [], 0
    for prefix, (torch_module, jax_module, variables) in pairs.items():
        config = configs[prefix]
        dtype = next(torch_module.parameters()).dtype
        x = validation_input(config["kind"], config["torch"], dtype)
        x64 = jax.enable_x64(True) if dtype == torch.float64 else contextlib.nullcontext()
        try:
            with x64, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")
                report = compare(torch_module, x, jax_module=jax_module, variables=variables,
                                 initial_state="random")
        except Exception as error:  # noqa: BLE001 - reported per module, exit status 2
            rows.append((prefix, config["kind"], config["dtype"], f"{type(error).__name__}: {_first_line(error)}"))
            status = max(status, 2)
            continue
        rows.append((prefix, config["kind"], config["dtype"], report))
        if not report.ok:
            status = 1 if status != 2 else 2
    console.print(_validation_table(rows))
    failures = [r for r in rows if not isinstance(r[3], str) and not r[3].ok]
    if failures:
        console.print(f"[red]{len(failures)} of {len(rows)} modules do not match[/red]")
    elif status == 0:
        console.print(f"[green]all {len(rows)} modules match[/green]")
    return 1 if failures else status


# ------------------------------------------------------------------------------------ commands


def _supports_target(target: str) -> bool:
    import inspect

    from .convert import to_jax

    return target == "linen" or "target" in inspect.signature(to_jax).parameters


def _to_jax_command(args, console) -> int:
    import jax

    from .state_dict import convert_state_dict, find_recurrent, load_converted, save_converted

    target = args.target or "linen"
    if not _supports_target(target):
        raise InputError(f"--target {target}: this parity.convert.to_jax converts to Flax linen only")
    started = time.perf_counter()
    state_dict = read_checkpoint(args.checkpoint)
    options = dict(
        batch_first=args.batch_first,
        nonlinearity=args.nonlinearity or "tanh",
        dilation=args.dilation or 1,
        skip=args.skip,
    )
    with jax.enable_x64(True):  # float64 weights stay float64; float32 ones stay float32
        converted = convert_state_dict(state_dict, **options)
        if not converted.modules:
            raise InputError(
                f"{args.checkpoint} has no recurrent module (no weight_ih_l0/weight_hh_l0 or "
                f"weight_ih/weight_hh names among its {len(state_dict)} tensors)"
            )
        save_converted(converted, args.out, target=target)
    seconds = time.perf_counter() - started
    console.print(_modules_table(converted.configs, f"converted: {len(converted)} recurrent modules"))
    if converted.untouched:
        console.print(_untouched_table(converted.untouched))
    size = Path(args.out).stat().st_size / 1e6
    console.print(f"wrote {args.out} ({size:.1f} MB, target {target}) in {seconds:.1f} s")
    if not args.validate:
        return 0
    groups, _ = find_recurrent(state_dict, **options)
    with jax.enable_x64(True):
        loaded = load_converted(args.out, target="linen")
    pairs = {p: (groups[p].build(), *loaded[p]) for p in loaded}
    return _validate(pairs, loaded.configs, console)


def _to_torch_command(args, console) -> int:
    import jax

    from .convert import to_torch
    from .state_dict import _storable, load_converted, write_safetensors

    started = time.perf_counter()
    with jax.enable_x64(True):
        try:
            loaded = load_converted(args.checkpoint, target="linen")
        except FileNotFoundError:
            raise InputError(f"{args.checkpoint}: no such file") from None
        state_dict = loaded.to_torch_state_dict()
    write_safetensors(_storable(state_dict), args.out, {"format": "pt"})
    seconds = time.perf_counter() - started
    console.print(_modules_table(loaded.configs, f"back to torch: {len(loaded)} recurrent modules"))
    if loaded.untouched:
        console.print(_untouched_table(loaded.untouched))
    console.print(f"wrote {args.out} ({len(state_dict)} tensors, torch names) in {seconds:.1f} s")
    if not args.validate:
        return 0
    with jax.enable_x64(True):
        pairs = {p: (to_torch(m, v).eval(), m, v) for p, (m, v) in loaded.items()}
    return _validate(pairs, loaded.configs, console)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert every recurrent module of a torch checkpoint to JAX (or back with --to torch).",
    )
    parser.add_argument("checkpoint", help=".pt/.pth or .safetensors torch checkpoint (with --to torch: a converted file)")
    parser.add_argument("--out", required=True, help="the .safetensors file to write")
    parser.add_argument("--to", choices=("jax", "torch"), default="jax",
                        help="jax (default): torch checkpoint -> converted file; torch: converted file -> torch state_dict")
    parser.add_argument("--target", choices=("linen", "nnx"), default=None,
                        help="what load_converted builds from the file by default (linen)")
    parser.add_argument("--batch-first", action="store_true",
                        help="the layered modules take (batch, time, ...) inputs (not in the shapes)")
    parser.add_argument("--nonlinearity", choices=("tanh", "relu"), default=None,
                        help="nn.RNN / RNNCell's nonlinearity (default tanh; not in the shapes)")
    parser.add_argument("--dilation", type=int, default=None, help="the ConvLSTM's dilation (default 1)")
    parser.add_argument("--skip", action="append", default=[], metavar="PREFIX",
                        help="leave the module at PREFIX alone (repeatable)")
    parser.add_argument("--validate", action="store_true",
                        help="compare each module, torch vs JAX, on random inputs; exit 1 on a mismatch")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Runs the command.

    Arguments:
        argv: the arguments after ``convert`` (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 done, 1 a validation mismatch, 2 a usage or input error.

    Example:
        >>> import os, tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GRUCell(4, 5))
        >>> torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
        >>> main([os.path.join(folder, "missing.pt"), "--out", os.path.join(folder, "out.safetensors")])
        2
    """
    parser = _parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit:  # argparse printed the usage and the error
        return int(exit.code or 0)
    if args.to == "torch":
        given = [flag for flag, value in (("--target", args.target), ("--batch-first", args.batch_first),
                                          ("--nonlinearity", args.nonlinearity), ("--dilation", args.dilation),
                                          ("--skip", args.skip)) if value]
        if given:
            print(f"{PROG}: error: {', '.join(given)} apply when converting to JAX, not with --to torch",
                  file=sys.stderr)
            return 2
    if args.dilation is not None and args.dilation < 1:
        print(f"{PROG}: error: --dilation must be >= 1, got {args.dilation}", file=sys.stderr)
        return 2

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 150)
    try:
        if args.to == "torch":
            return _to_torch_command(args, console)
        return _to_jax_command(args, console)
    except (InputError, ValueError, TypeError, OSError) as error:
        message = str(error) if isinstance(error, (InputError, ValueError, TypeError)) else (
            f"{type(error).__name__}: {error}"
        )
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
