"""What a ``retnet train`` call may change: a resume that cannot continue faithfully is refused in
one line naming the argument (never a traceback), one that only rounds differently says so, and
a logger whose package is missing is named before anything is written."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from conftest import CPU_FP16

from yet_another_retnet.cli import main

from .conftest import TINY, snapshot


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """An fp32 run stopped at step 2 of 3 (--eval-max-windows 2, the default --grad-accum and
    --chunk-size)."""
    out = tmp_path_factory.mktemp("settings") / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(out), *TINY, "--max-steps", "3",
                 "--eval-interval", "3", "--stop-after", "2"]) == 0
    return out


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retnet: error: "), err
    return err[0]


def test_resume_refuses_what_it_cannot_continue_and_notes_what_rounds_differently(
        tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(run)
    resume = ["train", "--out", str(run), "--resume"]
    # fp16 over an fp32 run: no gradient scaler state to continue (was a raw RuntimeError).
    # Another evaluation set would mix two val-loss curves in one metrics file.
    refusals = [(["--precision", "fp16"], "--precision fp16 differs from the run"),
                (["--eval-max-windows", "3"], "--eval-max-windows 3 differs from the run")]
    for extra, message in refusals[0 if CPU_FP16 else 1:]:  # (torch 2.2 refuses CPU fp16 itself)
        capsys.readouterr()
        assert main([*resume, *extra]) == 2, extra
        assert message in _one_line(capsys), extra
        assert snapshot(run) == before, extra
    # The same steps with other rounding: the run continues, and says it is not bit for bit.
    capsys.readouterr()
    assert main([*resume, "--grad-accum", "2", "--chunk-size", "8", "--precision", "bf16"]) == 0
    printed = capsys.readouterr().out
    for note in ("--grad-accum 2: the run used 1", "--chunk-size 8: the run used the default",
                 "--precision bf16: the run used fp32"):
        assert f"note: {note}; it continues, but not bit for bit" in printed, note


@pytest.mark.parametrize(("logger", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_package_is_named_before_anything_is_written(
        tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        logger: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees without the package
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(corpus_file), "--out", str(out), *TINY, "--max-steps", "2",
                 "--log-to", logger]) == 2
    assert f"--log-to {logger} needs the `{logger}` package" in _one_line(capsys)
    assert not out.exists()
