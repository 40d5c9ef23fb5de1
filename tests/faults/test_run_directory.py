"""Runs on one directory: a second run is refused at once, ``--overwrite`` loses nothing until the
new run has a checkpoint, a run killed before its first checkpoint leaves a directory the next
command handles."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import pytest

from yet_another_retnet.cli import main
from yet_another_retnet.training import trainer
from yet_another_retnet.training.checkpoint import load_checkpoint

from .conftest import (
    TINY,
    assert_one_error_line,
    child_env,
    kill_after,
    run,
    snapshot,
    start,
    train_args,
)


def _train(out: Path, corpus: Path, *extra: str) -> int:
    return main(["train", "--data", str(corpus), "--out", str(out), *TINY, *extra])


def test_a_second_run_on_the_same_directory_fails_at_once_and_touches_nothing(
        tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "run"
    env = child_env()
    first = start(train_args(out, corpus_file, "--max-steps", "100000", "--save-interval", "5"), env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        for extra in ([], ["--overwrite"]):
            before = {k: v for k, v in snapshot(out).items() if k == "train_config.json"}
            second = run(train_args(out, corpus_file, "--max-steps", "3", *extra), env, timeout=120)
            line = assert_one_error_line(second)
            assert "in use by another retnet process" in line, line
            assert {k: v for k, v in snapshot(out).items() if k == "train_config.json"} == before
            assert first.poll() is None  # the first run goes on
    finally:
        kill_after(first, 0, group=True)


def test_two_runs_started_together_one_wins_whole(tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "run"
    env = child_env()
    procs = [start(train_args(out, corpus_file, "--max-steps", "6", "--seed", str(seed)), env) for seed in (1, 2)]
    errs = [p.communicate(timeout=240)[1].decode() for p in procs]
    results = [(p.returncode, err) for p, err in zip(procs, errs, strict=True)]
    codes = sorted(code for code, _ in results)
    # Either one ran while the other was refused, or (a slow start) the second found a finished
    # run and was refused for that: never two runs mixed in one directory.
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert loser.strip().count("\n") == 0 and loser.startswith("retnet: error: "), loser
    winner_seed = 1 if results[0][0] == 0 else 2
    state = load_checkpoint(out)
    assert state["step"] == 6 and state["run"]["train"]["seed"] == winner_seed


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    assert _train(out, corpus_file, "--max-steps", "3", "--eval-interval", "3") == 0
    old = snapshot(out)
    calls = {"n": 0}
    real = trainer.lm_loss

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("simulated failure at step 2")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "lm_loss", failing)
    assert _train(out, corpus_file, "--max-steps", "4", "--eval-interval", "4", "--overwrite", "--seed", "5") == 2
    assert snapshot(out) == old  # the old run, byte for byte, and nothing of the new one
    monkeypatch.setattr(trainer, "lm_loss", real)
    # Once the new run has its first checkpoint, the old one is gone for good.
    assert _train(out, corpus_file, "--max-steps", "4", "--eval-interval", "2", "--overwrite", "--seed", "5") == 0
    assert load_checkpoint(out)["run"]["train"]["seed"] == 5
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_overwrite_sets_aside_and_restores_the_loggers_directories(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tensorboard/ is a run file too: a failed --overwrite brings the old run's events back
    (the new run's gone), a successful one leaves only the new run's events."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    log = ["--log-to", "tensorboard", "--log-interval", "1"]
    assert _train(out, corpus_file, "--max-steps", "3", "--eval-interval", "3", *log) == 0
    old = snapshot(out)
    assert any(name.startswith("tensorboard/") for name in old)
    real = trainer.lm_loss
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # after the new run opened its own tensorboard/ directory
            raise FloatingPointError("simulated failure at step 2")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer, "lm_loss", failing)
    assert _train(out, corpus_file, "--max-steps", "4", "--eval-interval", "4", "--overwrite", "--seed", "5", *log) == 2
    assert snapshot(out) == old  # the old run, its events included, and nothing of the new one
    monkeypatch.setattr(trainer, "lm_loss", real)
    assert _train(out, corpus_file, "--max-steps", "4", "--eval-interval", "4", "--overwrite", "--seed", "5", *log) == 0
    event_files = list((out / "tensorboard").iterdir())
    assert len(event_files) == 1 and f"tensorboard/{event_files[0].name}" not in old
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_overwrite_killed_at_random_points_keeps_one_whole_run(
        tmp_path: Path, corpus_file: Path, rng: random.Random) -> None:
    """kill -9 an --overwrite run anywhere: the next command finds the old run (killed before
    the new one's first checkpoint) or the new one (after it), never a mix or nothing."""
    out = tmp_path / "run"
    assert _train(out, corpus_file, "--max-steps", "3", "--eval-interval", "3") == 0
    old = snapshot(out)
    env = child_env()
    outcomes = set()
    for _ in range(2):
        proc = start(train_args(out, corpus_file, "--max-steps", "40", "--eval-interval", "20", "--overwrite",
                                "--seed", "9"), env)
        kill_after(proc, rng.uniform(0.5, 7.0), group=True)
        # The next command (a plain rerun) repairs the directory before it checks it.
        result = run(train_args(out, corpus_file, "--max-steps", "3"), env, timeout=120)
        # Killed between setting the old run aside and the new one's first checkpoint, the rerun
        # first puts the old run back and says so in a note; then it fails in one error line.
        lines = result.stderr.splitlines()
        notes = [line for line in lines if line.startswith("retnet: note: restored the run")]
        assert len(notes) <= 1, result.stderr[-2000:]
        assert_one_error_line(subprocess.CompletedProcess(
            result.args, result.returncode, result.stdout, "\n".join(line for line in lines if line not in notes)))
        state = load_checkpoint(out)
        seed = state["run"]["train"]["seed"]
        assert not (notes and seed != 0), "a restore note, but the new run is in place"
        if seed == 0:
            assert snapshot(out) == old
            outcomes.add("old")
        else:
            assert seed == 9 and state["step"] >= 20
            outcomes.add("new")
            assert _train(out, corpus_file, "--max-steps", "3", "--eval-interval", "3", "--overwrite") == 0
            old = snapshot(out)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert outcomes, "no outcome recorded"


def test_a_run_killed_before_its_first_checkpoint_can_be_started_over(
        tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # What such a run leaves: its settings and tokenizer, no checkpoint (and maybe a .tmp file).
    assert _train(out, corpus_file, "--max-steps", "2", "--eval-interval", "2") == 0
    (out / "checkpoint.pt").unlink()
    (out / "model.safetensors").unlink()
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    capsys.readouterr()
    assert _train(out, corpus_file, "--max-steps", "2", "--resume") == 2
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert _train(out, corpus_file, "--max-steps", "2", "--eval-interval", "2") == 0
    assert load_checkpoint(out)["step"] == 2
    assert not list(out.glob(".*"))


def test_a_set_aside_killed_before_its_manifest_keeps_the_old_run(tmp_path: Path) -> None:
    """kill -9 between ``.previous-run/`` being made and its manifest landing: nothing had moved,
    so the next command must keep every file of the old run (not take them for the new run's)."""
    from yet_another_retnet.training import rundir

    out = tmp_path / "run"
    out.mkdir()
    for name in trainer.RUN_FILES[:3]:
        (out / name).write_text(f"old {name}")
    aside = out / rundir.ASIDE_NAME
    aside.mkdir()
    (aside / "MANIFEST.json.tmp").write_text('["half')  # the kill: a manifest never renamed in
    before = {p.name: p.read_text() for p in out.iterdir() if p.is_file()}
    with rundir.hold(out):
        note = rundir.recover(out, trainer.RUN_FILES)
    assert note is not None and "restored" in note
    assert not aside.exists()
    assert {p.name: p.read_text() for p in out.iterdir()} == before


def test_recovery_deletes_half_written_run_files(tmp_path: Path) -> None:
    """A run killed inside an atomic write leaves its temporary; the next command deletes it (and
    nothing of the user's that merely looks similar)."""
    from yet_another_retnet.training import rundir

    out = tmp_path / "run"
    out.mkdir()
    name = trainer.RUN_FILES[0]
    (out / name).write_text("whole")
    (out / f".{name}.k2j4.tmp").write_text("half")
    (out / ".notes.txt.tmp").write_text("the user's")
    with rundir.hold(out):
        assert rundir.recover(out, trainer.RUN_FILES) is None
    assert sorted(p.name for p in out.iterdir()) == sorted([".notes.txt.tmp", name])
    assert (out / name).read_text() == "whole"
