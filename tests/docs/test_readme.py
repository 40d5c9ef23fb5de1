"""The README as a newcomer meets it: every Python block runs as printed (offline, in seconds, in a
scratch directory), every shell block is either one of the two commands or marked as run by hand,
and the test command is the one CI runs.

A Python block whose first line starts with ``# fragment`` needs objects the reader brings and is
only compiled. Blocks needing an optional extra skip without it (and fail on CI where the extra is
required, see conftest.py). A shell block that is not one of the two commands starts with
``# long:``, ``# network:`` or ``# interactive:``: run by hand before a release.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "pyproject.toml").exists():  # the repository root, wherever this file sits in tests/
    ROOT = ROOT.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
SHELL_BLOCKS = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", TEXT, flags=re.S)
TRAIN_COMMAND = 'pip install -e ".[train]" && retnet train'
TEST_COMMAND = 'pip install -e ".[dev]" && ruff check . && mypy && python -m pytest -q'
MARKS = ("# long:", "# network:", "# interactive:")


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = BLOCKS[index]
    compiled = compile(code, f"README.md python block {index}", "exec")
    if code.lstrip().startswith("# fragment"):
        return
    if "transformers" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    exec(compiled, {"__name__": f"readme_block_{index}"})


def test_the_two_commands_come_after_the_cpu_torch_note() -> None:
    blocks = [block.strip() for block in SHELL_BLOCKS]
    assert blocks[:2] == [TRAIN_COMMAND, TEST_COMMAND]
    note = TEXT.index("Install a CPU build of PyTorch first")
    assert note < TEXT.index(TRAIN_COMMAND) < TEXT.index(TEST_COMMAND)


def test_the_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert TEST_COMMAND in ci, "the README's test command must be a line of .ci/run, verbatim"


def test_every_other_shell_block_is_marked_as_run_by_hand() -> None:
    unmarked = [block for block in SHELL_BLOCKS[2:] if not block.lstrip().startswith(MARKS)]
    assert not unmarked, f"shell blocks without one of {MARKS}: {unmarked}"
