"""``retnet train`` / ``retnet eval``: a finished run is not stretched silently, validation samples
windows evenly, and the help states the real defaults."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY as _TINY

from yet_another_retnet.cli import main
from yet_another_retnet.models import RetNet, RetNetConfig
from yet_another_retnet.training.checkpoint import load_checkpoint
from yet_another_retnet.training.data import (
    ByteTokenizer,
    default_corpus_text,
    encode_corpus,
    eval_windows,
)
from yet_another_retnet.training.evaluation import eval_window_index, evaluate
from yet_another_retnet.training.progress import read_metrics
from yet_another_retnet.training.trainer import TrainConfig

TINY = [*_TINY, "--log-interval", "1", "--warmup-steps", "1"]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retnet: error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run that finished its 3-step schedule, and its corpus."""
    root = tmp_path_factory.mktemp("finished")
    corpus = root / "corpus.txt"
    corpus.write_text(default_corpus_text()[:8_000])
    out = root / "run"
    assert main(["train", "--data", str(corpus), "--out", str(out), *TINY, "--max-steps", "3",
                 "--eval-interval", "3"]) == 0
    return out, corpus


def test_resuming_a_finished_run_to_more_steps_is_refused(
        finished: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    out, corpus = finished
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--max-steps", "5"]) == 2
    line = _error_line(capsys)
    assert "--max-steps 5" in line and "finished its 3-step LR schedule" in line and "--extend-schedule" in line
    assert _snapshot(out) == before  # nothing written


def test_a_refused_resume_leaves_the_runs_prepared_data_alone(
        finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, corpus = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    edited = tmp_path / "corpus.txt"
    edited.write_text(corpus.read_text() + "\nOne more paragraph, added after the run started.\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["train", "--data", str(edited), "--out", str(out), "--resume", "--max-steps", "3"]) == 2
    assert "the training data differs" in _error_line(capsys)
    # The edited text was prepared beside the run, not over its data, and removed on the refusal.
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "run"]


def test_extend_schedule_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--out", str(tmp_path / "new"), "--extend-schedule", *TINY]) == 2
    assert "--extend-schedule applies only with --resume" in _error_line(capsys)
    assert not (tmp_path / "new").exists()


def test_extend_schedule_stretches_it_and_says_so(
        finished: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, corpus = finished
    out = tmp_path / "run"
    shutil.copytree(source, out)
    lr_at_3 = [r["lr"] for r in read_metrics(out) if r["kind"] == "train"][-1]
    capsys.readouterr()
    assert main(["train", "--data", str(corpus), "--out", str(out), "--resume", "--max-steps", "6",
                 "--extend-schedule"]) == 0
    printed = capsys.readouterr().out
    assert "LR schedule of the run (3 steps) is extended to 6 steps from step 3" in printed
    assert load_checkpoint(out)["step"] == 6
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    # The horizon moved: step 4 (updated with the factor at index 3) follows the 6-step schedule,
    # above the LR the 3-step schedule ended with.
    config = TrainConfig(max_steps=6, warmup_steps=1)
    from yet_another_retnet.training.optim import lr_factor

    assert train[3]["lr"] == pytest.approx(config.lr * lr_factor(3, config))
    assert train[3]["lr"] > lr_at_3
    # Each record says how many steps its loss averages (log interval 1: one each).
    assert all(r["loss_window_steps"] == 1 for r in train)


def test_eval_window_index_spreads_evenly_and_deterministically() -> None:
    assert eval_window_index(5, None).tolist() == [0, 1, 2, 3, 4]
    assert eval_window_index(5, 9).tolist() == [0, 1, 2, 3, 4]
    assert eval_window_index(10, 4).tolist() == [0, 2, 5, 7]
    assert eval_window_index(100, 3).tolist() == [0, 33, 66]
    assert eval_window_index(100, 1).tolist() == [0]
    picked = eval_window_index(1000, 128)
    assert len(set(picked.tolist())) == 128 and picked.max() >= 990  # reaches the split's end
    assert torch.equal(picked, eval_window_index(1000, 128))


def test_eval_max_windows_scores_the_evenly_spaced_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = RetNet(RetNetConfig(vocab_size=256, d_model=32, num_heads=2, num_layers=1, ffn_dim=64)).eval()
    model.save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model")
    text = default_corpus_text()[:3_000]
    (tmp_path / "data.txt").write_text(text)
    assert main(["eval", str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"), "--seq-len", "32",
                 "--max-windows", "4", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    windows = eval_windows(encode_corpus(text, ByteTokenizer()), 32)
    count = len(windows)
    assert count > 40 and result["windows"] == 4
    spread = windows[[0, count // 4, count // 2, 3 * count // 4]]
    expected = evaluate(model, spread, 8, torch.device("cpu"), "fp32")
    first = evaluate(model, windows[:4], 8, torch.device("cpu"), "fp32")
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert not math.isclose(result["loss"], first, rel_tol=1e-6)  # not the first four


def test_train_help_states_the_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    chunk = RetNetConfig.from_preset(TrainConfig().preset).chunk_size
    assert f"default: the model's chunk_size, {chunk})" in text
    assert "compile_chunkwise()" in text and "minutes on 2" not in text
    assert "step loss" in text and "loss_window_steps" in text
    assert "spread evenly" in text
