"""``retnet bench``: bad options are one-line usage errors (exit 2) found before anything is
measured, zero counts are refused rather than replaced by defaults, and reports are kept whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yet_another_retnet.cli import main


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("retnet: error: ") and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


@pytest.mark.parametrize("argv, flag", [
    (["inference", "--quick", "--steps", "0"], "--steps"),
    (["inference", "--quick", "--batch-context", "0"], "--batch-context"),
    (["inference", "--quick", "--max-cache-gib", "nan"], "--max-cache-gib"),
    (["training", "--quick", "--repeats", "0"], "--repeats"),
    (["training", "--quick", "--chunk-size", "0"], "--chunk-size"),
    (["quality", "--quick", "--steps", "0"], "--steps"),
    (["quality", "--quick", "--eval-tokens", "0"], "--eval-tokens"),
    (["quality", "--quick", "--length", "100000000"], "--length"),
    (["ops", "--quick", "--repeats", "0"], "--repeats"),
    (["ops", "--quick", "--case-timeout", "-1"], "--case-timeout"),
    (["ops", "--quick", "--max-memory-gb", "nan"], "--max-memory-gb"),
    (["cpu_inference", "--quick", "--tokens", "0"], "--tokens"),
    (["cpu_inference", "--quick", "--serve-tokens", "0"], "--serve-tokens"),
    (["cpu_inference", "--quick", "--clients", "0"], "--clients"),
    (["cpu_inference", "--quick", "--variants", ","], "--variants"),
    (["peers", "--quick", "--tokens", "0"], "--tokens"),
    (["peers", "--quick", "--rounds", "0"], "--rounds"),
    (["peers", "--quick", "--sections", "decode,bogus"], "--sections"),
    # A bad value for argparse itself: the CLI's one line, not a usage block and a SystemExit.
    (["ops", "--repeats", "many"], "--repeats"),
    (["inference", "--dtype", "float8"], "--dtype"),
])
def test_bad_bench_options_are_one_line_errors(argv: list[str], flag: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *argv, "--out", str(tmp_path / "out")]) == 2
    assert flag in one_error_line(capsys)


@pytest.mark.parametrize("name", ["ops", "inference", "training", "quality", "cpu_inference", "peers"])
def test_an_out_that_is_a_file_is_refused_before_measuring(name: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    out.write_text("not a directory")
    # --lengths/--contexts that would take long if measured: the error must come first.
    assert main(["bench", name, "--quick", "--out", str(out)]) == 2
    assert "--out" in one_error_line(capsys)
    assert out.read_text() == "not a directory"


def test_ops_with_every_case_failing_exits_non_zero_and_keeps_the_report(tmp_path: Path) -> None:
    (tmp_path / "ops.json").write_text('{"good": true}\n')
    # A case timeout no worker can meet: every case fails.
    assert main(["bench", "ops", "--quick", "--lengths", "16", "--forms", "parallel", "--case-timeout", "0.001",
                 "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "ops.json").read_text()) == {"good": True}
    assert not (tmp_path / "ops.md").exists()


def test_bench_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "ops", "--help"]) == 0
    assert "--case-timeout" in capsys.readouterr().out
