"""The ``retnet`` command line: help, one-line errors that write nothing, generate, info, bench."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY

from yet_another_retnet import RetNet
from yet_another_retnet.cli import BENCHMARKS, main
from yet_another_retnet.models import PRESETS, RetNetConfig, count_parameters


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(out), *TINY, "--max-steps", "3",
                 "--eval-interval", "3"]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("retnet: error: "), err
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------
# Help
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command, expected", [
    (None, ["train", "generate", "eval", "info", "bench"]),
    ("train", ["--data", "--tokenizer", "--max-steps", "--out", "--preset", "--d-model", "--num-layers",
               "--num-heads", "--ffn-dim", "--seq-len", "--batch-size", "--grad-accum", "--lr", "--chunk-size",
               "--precision", "--grad-checkpointing", "--compile", "--seed", "--resume", "--eval-interval",
               "--log-interval", "--device", "--fsdp"]),
    ("generate", ["--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed"]),
    ("eval", ["--data", "--seq-len"]),
    ("info", ["--preset"]),
    ("bench", list(BENCHMARKS)),
])
def test_help_is_complete(command: str | None, expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*([command] if command else []), "--help"]) == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text, word


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "yet_another_retnet", "info", "--preset", "tiny"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"{count_parameters(RetNetConfig.from_preset('tiny')):,} parameters" in result.stdout


# --------------------------------------------------------------------------------------------
# Mistakes: one line on stderr, non-zero status, nothing written
# --------------------------------------------------------------------------------------------


def test_bad_training_requests_fail_cleanly(tmp_path: Path, corpus_file: Path, trained: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "blank.txt").write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("too short for a sequence")
    out = tmp_path / "out"
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(empty_dir)], "empty"),
        (["--data", str(tmp_path / "nothing-here")], "does not exist"),
        (["--data", str(short)], "too few"),
        (["--data", str(corpus_file), "--preset", "huge"], "unknown preset"),
        (["--data", str(corpus_file), "--resume"], "nothing to resume"),
        (["--data", str(corpus_file), "--max-steps", "abc"], "invalid int"),
        (["--data", str(corpus_file), "--max-steps", "0"], "--max-steps"),
        (["--data", str(corpus_file), "--d-model", "30", "--num-heads", "4"], "num_heads"),
        (["--data", str(corpus_file), "--batch-size", "3", "--grad-accum", "2"], "divisible"),
        (["--data", str(corpus_file), "--precision", "fp8"], "invalid choice"),
    ]
    for extra, message in cases:
        argv = ["train", "--out", str(out), *TINY[:-6], *extra]
        assert main(argv) != 0, extra
        line = one_error_line(capsys)
        assert message in line, (extra, line)
        assert not out.exists(), extra

    # An existing run: a different config, or no --resume, is refused and nothing changes.
    before = snapshot(trained)
    for extra, message in [
        (["--d-model", "64"], "already holds a training run"),
        (["--resume", "--seq-len", "32"], "--seq-len 32 differs"),
        (["--resume", "--d-model", "64"], "model configuration differs"),
        (["--resume", "--data", str(short)], "too few"),
        (["--resume", "--max-steps", "3"], "already reached step 3"),
    ]:
        argv = ["train", "--out", str(trained), "--data", str(corpus_file), *extra]
        assert main(argv) != 0, extra
        assert message in one_error_line(capsys), extra
    assert snapshot(trained) == before

    # A directory holding something else is not a run to overwrite silently.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(foreign), "--data", str(corpus_file)]) != 0
    assert "holds no training run" in one_error_line(capsys)
    assert snapshot(foreign) == {"notes.txt": b"mine"}


def test_other_commands_fail_cleanly(tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["generate", str(tmp_path / "none"), "--prompt", "x"], "does not exist"),
        (["eval", str(tmp_path / "none")], "does not exist"),
        (["eval", str(trained), "--data", str(tmp_path / "none.txt")], "does not exist"),
        (["info"], "give a model directory or --preset"),
        (["info", "--preset", "nope"], "unknown preset"),
        (["info", str(tmp_path)], "no config.json"),
        (["generate", str(trained), "--max-new-tokens", "-1"], "--max-new-tokens"),
        (["generate", str(trained), "--top-p", "1.5"], "--top-p"),
        (["bench", "nope"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
    ]:
        assert main(argv) != 0, argv
        assert message in one_error_line(capsys), argv


# --------------------------------------------------------------------------------------------
# generate, eval, info
# --------------------------------------------------------------------------------------------


def test_generate_greedy_matches_the_model(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "The é", "--max-new-tokens", "40", "--temperature", "0",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    model = RetNet.from_pretrained(trained)
    prompt = list("The é".encode())
    ids = model.generate(torch.tensor([prompt]), 40)[0].tolist()
    assert printed == bytes(ids).decode("utf-8", errors="replace") + "\n"


@pytest.mark.slow
def test_generate_compiled_and_bfloat16_match_the_model(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = torch.tensor([list(b"The ")])
    float32, bfloat16 = RetNet.from_pretrained(trained), RetNet.from_pretrained(trained).to(torch.bfloat16)
    for flags, reference in ((["--compile"], float32), (["--dtype", "bfloat16"], bfloat16)):
        capsys.readouterr()
        assert main(["generate", str(trained), "--prompt", "The ", "--max-new-tokens", "24", "--temperature", "0",
                     "--device", "cpu", *flags]) == 0
        ids = reference.generate(prompt, 24)[0].tolist()
        assert capsys.readouterr().out == bytes(ids).decode("utf-8", errors="replace") + "\n", flags


def test_generate_sampling_is_seeded(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    texts = []
    for seed in (1, 1, 2):
        capsys.readouterr()
        assert main(["generate", str(trained), "--prompt", "A", "--max-new-tokens", "30", "--seed", str(seed),
                     "--temperature", "1.5", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]


def test_eval_default_corpus(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(trained), "--max-windows", "3", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["data"] == "the default corpus's validation split"
    assert result["windows"] == 3 and result["seq_len"] == 16  # the training run's sequence length
    assert 0 < result["loss"] < 6 and result["bits_per_byte"] == pytest.approx(result["loss"] / 0.6931471805599453)


@pytest.mark.parametrize("preset", ["tiny", "1.3b"])
def test_info_preset_counts_parameters(preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--preset", preset, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == count_parameters(RetNetConfig.from_preset(preset))
    assert info["config"]["d_model"] == PRESETS[preset]["d_model"]
    if preset == "1.3b":  # the paper's 1.3B: d 2048, 24 layers, FFN 4096, value factor 2
        assert 1.2e9 < info["parameters"] < 1.5e9


def test_info_on_a_run_directory(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["info", str(trained)]) == 0
    text = capsys.readouterr().out
    model = RetNet.from_pretrained(trained)
    assert f"{model.num_parameters():,} parameters" in text
    assert "last evaluation: step 3" in text


# --------------------------------------------------------------------------------------------
# bench dispatch
# --------------------------------------------------------------------------------------------


def test_bench_dispatches_to_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("yet_another_retnet.bench.quality")
    fake.main = lambda argv: seen.append(argv) or 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "yet_another_retnet.bench.quality", fake)
    assert main(["bench", "quality", "--steps", "5", "--help"]) == 3
    assert seen == [["--steps", "5", "--help"]]


def test_bench_missing_module_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "yet_another_retnet.bench.peers", None)
    assert main(["bench", "peers"]) == 2
    assert "benchmark 'peers' is not available" in one_error_line(capsys)


# --------------------------------------------------------------------------------------------
# Edge cases: options checked, nothing half-written
# --------------------------------------------------------------------------------------------


def _yar051_checkpoint(path: Path) -> Path:
    from yet_another_retnet.retnet import RetNet as RetNet051

    torch.save(RetNet051(20, d_model=16, nhead=2, num_layers=1).state_dict(), path)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the 0.5.1 API that makes the checkpoint
def test_convert_yar051_needs_an_empty_out_and_overwrite_replaces_it_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _yar051_checkpoint(tmp_path / "old.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")  # an old run's file
    assert main(["convert", "--from", "yar051", str(src), str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert snapshot(out) == {"metrics.jsonl": b"{}\n"}
    assert main(["convert", "--from", "yar051", str(src), str(out), "--overwrite"]) == 0
    assert "metrics.jsonl" not in snapshot(out) and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    # A failed conversion leaves no parent directories it created.
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["convert", "--from", "yar051", str(tmp_path / "bad.pt"), str(tmp_path / "a" / "b" / "out")]) == 2
    assert not (tmp_path / "a").exists()


def test_convert_refuses_yar051_options_for_other_formats(trained: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["convert", str(trained), str(tmp_path / "fla"), "--nhead", "7", "--post-norm",
                 "--activation", "gelu"]) == 2
    line = one_error_line(capsys)
    assert "--nhead" in line and "--post-norm" in line and "--activation" in line and "yar051" in line
    assert not (tmp_path / "fla").exists()


def test_failed_fla_convert_leaves_no_parent_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "model"
    RetNet(RetNetConfig.from_preset("tiny", num_layers=2)).save_pretrained(model_dir)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(RetNet, "to_fla", fail)
    assert main(["convert", str(model_dir), str(tmp_path / "x" / "y" / "fla")]) == 2
    assert "disk full" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_eval_refuses_data_prepared_with_another_tokenizer(trained: Path, corpus_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(corpus_file), "--out", str(prepared), "--quiet"]) == 0
    index = json.loads((prepared / "index.json").read_text())
    index["tokenizer"] = {"type": "hf", "file": "tokenizer.json", "vocab_size": 256, "sha256": "0" * 64}
    (prepared / "index.json").write_text(json.dumps(index))
    capsys.readouterr()
    assert main(["eval", str(trained), "--data", str(prepared)]) == 2
    assert "another tokenizer" in one_error_line(capsys)


@pytest.mark.parametrize("argv, flag", [
    (["--output", "res.json"], "--output"),
    (["--limit", "nan", "--tasks", "x"], "--limit"),
    (["--num-fewshot", "-5", "--tasks", "x"], "--num-fewshot"),
    (["--num-fewshot", "-5"], "--num-fewshot"),
    (["--device", "mps"], "--device"),
])
def test_eval_option_checks(trained: Path, argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(trained), *argv]) == 2
    assert flag in one_error_line(capsys)


def test_generate_checks_top_k_before_echoing_the_prompt(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["generate", str(trained), "--prompt", "hello", "--top-k", "0"]) == 2
    assert capsys.readouterr().out == ""
    assert main(["generate", str(trained), "--prompt", "hello", "--device", "xpu"]) == 2
    assert "cpu or cuda" in one_error_line(capsys)
    assert main(["generate", str(trained), "--prompt", "hello", "--device", "cpu", "--cuda-graph"]) == 2
    assert "--cuda-graph" in one_error_line(capsys)


def test_info_skips_malformed_metrics_and_shows_null_as_na(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    RetNet(RetNetConfig.from_preset("tiny", num_layers=2)).save_pretrained(run)
    (run / "metrics.jsonl").write_text(
        '{"kind": "eval", "step": 5, "val_loss": 2.5, "val_bpb": 3.0}\n'
        '{"kind": "eval", "step": 10, "val_loss": null, "val_bpb": null}\n'
        '{"kind": "eval", "step": 12}\n'
        '[1, 2]\n'
        '{"kind": "ev\n')
    assert main(["info", str(run)]) == 0
    assert "last evaluation: step 10, val loss n/a, val bits/byte n/a" in capsys.readouterr().out
