"""Bad input at the boundaries (command line, config, model entry): one clear line or an error
naming the argument, nothing written, nothing accepted silently; a full disk loses nothing."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch

from yet_another_retnet import MultiScaleRetention, RetNet
from yet_another_retnet.cli import main
from yet_another_retnet.models import RetNetConfig
from yet_another_retnet.models import checkpoint as model_checkpoint
from yet_another_retnet.ops.retention import retention_parallel
from yet_another_retnet.training.checkpoint import load_checkpoint

from .conftest import TINY, snapshot


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    assert main(["train", "--data", str(corpus_file), "--out", str(out), *TINY, "--max-steps", "2",
                 "--eval-interval", "2"]) == 0
    return out


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retnet: error: "), err
    return err[0]


def test_command_line_mistakes_are_one_line_and_leave_nothing(
        tmp_path: Path, trained: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "new"
    train = ["train", "--data", str(corpus_file), "--out", str(out), *[a for a in TINY if a not in ("--device", "cpu")]]
    for extra, message in [(["--device", "bogus"], "is not a device"), (["--device", "meta"], "meta"),
                           (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
                           (["--lr", "inf"], "--lr")]:
        capsys.readouterr()
        assert main([*train, *extra]) == 2, extra
        assert message in _one_line(capsys), extra
        assert not out.exists(), extra
    generate = ["generate", str(trained), "--max-new-tokens", "3"]
    for extra, message in [(["--device", "bogus"], "is not a device"), (["--device", "meta"], "meta"),
                           (["--temperature", "nan"], "temperature"), (["--temperature", "inf"], "temperature")]:
        capsys.readouterr()
        assert main([*generate, *extra]) == 2, extra
        assert message in _one_line(capsys), extra
    # A temperature at the edge of the floats decodes (greedy in the limit) instead of failing.
    capsys.readouterr()
    assert main([*generate, "--temperature", "1e-45", "--prompt", "ab"]) == 0
    tiny_t = capsys.readouterr().out
    assert main([*generate, "--temperature", "0", "--prompt", "ab"]) == 0
    assert tiny_t == capsys.readouterr().out
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler to be found
    monkeypatch.delenv("CXX", raising=False)
    assert main([*generate, "--compile", "--device", "cpu"]) == 2
    assert "needs a C++ compiler" in _one_line(capsys)


def test_damaged_run_records_are_one_line_on_resume_and_eval(
        tmp_path: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    for text, message in [("{not json", "train_config.json"), ('{"train": [1]}', "train"),
                          ('{"train": {"seq_len": Infinity}}', "Infinity"),
                          ('{"train": {"seq_len": "long"}}', "seq")]:
        run = tmp_path / f"run{len(text)}"
        shutil.copytree(trained, run)
        (run / "train_config.json").write_text(text)
        before = snapshot(run)
        for argv in (["train", "--out", str(run), "--resume", "--max-steps", "4"], ["eval", str(run)]):
            capsys.readouterr()
            assert main(argv) == 2, (text, argv)
            assert message in _one_line(capsys), (text, argv)
        assert snapshot(run) == before


def test_a_full_disk_while_saving_loses_nothing(
        tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC at each of the first few file syncs of a run (the moment a full disk shows on most
    filesystems): one line, exit 2, and the files of the last complete save stay whole."""
    args = ["train", "--data", str(corpus_file), *TINY, "--max-steps", "4", "--save-interval", "2",
            "--eval-interval", "4"]
    real_fsync = os.fsync
    for fail_at in (1, 2, 4, 6):  # the first sync (train_config.json) up to the second save
        out = tmp_path / f"run{fail_at}"
        calls = {"n": 0}

        def fsync(fd: int, fail_at: int = fail_at, calls: dict[str, int] = calls) -> None:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(model_checkpoint.os, "fsync", fsync)
        capsys.readouterr()
        code = main([*args, "--out", str(out)])
        monkeypatch.setattr(model_checkpoint.os, "fsync", real_fsync)
        assert code == 2, fail_at
        assert "No space left on device" in _one_line(capsys)
        assert not list(out.glob(".*.tmp"))
        # What is there is whole: a checkpoint loads (its checksum holds) and resuming finishes.
        if (out / "checkpoint.pt").is_file():
            step = load_checkpoint(out)["step"]
            assert main([*args, "--out", str(out), "--resume"]) == 0, fail_at
            assert load_checkpoint(out)["step"] == 4 > step
        else:
            assert main([*args, "--out", str(out)]) == 0, fail_at
        RetNet.from_pretrained(out)


def test_model_and_layer_inputs_are_checked_at_the_entry() -> None:
    model = RetNet(RetNetConfig.from_preset("tiny", d_model=32, num_layers=1, ffn_dim=64)).eval()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.to(torch.uint8))
    with pytest.raises(IndexError, match="labels"):
        model(ids, labels=torch.tensor([[1, 2, 999]]))
    model(ids, labels=torch.tensor([[1, -100, 3]]))  # -100: ignored, accepted
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model(ids, attention_mask=torch.tensor([[0, 2, 1]]))
    with pytest.raises(ValueError, match="at least one row"):
        model.generate(torch.zeros(0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="meta"):
        model(ids.to("meta"))
    with torch.device("meta"):
        shell = RetNet(model.config)
    with pytest.raises(ValueError, match="meta"):
        shell(ids)
    state = model(ids).state
    state.position = torch.tensor([-5])
    with pytest.raises(ValueError, match="position must be >= 0"):
        model(ids[:, :1], state=state)

    with pytest.raises(ValueError, match="head dim"):
        retention_parallel(*(torch.randn(1, 2, 3, 0) for _ in range(3)))
    with pytest.raises(ValueError, match="meta"):
        retention_parallel(*(torch.randn(1, 2, 3, 4, device="meta") for _ in range(3)))
    layer = MultiScaleRetention(16, 2)
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        layer.forward_parallel(x, x, x)
    for bad, message in [(torch.tensor([0.9, math.nan]), "decay values"),
                         (torch.tensor([0.9, 0.8], requires_grad=True), "must not require grad")]:
        with pytest.raises(ValueError, match=message):
            MultiScaleRetention(16, 2, decay=bad)


def test_config_fields_name_themselves_with_the_right_type() -> None:
    for field, value, kind in [("num_layers", "4", TypeError), ("value_factor", "2", TypeError),
                               ("bias", 1, TypeError), ("ffn", 3, TypeError),
                               ("value_factor", math.inf, ValueError), ("dropout", math.nan, ValueError)]:
        with pytest.raises(kind, match=field):
            RetNetConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN is not a valid JSON number"):
        RetNetConfig.from_json_text(json.dumps({"dropout": 0.1}).replace("0.1", "NaN"))


def test_config_sizes_that_overflow_or_never_finish_are_refused_at_once_by_name(tmp_path: Path) -> None:
    import time

    start = time.monotonic()
    for field, value in [("value_factor", 1e308), ("value_factor", 1e12), ("d_model", 2**40),
                         ("num_layers", 100_000_000), ("vocab_size", 2**40), ("ffn_dim", 2**40),
                         ("chunk_size", 2**62)]:
        with pytest.raises(ValueError, match=field):
            RetNetConfig(**{field: value})
    assert time.monotonic() - start < 5  # refused, not built
    model_dir = tmp_path / "model"
    RetNet(RetNetConfig(vocab_size=32, d_model=16, num_heads=2, num_layers=1, ffn_dim=32)).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    for field, value in [("value_factor", 1e308), ("num_layers", 100_000_000), ("d_model", 2**40)]:
        (model_dir / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=rf"config\.json is not a valid RetNetConfig: {field}"):
            RetNet.from_pretrained(model_dir)


def test_deeply_nested_json_files_are_named_not_a_recursion_error(tmp_path: Path) -> None:
    from yet_another_retnet.models.quantized import read_quantization
    from yet_another_retnet.models.shards import load_json

    nested = "[" * 200_000 + "]" * 200_000
    model_dir = tmp_path / "model"
    RetNet(RetNetConfig(vocab_size=32, d_model=16, num_heads=2, num_layers=1, ffn_dim=32)).save_pretrained(model_dir)
    (model_dir / "config.json").write_text(nested)
    with pytest.raises(ValueError, match=r"config\.json.*nested too deeply"):
        RetNet.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="nested too deeply"):
        RetNetConfig.from_json_text(nested)
    (tmp_path / "index.json").write_text(nested)
    with pytest.raises(ValueError, match=r"index\.json is not valid JSON: nested too deeply"):
        load_json(tmp_path / "index.json")
    (tmp_path / "quantization.json").write_text(nested)
    with pytest.raises(ValueError, match=r"quantization\.json.*nested too deeply"):
        read_quantization(tmp_path)
