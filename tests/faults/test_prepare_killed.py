"""``retnet prepare`` killed with SIGKILL while it writes shards: the directory never holds an
index over wrong shards, and the next run either finishes with the same bytes as an uninterrupted
run or refuses in one clear line (and then finishes with ``--overwrite``).

Two kinds of fault point:

- *counted*: a child process runs :func:`prepare` with its file operations (shard writes, opens,
  closes, fsyncs, the renames of the publish step, the index write) wrapped by a counter that
  SIGKILLs the whole process group just before call number ``k``; ``k`` is drawn at random from
  the calls an uninterrupted run makes, so every phase is reachable, publishing included;
- *timed*: the real command line with two worker processes, killed (group and all) at a random
  moment after it started writing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from yet_another_retnet.cli import main
from yet_another_retnet.training.prepare import LOCK_NAME, PrepareError, prepare
from yet_another_retnet.training.shards import PreparedDataError, open_prepared

from .conftest import assert_one_error_line, child_env, run, start

UNIT_BYTES = 1 << 16  # small units and shards: many writes and several shards from 2 MB
SHARD_TOKENS = 1 << 18

CHILD = """
import os, signal, sys
from yet_another_retnet.models import checkpoint
from yet_another_retnet.training import prepare as p
from yet_another_retnet.training.prepare import write

kill_at, calls = int(sys.argv[1]), [0]

def counted(owner, name):
    real = getattr(owner, name)
    def call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.killpg(0, signal.SIGKILL)  # this process and its workers, as `kill -9 -PGID` would
        return real(*args, **kwargs)
    setattr(owner, name, call)

for owner, name in ((write.SplitWriter, "write"), (write.SplitWriter, "_open"), (write.SplitWriter, "_close"),
                    (os, "replace"), (os, "fsync"), (checkpoint, "atomic_write")):
    counted(owner, name)
config = __import__("json").loads(sys.argv[2])
p.prepare(config.pop("sources"), config.pop("out"), **config)
print(calls[0])
"""


def _corpus(path: Path, size: int, seed: int) -> Path:
    from yet_another_retnet.training.data import default_corpus_text

    text = default_corpus_text()
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < size:
            n = rng.randint(500, 6000)
            start_at = rng.randrange(0, len(text) - n)
            line = json.dumps({"text": text[start_at:start_at + n]}) + "\n"
            f.write(line)
            written += len(line)
    return path


def _files(directory: Path) -> dict[str, bytes]:
    """What a preparation consists of: every file but the lock (which outlives its holder)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _published(directory: Path) -> dict[str, bytes]:
    """The files a reader sees (a killed run's ``.partial/`` aside)."""
    return {k: v for k, v in _files(directory).items() if not k.startswith(".partial")}


def _check_after_kill(out: Path, corpus: Path, expected: dict[str, bytes], old: dict[str, bytes] | None) -> str:
    """The directory a kill left: a complete index only over complete, right shards; then the next
    run finishes (or refuses clearly and finishes with ``--overwrite``). Returns what was found."""
    published = _published(out) if out.exists() else {}
    if "index.json" in published:
        if published == expected:
            found = "finished"
        else:  # the kill came before the new index: the older preparation must be whole
            assert old is not None and published == old, sorted(published)
            found = "old kept"
        data = open_prepared(out)
        assert len(data.train) > 0
    else:
        found = "incomplete"
        if out.exists():
            with pytest.raises(PreparedDataError, match="incomplete"):
                open_prepared(out)
    settings = {"unit_bytes": UNIT_BYTES, "shard_tokens": SHARD_TOKENS}
    if found == "old kept":
        with pytest.raises(PrepareError, match="--overwrite"):
            prepare([str(corpus)], out, **settings)  # type: ignore[arg-type]
        assert _published(out) == old  # the refusal touched nothing
    if found == "finished":  # whole: the same preparation is reused, and --overwrite makes it afresh
        assert prepare([str(corpus)], out, **settings).reused  # type: ignore[arg-type]
    result = prepare([str(corpus)], out, overwrite=True, **settings)  # type: ignore[arg-type]
    assert not result.reused
    assert _files(out) == expected
    assert not (out / ".partial").exists()
    return found


def test_prepare_killed_at_random_points_never_leaves_a_wrong_complete_directory(
        tmp_path: Path, rng: random.Random) -> None:
    corpus = _corpus(tmp_path / "corpus.jsonl", 2_000_000, seed=3)
    reference = tmp_path / "reference"
    settings = {"unit_bytes": UNIT_BYTES, "shard_tokens": SHARD_TOKENS}
    prepare([str(corpus)], reference, **settings)  # type: ignore[arg-type]
    expected = _files(reference)
    assert sum(name.endswith(".bin") for name in expected) >= 4, sorted(expected)  # several shards
    old_reference = tmp_path / "old-reference"
    old_settings = {"val_fraction": 0.2, **settings}
    prepare([str(corpus)], old_reference, **old_settings)  # type: ignore[arg-type]
    old = _files(old_reference)

    env = child_env()
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def child(out: Path, kill_at: int, workers: int) -> tuple[int, str]:
        config = {"sources": [str(corpus)], "out": str(out), "workers": workers, "overwrite": True, **settings}
        proc = start([str(script), str(kill_at), json.dumps(config)], env)
        _, err = proc.communicate(timeout=240)
        return proc.returncode, err.decode()

    # An uninterrupted child counts the fault points (and writes the same bytes as in-process).
    config = {"sources": [str(corpus)], "out": str(tmp_path / "count"), "workers": 1, **settings}
    counted = run([str(script), "0", json.dumps(config)], env)
    assert counted.returncode == 0, counted.stderr[-2000:]
    points = int(counted.stdout.strip())
    assert points > 40, points
    assert _files(tmp_path / "count") == expected

    seen = []
    for i, kill_at in enumerate(sorted(rng.sample(range(1, points + 1), 6))):
        out = tmp_path / f"killed-{i}"
        over_old = i % 2 == 1  # every other run replaces an older preparation
        if over_old:
            prepare([str(corpus)], out, **old_settings)  # type: ignore[arg-type]
        code, err = child(out, kill_at, workers=2 if i % 3 == 0 else 1)
        assert code == -signal.SIGKILL, (kill_at, code, err[-2000:])
        seen.append((kill_at, _check_after_kill(out, corpus, expected, old if over_old else None)))

    # The real command line, two workers, killed at a random moment after it starts writing.
    out = tmp_path / "cli"
    proc = start(["-m", "yet_another_retnet", "prepare", str(corpus), "--out", str(out), "--workers", "2",
                  "--quiet"], env)
    deadline = time.monotonic() + 120
    while not (out / ".partial").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.2))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    # The command line uses the default unit and shard sizes: compare with its own uninterrupted run.
    cli_reference = tmp_path / "cli-reference"
    assert main(["prepare", str(corpus), "--out", str(cli_reference), "--quiet"]) == 0
    cli_expected = _files(cli_reference)
    if (out / "index.json").is_file():
        assert _files(out) == cli_expected
    assert main(["prepare", str(corpus), "--out", str(out), "--quiet"]) == 0
    assert _files(out) == cli_expected
    print("prepare killed at call / found:", seen)
    assert {found for _, found in seen} <= {"incomplete", "old kept", "finished"}



WORKER_DIES = """
import os, signal, sys
from yet_another_retnet.training import prepare as p
from yet_another_retnet.training.prepare import encode

real = encode.encode_unit

def encode_or_die(unit):
    if unit.start > 0:  # the worker given the second unit dies, as under the out-of-memory killer
        os.kill(os.getpid(), signal.SIGKILL)
    return real(unit)

encode.encode_unit = encode_or_die  # the forked workers see it too
try:
    p.prepare([sys.argv[1]], sys.argv[2], workers=2, unit_bytes=1 << 16)
except p.PrepareError as err:  # as the command line reports it
    print(f"retnet: error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_worker_that_dies_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path / "corpus.jsonl", 400_000, seed=5)
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(WORKER_DIES)
    proc = start([str(script), str(corpus), str(out)], child_env())
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("prepare waited forever for a worker that had died")
    line = assert_one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err.decode()))
    assert "worker process died" in line and "--workers" in line, line
    assert not (out / "index.json").exists() and not (out / ".partial").exists(), sorted(out.rglob("*"))
    # Nothing half-done is in the way of the next run.
    assert not prepare([str(corpus)], out, workers=2, unit_bytes=1 << 16).reused
    assert len(open_prepared(out).train) > 0
