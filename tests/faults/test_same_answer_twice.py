"""Same command, same answer: identical ``retnet train`` runs, and a run killed and resumed five
times, end in bitwise-identical checkpoints.

The model is the ``tiny`` preset at 4 x 64 tokens, so that its larger products (the LM head:
256 x 128 x 256 multiply-adds) go through :func:`~yet_another_retnet.ops.matmul.cpu_backend`'s
choice, whose re-measurement in every process used to make runs differ."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from yet_another_retnet.ops import matmul
from yet_another_retnet.training.checkpoint import load_checkpoint

from .conftest import child_env, kill_after, run, start

ARGS = ["--preset", "tiny", "--seq-len", "64", "--batch-size", "4", "--max-steps", "50", "--device", "cpu",
        "--sample-tokens", "0", "--eval-interval", "25", "--eval-max-windows", "2", "--log-interval", "5",
        "--dropout", "0.1"]


def _cmd(out: Path, corpus: Path, *extra: str) -> list[str]:
    return ["-m", "yet_another_retnet", "train", "--data", str(corpus), "--out", str(out), *ARGS, *extra]


def _step(out: Path) -> int:
    try:
        return int(load_checkpoint(out)["step"])
    except OSError:
        return 0


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca["step"] == cb["step"] == 50
    assert ca["cpu_matmul"] == cb["cpu_matmul"]
    for name, state in ca["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], cb["optimizer"]["state"][name][key]), (name, key)
    losses = [[(r["step"], r.get("loss"), r.get("val_loss")) for r in c["metrics"]] for c in (ca, cb)]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_two_identical_runs_and_a_run_killed_five_times_end_bitwise_identical(
        tmp_path: Path, corpus_file: Path, rng: random.Random) -> None:
    # A cache of its own: the first process measures and records the backend, the others read it.
    env = child_env(YARETNET_CACHE_DIR=str(tmp_path / "cache"))
    env.pop(matmul.ENV, None)
    probe = run(["-c", "from yet_another_retnet.ops import matmul; print(matmul.cpu_backend())"], env)
    assert probe.returncode == 0 and (tmp_path / "cache" / matmul.RECORD_NAME).is_file(), probe.stderr
    # The two straight runs run at the same time as the killed ones: a loaded machine, where a
    # choice re-measured per process would flip.
    straight = [start(_cmd(tmp_path / name, corpus_file), env) for name in ("first", "second")]

    out = tmp_path / "killed"
    steps_at_kill = []
    for i in range(5):
        resume = ["--resume"] if (out / "checkpoint.pt").is_file() else []
        proc = start(_cmd(out, corpus_file, "--save-interval", "1", *resume), env)
        # Kill once the run is past a random step (spread so the five kills fit in 50 steps),
        # a random fraction of a step later: inside a step or inside a save.
        target = rng.randint(8 * i + 1, 8 * i + 8)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if _step(out) >= target:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        kill_after(proc, rng.uniform(0.0, 0.3), group=True)
        steps_at_kill.append(_step(out))
    if load_checkpoint(out)["step"] < 50:
        done = run(_cmd(out, corpus_file, "--save-interval", "1", "--resume"), env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    for proc in straight:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    _assert_same_run(tmp_path / "first", tmp_path / "second")
    assert len(steps_at_kill) == 5 and all(0 < s < 50 for s in steps_at_kill), steps_at_kill
    _assert_same_run(tmp_path / "first", out)
