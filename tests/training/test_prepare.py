"""``retnet prepare`` and prepared data: the same shards with any number of workers, documents
held out whole, bad input refused in one line with nothing half-written, damaged shards caught."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from yet_another_retnet.cli import main
from yet_another_retnet.training.data import default_corpus_text
from yet_another_retnet.training.prepare import PrepareError, prepare
from yet_another_retnet.training.progress import read_metrics
from yet_another_retnet.training.shards import PreparedDataError, open_prepared
from yet_another_retnet.training.trainer import TrainConfig, lr_factor

TINY = ["--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-dim", "64", "--device", "cpu",
        "--sample-tokens", "0", "--seq-len", "16", "--batch-size", "4", "--eval-interval", "3", "--log-interval", "1"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    text = default_corpus_text()
    (root / "docs").mkdir()
    for i in range(3):
        (root / "docs" / f"{i}.txt").write_text(text[i * 7000:(i + 1) * 7000])
    with open(root / "rows.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": text[50_000 + i * 900:50_000 + (i + 1) * 900], "id": i}) + "\n")
    return root


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".bin", ".npy")}


def test_same_shards_with_any_worker_count_and_documents_held_out_whole(sources: Path, tmp_path: Path) -> None:
    srcs = [str(sources / "docs"), str(sources / "rows.jsonl")]
    one = prepare(srcs, tmp_path / "one", workers=1, unit_bytes=4096).index
    two = prepare(srcs, tmp_path / "two", workers=2, unit_bytes=4096).index
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "two")
    assert one["source_fingerprint"] == two["source_fingerprint"] and one["documents"] == 43
    data = open_prepared(tmp_path / "one")
    assert data.index["dtype"] == "uint16" and data.eod_id == 256
    # Every document is its UTF-8 bytes then the end-of-document id, whichever split holds it.
    texts = [(sources / "docs" / f"{i}.txt").read_bytes() for i in range(3)]
    texts += [json.loads(line)["text"].encode() for line in (sources / "rows.jsonl").read_text().splitlines()]
    val_docs = [i for i in range(43) if math.floor((i + 1) * 0.05) > math.floor(i * 0.05)]
    assert len(data.val.doc_starts) == len(val_docs) == 2
    for split, ids in (("train", [i for i in range(43) if i not in val_docs]), ("val", val_docs)):
        stream = getattr(data, split)
        expected = np.concatenate([[*texts[i], 256] for i in ids])
        assert np.array_equal(stream.read(0, len(stream)), expected)
        starts = np.cumsum([0] + [len(texts[i]) + 1 for i in ids[:-1]])
        assert np.array_equal(np.asarray(stream.doc_starts), starts)
    # Windows and their document starts.
    window = data.train.windows(torch.tensor([0]), 10)
    assert window.dtype == torch.long and window.shape == (1, 10)
    resets = data.train.resets(torch.tensor([len(texts[0]) - 2]), 5)  # ..., last byte, end id, next document
    assert resets.tolist() == [[False, False, False, True, False]]
    # Unchanged sources and settings: reused, not redone; other settings: refused without --overwrite.
    assert prepare(srcs, tmp_path / "one").reused
    with pytest.raises(PrepareError, match="already holds prepared data"):
        prepare(srcs, tmp_path / "one", val_fraction=0.1)


def test_bpe_tokenizer_and_dtype_that_does_not_fit(sources: Path, tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    small = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1, "the": 2}, unk_token="[UNK]"))
    small.pre_tokenizer = pre_tokenizers.Whitespace()
    small.save(str(tmp_path / "small.json"))
    index = prepare([str(sources / "rows.jsonl")], tmp_path / "small", tokenizer=str(tmp_path / "small.json")).index
    assert index["tokenizer"]["eod_id"] == 1 and (tmp_path / "small" / "tokenizer.json").is_file()
    big = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000},
                                                unk_token="[UNK]"))
    big.save(str(tmp_path / "big.json"))
    with pytest.raises(PrepareError, match="more than uint16 holds"):
        prepare([str(sources / "rows.jsonl")], tmp_path / "big", tokenizer=str(tmp_path / "big.json"), dtype="uint16")
    assert not (tmp_path / "big" / "index.json").exists()
    auto = prepare([str(sources / "rows.jsonl")], tmp_path / "big32", tokenizer=str(tmp_path / "big.json")).index
    assert auto["dtype"] == "uint32"


@pytest.mark.parametrize("case", ["empty", "binary", "not-json", "no-field", "bad-utf8"])
def test_bad_sources_fail_in_one_line_and_leave_nothing(tmp_path: Path, case: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    good = default_corpus_text()[:3000]
    if case == "empty":
        src, expected = tmp_path / "empty.txt", "holds no text"
        src.write_text("")
    elif case == "binary":
        src, expected = tmp_path / "blob.txt", "looks binary (a NUL byte at offset 7)"
        src.write_bytes(b"PK\x03\x04abc\x00\x01\x02" * 10)
    elif case == "not-json":
        src, expected = tmp_path / "rows.jsonl", "the line at byte offset"
        line = json.dumps({"text": good}) + "\n"
        src.write_text(line + "{not json\n")
    elif case == "no-field":
        src, expected = tmp_path / "rows.jsonl", "has no string field 'text'"
        src.write_text(json.dumps({"body": good}) + "\n")
    else:
        src, expected = tmp_path / "latin.txt", "bytes at offset 8 are not valid utf-8"  # after "café na"
        src.write_bytes("caf\u00e9 ".encode() + "na\u00efve".encode("latin-1"))
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and str(src.name) in err[0], err
    assert not any(p.suffix in (".bin", ".npy", ".json") for p in out.rglob("*")), list(out.rglob("*"))
    if case == "bad-utf8":  # named, the encoding is accepted
        assert main(["prepare", str(src), "--out", str(out), "--quiet", "--data-encoding", "latin-1",
                     "--val-fraction", "0.3"]) == 0


def test_interrupted_and_damaged_directories(sources: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    prepare([str(sources / "docs")], out)
    # A run killed before its index: shards without an index read as incomplete, and a rerun
    # clears them (and the half-written temporary directory) and finishes.
    (out / "index.json").unlink()
    (out / ".partial").mkdir()
    (out / ".partial" / "train-00000.bin").write_bytes(b"junk")
    with pytest.raises(PreparedDataError, match="incomplete"):
        open_prepared(out)
    assert not prepare([str(sources / "docs")], out).reused
    assert not (out / ".partial").exists()
    data = open_prepared(out)
    assert len(data.train) > 0
    # A truncated shard: one clear error naming it, from the API and from `retnet train`.
    shard = out / "train-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(PreparedDataError, match=r"shard train-00000.bin has .* bytes, expected"):
        open_prepared(out)
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 2
    assert "train-00000.bin" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_refuses_another_tokenizer_than_the_data_was_prepared_with(sources: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "other.json"))
    prepare([str(sources / "docs")], tmp_path / "p")
    assert main(["train", "--data", str(tmp_path / "p"), "--tokenizer", str(tmp_path / "other.json"),
                 "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 2
    assert "differs from the byte tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_reset_run_on_prepared_data_resumes_bitwise(sources: Path, tmp_path: Path) -> None:
    prepare([str(sources / "docs"), str(sources / "rows.jsonl")], tmp_path / "p")
    common = ["--data", str(tmp_path / "p"), *TINY, "--max-steps", "6", "--doc-boundaries", "reset",
              "--schedule", "cosine", "--dropout", "0.1"]
    assert main(["train", "--out", str(tmp_path / "straight"), *common]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), *common, "--stop-after", "4"]) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("kind,step,") and "peak_rss_mib" in rows[0] and "model_tflops_per_s" in rows[0]


def test_schedules() -> None:
    base = dict(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    linear, cosine = TrainConfig(**base), TrainConfig(**base, schedule="cosine")
    wsd = TrainConfig(**base, schedule="wsd", decay_fraction=0.2)
    for c in (linear, cosine, wsd):
        assert lr_factor(0, c) == pytest.approx(0.1) and lr_factor(9, c) == pytest.approx(1.0)
        assert lr_factor(100, c) == pytest.approx(0.1)
    assert lr_factor(55, linear) == pytest.approx(0.55)
    assert lr_factor(55, cosine) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(79, wsd) == 1.0 and lr_factor(90, wsd) == pytest.approx(0.55)


def test_sft_scores_only_the_completions(tmp_path: Path) -> None:
    rows = [{"prompt": f"Q{i}: what is {i}+{i}? ", "completion": f"{2 * i}."} for i in range(60)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare([str(src)], tmp_path / "p", sft=True)
    data = open_prepared(tmp_path / "p")
    assert data.train.has_loss_mask and len(data.train.doc_starts) == 57
    first = rows[0]["prompt"].encode(), rows[0]["completion"].encode()
    n = len(first[0]) + len(first[1]) + 1
    assert data.train.read(0, n).tolist() == [*first[0], *first[1], 256]
    scored = data.train.loss_masks(torch.tensor([0]), n)[0].tolist()
    assert scored == [False] * len(first[0]) + [True] * (len(first[1]) + 1)
    # The loss is the mean over the scored targets only (the completion and its end id).
    from yet_another_retnet.training.trainer import lm_loss

    torch.manual_seed(0)
    from yet_another_retnet import RetNet, RetNetConfig

    model = RetNet(RetNetConfig(vocab_size=257, d_model=32, num_layers=1, num_heads=2, ffn_dim=64, dropout=0.0))
    window = data.train.windows(torch.tensor([0]), n)
    mask = data.train.loss_masks(torch.tensor([0]), n)
    logits = model(window[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits[0, len(first[0]) - 1:], window[0, len(first[0]):])
    assert lm_loss(model, window, None, None, mask).item() == pytest.approx(expected.item(), rel=1e-6)
    assert main(["train", "--data", str(tmp_path / "p"), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2",
                 "--eval-interval", "2"]) == 0
    with pytest.raises(PrepareError, match="no string field 'completion'"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "x"}) + "\n")
        prepare([str(bad)], tmp_path / "bad", sft=True)


def test_tensorboard_and_wandb_offline(sources: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(["train", "--data", str(sources / "docs"), "--out", str(out), *TINY, "--max-steps", "3",
                 "--log-to", "tensorboard,wandb"]) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 3 and losses == pytest.approx([r["loss"] for r in read_metrics(out) if r["kind"] == "train"])
    assert "eval/val_loss" in events.Tags()["scalars"]
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run written"
