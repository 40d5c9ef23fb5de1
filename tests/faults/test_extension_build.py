"""Killing a process while it builds a C++ library never blocks or breaks a later load.

The build machinery is the extension's own (``ops/cpu/_build.py``); the source here is a tiny one so
that each build takes a second or two and a kill lands inside it."""

from __future__ import annotations

import random
import shutil
import textwrap
import time
from pathlib import Path

import pytest

from .conftest import child_env, kill_after, run, start

pytestmark = pytest.mark.skipif(shutil.which("c++") is None or shutil.which("ninja") is None,
                                reason="needs a C++ compiler and ninja")

SOURCE = 'extern "C" int yaretnet_probe() { return 42; }\n'

SCRIPT = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    from yet_another_retnet.ops._build import build_and_load
    path = build_and_load("probe", [Path(sys.argv[1])])
    print(ctypes.CDLL(str(path)).yaretnet_probe())
""")


@pytest.fixture
def probe(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    source = tmp_path / "probe.cpp"
    source.write_text(SOURCE)
    return source, child_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))


def _building(tmp_path: Path) -> bool:
    return any((tmp_path / "ext" / "yaretnet").glob(".build-probe-*"))


def _built(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "ext" / "yaretnet").glob("probe_*.so"))


def test_a_build_killed_at_random_points_never_blocks_the_next_load(
        tmp_path: Path, probe: tuple[Path, dict[str, str]], rng: random.Random) -> None:
    source, env = probe
    kills = 0
    for _ in range(4):  # until two kills have landed inside a build
        if kills == 2:
            break
        for so in _built(tmp_path):
            so.unlink()  # force a new build
        proc = start(["-c", SCRIPT, str(source)], env)
        # Once the build has started (its temporary directory exists), at a random point of its
        # compile, link and install; the first kill takes the process group (the compiler dies
        # too), the next only Python (ninja and gcc run on, orphaned, into a directory nobody
        # will use).
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not _building(tmp_path):
            time.sleep(0.005)
        kills += kill_after(proc, rng.uniform(0.0, 0.8), group=kills == 0)
        after = run(["-c", SCRIPT, str(source)], env, timeout=180)
        assert after.returncode == 0 and after.stdout.strip() == "42", after.stderr[-2000:]
        assert len(_built(tmp_path)) == 1
    assert kills >= 1, "every kill came after the build had finished: the fault points missed it"


def test_leftovers_of_a_killed_build_are_cleared(tmp_path: Path, probe: tuple[Path, dict[str, str]]) -> None:
    """What a killed build leaves: a temporary build directory with torch's lock file in it, and
    the lock file of the builders; neither blocks the next build, and the leftover is removed."""
    source, env = probe
    root = tmp_path / "ext" / "yaretnet"
    leftover = root / ".build-probe-killed"
    leftover.mkdir(parents=True)
    (leftover / "lock").write_text("")
    (root / "probe.lock").write_text("")
    result = run(["-c", SCRIPT, str(source)], env, timeout=180)
    assert result.stdout.strip() == "42", result.stderr[-2000:]
    assert not leftover.exists()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []
