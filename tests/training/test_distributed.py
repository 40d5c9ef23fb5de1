"""Data-parallel training on 2 CPU processes (torchrun, gloo) equals one process on the same
global batch: DDP (with gradient accumulation) and FSDP2, whose checkpoint a single process
then resumes."""

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
from yet_another_retnet.training.progress import read_metrics

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ARGS = ["--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-dim", "64", "--device", "cpu",
        "--seq-len", "16", "--batch-size", "4", "--max-steps", "5", "--log-interval", "1", "--eval-interval", "5",
        "--eval-max-windows", "3", "--dropout", "0", "--sample-tokens", "0", "--seed", "7"]


def torchrun(*argv: str) -> subprocess.CompletedProcess[str]:
    # This interpreter's own launcher: a `torchrun` on PATH may belong to another environment.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "yet_another_retnet", "train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def curve(directory: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(directory) if r["kind"] == "train"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = root / "corpus.txt"
    data.write_text(default_corpus_text()[:12_000])
    single = root / "single"
    assert main(["train", "--data", str(data), "--out", str(single), *ARGS]) == 0
    return data, single


def test_ddp_two_processes_equal_one(setup: tuple[Path, Path]) -> None:
    data, single = setup
    out = single.parent / "ddp"
    # 2 ranks x 2 accumulation steps x 1 sequence = the single run's batch of 4.
    result = torchrun("--data", str(data), "--out", str(out), *ARGS, "--grad-accum", "2")
    assert result.stdout.count("done: step 5/5") == 1  # only rank 0 prints
    assert "2 process(es), DDP" in result.stdout
    reference = curve(single)
    assert len(reference) == 5 and reference[-1] != reference[0]
    assert curve(out) == pytest.approx(reference, rel=1e-4)
    assert_same_weights(out, single)


@pytest.mark.skipif(fsdp2_problem() is not None, reason=str(fsdp2_problem()))
def test_fsdp_checkpoint_resumes_in_one_process(setup: tuple[Path, Path]) -> None:
    data, single = setup
    out = single.parent / "fsdp"
    result = torchrun("--data", str(data), "--out", str(out), *ARGS, "--fsdp", "--stop-after", "3")
    assert "2 process(es), FSDP" in result.stdout
    assert len(curve(out)) == 3
    # The FSDP checkpoint holds full tensors: a single process continues it.
    assert main(["train", "--out", str(out), "--resume", "--device", "cpu"]) == 0
    assert curve(out) == pytest.approx(curve(single), rel=1e-4)
    assert_same_weights(out, single)
