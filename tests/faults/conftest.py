"""Helpers of the fault-injection tests: subprocesses killed at random points, one-line errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY as _TINY

REPO = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", **extra}
    env.pop("RETNET_DEBUG", None)
    return env


def start(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """A Python child in its own process group (so a kill can take its compiler children too)."""
    # stdout (progress bars) is dropped: a full pipe would stall a long-running child.
    return subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def kill_after(proc: subprocess.Popen[bytes], delay: float, group: bool) -> bool:
    """SIGKILL ``proc`` (and, if ``group``, its whole process group) after ``delay`` seconds;
    whether it was still running then."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    alive = proc.poll() is None
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.communicate()
    return alive


def run(args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run a Python child to the end; a hang fails the test at ``timeout`` instead of hanging it."""
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed the way a user mistake or a damaged file must: exit 2, one line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retnet: error: "), result.stderr[-2000:]
    return lines[0]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A generator seeded by the test's name (and ``YARETNET_FAULT_SEED``): the fault points are
    random but a failure can be replayed."""
    seed = f"{os.environ.get('YARETNET_FAULT_SEED', '0')}:{request.node.nodeid}"
    return random.Random(seed)


#: A model and run small enough that a training step takes milliseconds, logging no step.
TINY = [*_TINY, "--log-interval", "1000"]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (the lock file, which only lives while a
    process holds it, aside)."""
    if not directory.exists():
        return {}
    files: dict[str, bytes] = {}
    for p in sorted(directory.rglob("*")):
        if not p.is_file() or p.name == ".retnet-run.lock":
            continue
        try:
            files[str(p.relative_to(directory))] = p.read_bytes()
        except FileNotFoundError:  # a live run's temporary file, renamed between listing and reading
            continue
    return files


def train_args(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["-m", "yet_another_retnet", "train", "--data", str(corpus), "--out", str(out), *TINY, *extra]
