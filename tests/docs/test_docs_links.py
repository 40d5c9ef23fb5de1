"""The documentation's links lead somewhere, and nothing in the repository points outside it.

Every relative link in README.md, CHANGELOG.md and docs/**/*.md names a file or folder of the
repository (an ``#anchor`` must be a heading of the page it names). No tracked text file names a
path of the machine it was written on (a home or work directory, a sibling checkout). No table
cell splits inside a code span.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "pyproject.toml").exists():  # the repository root, wherever this file sits in tests/
    ROOT = ROOT.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Paths of a particular machine: a work or home directory, a checkout beside this one.
OUTSIDE = re.compile(r"(?<![\w.])(/work/|/home/\w|\.\./shared\b|/Users/\w)")


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces to dashes."""
    anchors = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that lead nowhere: {broken}"


def test_no_tracked_file_names_a_path_outside_the_repository() -> None:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    offenders = []
    for name in listed.stdout.splitlines():
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".sh", ".toml", ".json", ".txt", ".cfg", ".yml", ".yaml"} and (
                path.name != "run"):
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line) and "OUTSIDE" not in line:
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_table_cells_do_not_split_inside_code(page: Path) -> None:
    """A ``|`` inside a code span of a table row ends the cell on GitHub unless it is escaped."""
    split = [f"{number}: {code}" for number, line in enumerate(page.read_text().splitlines(), 1)
             if line.startswith("|") for code in re.findall(r"`[^`]*`", line) if re.search(r"(?<!\\)\|", code)]
    assert not split, f"{page.relative_to(ROOT)}: escape these pipes as \\|: {split}"
