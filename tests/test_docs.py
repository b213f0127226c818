"""docs/design.md documents every public name, and the repository stands on its own.

- Each package's ``__all__`` (jax_impl, jax_impl.functional, jax_impl.sharding, jax_impl.nnx
  when it imports, torch_impl, parity) is listed in docs/design.md, in that package's section
  (the ``## `package` `` heading down to the next ``## ``), as a whole word inside inline code.
- No tracked file outside tests/ points to a design file outside the repository.
- The README opens with the two commands of a fresh machine (the validation report and the
  tests), and ``.ci/run`` runs the README's test command.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
PACKAGES = [
    "jax_impl",
    "jax_impl.functional",
    "jax_impl.sharding",
    "jax_impl.nnx",
    "torch_impl",
    "parity",
]
OUTSIDE = (b"../shared", b"shared/DESIGN")


def _section(text: str, package: str) -> str:
    """The text under ``## `package` `` up to the next level-2 heading."""
    match = re.search(rf"^## `{re.escape(package)}`[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise AssertionError(f"docs/design.md has no section headed '## `{package}`'")
    return match.group(1)


def _code_spans(text: str) -> str:
    """The inline code of ``text`` (fenced blocks dropped), joined."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return "\n".join(re.findall(r"`([^`]+)`", text))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_is_in_design(package):
    try:
        module = importlib.import_module(package)
    except ImportError as error:
        if package == "jax_impl.nnx":
            pytest.skip(f"jax_impl.nnx does not import: {error}")
        raise
    code = _code_spans(_section(DESIGN.read_text(encoding="utf-8"), package))
    missing = [name for name in module.__all__ if not re.search(rf"\b{re.escape(name)}\b", code)]
    assert not missing, (
        f"docs/design.md, section '## `{package}`', does not document {missing} "
        f"(each name of {package}.__all__ must appear there in inline code)"
    )


def test_readme_links_the_design():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/design.md)" in readme
    assert DESIGN.is_file()


def test_no_tracked_file_points_outside_the_repository():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    offending = []
    for name in filter(None, listed):
        relative = name.decode()
        if relative.startswith("tests/"):
            continue
        path = ROOT / relative
        if not path.is_file():  # deleted in the work tree, or a submodule
            continue
        data = path.read_bytes()
        offending += [f"{relative}: {bad.decode()}" for bad in OUTSIDE if bad in data]
    assert not offending, f"tracked files point outside the repository: {offending}"


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Quick start\n+```bash\n(.*?)```", readme, flags=re.M | re.S)
    assert match, "README.md must open its Quick start with a ```bash block"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.strip()]


def test_readme_opens_with_report_and_tests():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    report, tests = commands
    for command in commands:  # each installs what it needs first
        assert command.startswith("bash .ci/setup && "), command
    assert "-m parity" in report, report
    assert "-m pytest" in tests, tests


def test_ci_runs_the_readme_test_command():
    setup, test = (part.strip() for part in _quick_start_commands()[1].split("&&"))
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert setup in lines, f".ci/run does not run the README's setup step {setup!r}"
    assert test in lines, f".ci/run does not run the README's test command {test!r}"
