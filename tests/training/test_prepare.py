"""``retnet prepare`` and prepared data: the same shards with any number of workers, documents
held out whole, bad input refused in one line with nothing half-written, damaged shards caught."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL

from yet_another_retnet.cli import main
from yet_another_retnet.training.data import default_corpus_text
from yet_another_retnet.training.prepare import PrepareError, prepare
from yet_another_retnet.training.progress import read_metrics
from yet_another_retnet.training.shards import PreparedDataError, open_prepared
from yet_another_retnet.training.trainer import TrainConfig, lr_factor

TINY = [*TINY_MODEL, "--seq-len", "16", "--batch-size", "4", "--eval-interval", "3", "--log-interval", "1"]


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
    big = tokenizers.Tokenizer(models.WordLevel({f"w{i}": i for i in range(70_000)}
                                                | {"[UNK]": 70_000, "<|endoftext|>": 70_001}, unk_token="[UNK]"))
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


def test_a_rerun_repairs_a_damaged_directory_and_overwrite_never_reuses(sources: Path, tmp_path: Path) -> None:
    srcs = [str(sources / "docs")]
    out = tmp_path / "p"
    prepare(srcs, out)
    whole = shard_bytes(out)
    shard = out / "train-00000.bin"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    with pytest.raises(PreparedDataError, match="run `retnet prepare` again"):
        open_prepared(out)
    # The advice works: the same preparation, damaged, is made again rather than reused.
    assert not prepare(srcs, out).reused
    assert shard_bytes(out) == whole and len(open_prepared(out).train) > 0
    assert prepare(srcs, out).reused  # whole again: reused
    assert not prepare(srcs, out, overwrite=True).reused  # --overwrite always prepares afresh
    assert shard_bytes(out) == whole
    # `retnet train` on a text path repairs the run's prepared copy the same way.
    run = tmp_path / "run"
    assert main(["train", "--data", srcs[0], "--out", str(run), *TINY, "--max-steps", "3", "--stop-after", "2"]) == 0
    (run / "data" / "val.docs.npy").write_bytes(b"junk")
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert len(open_prepared(run / "data").val) > 0


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_encodings_whose_newline_is_not_one_byte_are_refused(tmp_path: Path, encoding: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Units are cut at b"\n" bytes: in these encodings that splits characters (or, with a
    # byte-order mark, decodes every unit after the first in the wrong byte order).
    src = tmp_path / "wide.txt"
    src.write_text(default_corpus_text()[:3000], encoding=encoding)
    out = tmp_path / "out"
    assert main(["prepare", str(src), "--out", str(out), "--quiet", "--data-encoding", encoding]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--data-encoding {encoding}" in err[0] and "UTF-8" in err[0], err
    assert not any(p.suffix in (".bin", ".npy", ".json") for p in out.rglob("*"))
    # A byte-order mark before UTF-8 is fine: it is dropped, the newlines are single bytes.
    sig = tmp_path / "sig.txt"
    sig.write_text("caf\u00e9 au lait\n" * 40, encoding="utf-8-sig")
    prepare([str(sig)], tmp_path / "sig", encoding="utf-8-sig", val_fraction=0.3, unit_bytes=64)
    data = open_prepared(tmp_path / "sig")
    assert data.train.read(0, 6).tolist() == list("caf\u00e9 ".encode())  # no BOM bytes


def test_a_tail_split_keeps_the_document_starts_it_moves(tmp_path: Path) -> None:
    # Three documents, none held out whole at --val-fraction 0.3: the last 30% of the tokens move
    # to validation, and the short last document starts inside them.
    texts = [b"a" * 100, b"b" * 100, b"c" * 10]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_bytes(text)
    prepare([str(tmp_path / f"{i}.txt") for i in range(3)], tmp_path / "p", val_fraction=0.3)
    data = open_prepared(tmp_path / "p")
    keep = 213 - int(213 * 0.3)  # 3 documents and 3 end ids; keep the first 150 tokens
    assert len(data.train) == keep and np.asarray(data.train.doc_starts).tolist() == [0, 101]
    assert np.asarray(data.val.doc_starts).tolist() == [0, 202 - keep]
    assert data.val.read(202 - keep, 11).tolist() == [*texts[2], 256]
    assert data.val.resets(torch.tensor([40]), 20)[0].nonzero().flatten().tolist() == [202 - keep - 40]


def test_a_tail_split_copies_in_bounded_pieces(tmp_path: Path) -> None:
    import tracemalloc

    from yet_another_retnet.training.prepare import write

    dtype = np.dtype("<u2")
    writers = {s: write.SplitWriter(tmp_path, s, dtype, 1 << 30) for s in ("train", "val")}
    tokens = (np.arange(8 << 20, dtype=np.int64) % 257).astype(dtype)  # one 16 MiB shard
    writers["train"].doc_starts.append(0)
    for piece in np.array_split(tokens, 16):
        writers["train"].write(piece)
    writers["train"].finish()
    tracemalloc.start()
    try:
        write.split_tail(writers, 0.5, dtype)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Not the shard, nor the tail, in memory at once: memory must not grow with the corpus.
    assert peak < tokens.nbytes // 4, peak
    keep = len(tokens) // 2
    assert np.array_equal(np.fromfile(tmp_path / "train-00000.bin", dtype=dtype), tokens[:keep])
    assert np.array_equal(np.fromfile(tmp_path / "val-00000.bin", dtype=dtype), tokens[keep:])


def _edit_index(directory: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    index = json.loads((directory / "index.json").read_text())
    edit(index)
    (directory / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("field", ["splits.train.doc_starts", "tokenizer.file", "splits.val.shards[0].file"])
def test_index_file_names_cannot_leave_the_directory(sources: Path, tmp_path: Path, field: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tok.json"))
    out = tmp_path / "p"
    prepare([str(sources / "docs")], out, tokenizer=str(tmp_path / "tok.json"))
    # Copies outside the directory that would read as valid: only the name check stops them.
    (tmp_path / "train.docs.npy").write_bytes((out / "train.docs.npy").read_bytes())
    (tmp_path / "val-00000.bin").write_bytes((out / "val-00000.bin").read_bytes())
    if field == "splits.train.doc_starts":
        _edit_index(out, lambda index: index["splits"]["train"].update(doc_starts="../train.docs.npy"))
    elif field == "tokenizer.file":
        _edit_index(out, lambda index: index["tokenizer"].update(file="../tok.json"))
    else:
        _edit_index(out, lambda index: index["splits"]["val"]["shards"][0].update(file=str(tmp_path / "val-00000.bin")))
    with pytest.raises(PreparedDataError, match=rf"index.json: field '{re.escape(field)}' must be a plain file name"):
        open_prepared(out)
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, edit", [
    ("documents", lambda index: index.pop("documents")),
    ("tokenizer", lambda index: index.pop("tokenizer")),
    ("tokenizer.vocab_size", lambda index: index["tokenizer"].update(vocab_size="257")),
    ("splits.train.tokens", lambda index: index["splits"]["train"].update(tokens="12")),
    ("splits.val.text_bytes", lambda index: index["splits"]["val"].pop("text_bytes")),
    ("splits.train.shards", lambda index: index["splits"]["train"].update(shards={"file": "x"})),
    ("splits.val.shards[0].tokens", lambda index: index["splits"]["val"]["shards"][0].update(tokens=1.5)),
    ("settings", lambda index: index.update(settings="sft")),
])
def test_a_structurally_wrong_index_is_one_clear_error(sources: Path, tmp_path: Path, field: str,
                                                       edit: Callable[[dict[str, Any]], object],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    prepare([str(sources / "docs")], out)
    _edit_index(out, edit)
    with pytest.raises(PreparedDataError, match=rf"index.json: field '{re.escape(field)}'"):
        open_prepared(out)
    capsys.readouterr()
    assert main(["train", "--data", str(out), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err


def test_a_tokenizer_without_an_end_of_document_token_is_refused(sources: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "no-eod.json"))
    with pytest.raises(PrepareError, match=r"--tokenizer .*no-eod.json has no end-of-document token"):
        prepare([str(sources / "docs")], tmp_path / "p", tokenizer=str(tmp_path / "no-eod.json"))
    assert not (tmp_path / "p" / "index.json").exists()
    capsys.readouterr()
    assert main(["train", "--data", str(sources / "docs"), "--tokenizer", str(tmp_path / "no-eod.json"),
                 "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 2
    assert "no end-of-document token" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
