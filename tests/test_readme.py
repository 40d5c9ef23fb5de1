"""Every Python block of README.md runs as printed (offline, in seconds), in a scratch directory.

A block whose first line starts with ``# fragment`` needs objects the reader brings (a torchscale
model, say) and is only compiled. Blocks needing an optional extra skip without it (and fail on CI
where the extra is required, see conftest.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4


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
