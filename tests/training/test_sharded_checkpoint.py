"""Sharded checkpoints (torch.distributed.checkpoint) under FSDP2: a run saved by 2 processes or
by 1 resumes on 2 (gloo, CPU) and ends where a straight single-process run ends; training reads
prepared shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import fsdp2_problem
from safetensors.torch import load_file

from yet_another_retnet.cli import main
from yet_another_retnet.training.data import default_corpus_text
from yet_another_retnet.training.prepare import prepare
from yet_another_retnet.training.progress import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.skipif(fsdp2_problem() is not None, reason=str(fsdp2_problem())),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

ARGS = ["--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-dim", "64", "--device", "cpu",
        "--seq-len", "16", "--batch-size", "4", "--max-steps", "5", "--log-interval", "1", "--eval-interval", "5",
        "--eval-max-windows", "3", "--dropout", "0", "--sample-tokens", "0", "--seed", "7"]


def torchrun(*argv: str) -> None:
    # The launcher of this interpreter (a `torchrun` on PATH may belong to another environment).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "yet_another_retnet", "train", *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def curve(directory: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(directory) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dcp")
    (root / "corpus.txt").write_text(default_corpus_text()[:12_000])
    prepare([str(root / "corpus.txt")], root / "data")
    single = root / "single"
    assert main(["train", "--data", str(root / "data"), "--out", str(single), *ARGS]) == 0
    return root / "data", single


def assert_same_run(out: Path, single: Path) -> None:
    assert curve(out) == pytest.approx(curve(single), rel=1e-4)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(single / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    # Only the latest sharded checkpoint is kept, and it is the one checkpoint.pt names.
    assert [p.name for p in out.glob("checkpoint-dcp-*")] == ["checkpoint-dcp-000005"]


@pytest.mark.parametrize("saved_by", [2, 1])
def test_sharded_checkpoint_resumes_on_two_processes(setup: tuple[Path, Path], saved_by: int) -> None:
    data, single = setup
    out = single.parent / f"saved-by-{saved_by}"
    first = ["--data", str(data), "--out", str(out), *ARGS, "--sharded-checkpoint", "--stop-after", "3"]
    if saved_by == 2:
        torchrun(*first, "--fsdp")
        # Each rank wrote its own shard file.
        assert len(list((out / "checkpoint-dcp-000003").glob("*.distcp"))) == 2
    else:
        assert main(["train", *first]) == 0
    assert len(curve(out)) == 3
    torchrun("--out", str(out), "--resume", "--fsdp", "--sharded-checkpoint")
    assert_same_run(out, single)
