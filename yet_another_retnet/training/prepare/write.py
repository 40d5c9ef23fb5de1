"""Writing: the units' tokens into train and validation shards (whole documents to each split),
the tail split for corpora of too few documents, and the publishing of a finished preparation."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..shards import DTYPES, FORMAT, FORMAT_VERSION, INDEX_NAME
from .common import LOCK_NAME, PARTIAL, PrepareError, ours
from .encode import TokenizerSpec, results
from .sources import Source, plan_units

#: Tokens per shard file.
SHARD_TOKENS = 1 << 30
#: Tokens copied per step when the validation split is cut from the tail of the training one.
COPY_TOKENS = 1 << 20


class SplitWriter:
    """Appends tokens to one split's shard files (rolling over every ``shard_tokens``)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, masks: bool = False) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.masks = masks
        self._mask_file: Any = None
        self.shards: list[dict[str, Any]] = []
        self.doc_starts: list[int] = []
        self.tokens = 0
        self.text_bytes = 0
        self._file: Any = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")  # noqa: SIM115 (closed in _close)
        self.shards.append({"file": name, "tokens": 0})
        if self.masks:
            mask_name = name.removesuffix(".bin") + ".mask"
            self._mask_file = open(self.directory / mask_name, "wb")  # noqa: SIM115 (closed in _close)
            self.shards[-1]["mask_file"] = mask_name
        self._in_shard = 0

    def _close(self) -> None:
        for f in (self._file, self._mask_file):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._file = self._mask_file = None

    def write(self, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._close()
                self._open()
            take = min(len(ids), self.shard_tokens - self._in_shard)
            self._file.write(np.ascontiguousarray(ids[:take], dtype=self.dtype).data)
            if self._mask_file is not None and mask is not None:
                self._mask_file.write(np.ascontiguousarray(mask[:take], dtype=np.uint8).data)
                mask = mask[take:]
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            self.tokens += take
            ids = ids[take:]

    def finish(self) -> None:
        self._close()


def is_val(doc: int, val_fraction: float) -> bool:
    """Every ``1 / val_fraction``-th document is held out (spread evenly, deterministic)."""
    return math.floor((doc + 1) * val_fraction) > math.floor(doc * val_fraction)


class Progress:
    """One status line on stderr: bytes, documents, tokens/s (redrawn on a terminal, else sparse)."""

    def __init__(self, total_bytes: int, stream: TextIO | None, every: float = 0.5) -> None:
        self.total = total_bytes
        self.stream = stream
        self.every = every if stream is not None and stream.isatty() else 10.0
        self.started = time.perf_counter()
        self.last = 0.0

    def update(self, done_bytes: int, docs: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.stream is None or (not final and now - self.last < self.every):
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        total = f"/{self.total / 1e6:,.1f}" if self.total else ""
        line = (f"prepare: {done_bytes / 1e6:,.1f}{total} MB | {docs:,} documents | {tokens:,} tokens | "
                f"{tokens / elapsed / 1e6:.2f}M tokens/s | {done_bytes / elapsed / 1e6:.1f} MB/s")
        if self.stream.isatty():
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def write_splits(found: list[Source], partial: Path, tokenizer: str | None, identity: dict[str, Any],
           settings: dict[str, Any], workers: int, progress: TextIO | None, unit_bytes: int) -> dict[str, Any]:
    units = plan_units([s for s in found], unit_bytes)
    hub = [s for s in found if s.kind == "hub"]
    spec = TokenizerSpec(tokenizer, settings["encoding"], settings["field"], settings["sft"], settings["dtype"])
    np_dtype = DTYPES[settings["dtype"]]
    writers = {s: SplitWriter(partial, s, np_dtype, settings["shard_tokens"], settings["sft"]) for s in ("train", "val")}
    bar = Progress(sum(s.size for s in found if s.kind in ("text", "jsonl")), progress)
    docs = 0
    open_split: str | None = None  # the split of a document that continues into the next unit
    done_bytes = 0
    fingerprint = hashlib.sha256()
    docs_per_source: dict[int, int] = {}
    for unit, result in results(units, hub, spec, workers):
        key = found[unit.source].key if unit is not None else "hub"
        fingerprint.update(f"{key}\0{unit.start if unit else 0}\0{result.digest}\n".encode())
        # Which split each piece goes to (0: none, an empty document), in one pass over small
        # ints; the tokens then move with one gather and one write per split.
        piece_tokens = result.piece_tokens.tolist()
        piece_bytes = result.piece_bytes.tolist()
        piece_ends = result.piece_ends.tolist()
        labels = [0] * len(piece_tokens)
        written = {"train": writers["train"].tokens, "val": writers["val"].tokens}
        for i, (n, nbytes, ends) in enumerate(zip(piece_tokens, piece_bytes, piece_ends, strict=True)):
            if open_split is None:
                if n == 0 or (ends and nbytes == 0):
                    continue  # an empty document: nothing to learn from
                open_split = "val" if is_val(docs, settings["val_fraction"]) else "train"
                writers[open_split].doc_starts.append(written[open_split])
                docs += 1
                if unit is not None:
                    docs_per_source[unit.source] = docs_per_source.get(unit.source, 0) + 1
            labels[i] = 1 if open_split == "train" else 2
            written[open_split] += n
            writers[open_split].text_bytes += nbytes
            if ends:
                open_split = None
        piece_labels = np.asarray(labels, dtype=np.int8)
        for label, split in ((1, "train"), (2, "val")):
            chosen = piece_labels == label
            if not chosen.any():
                continue
            if chosen.all():
                writers[split].write(result.tokens, result.mask)
                continue
            take = np.repeat(chosen, result.piece_tokens)
            writers[split].write(result.tokens[take], None if result.mask is None else result.mask[take])
        done_bytes += result.raw_bytes
        bar.update(done_bytes, docs, writers["train"].tokens + writers["val"].tokens)
    for w in writers.values():
        w.finish()
    bar.update(done_bytes, docs, writers["train"].tokens + writers["val"].tokens, final=True)
    arguments = {s.argument for s in found}
    for arg in sorted(arguments):
        indices = [i for i, s in enumerate(found) if s.argument == arg]
        if found[indices[0]].kind != "hub" and not any(docs_per_source.get(i) for i in indices):
            raise PrepareError(f"source {arg} holds no text (empty)")
    total = writers["train"].tokens + writers["val"].tokens
    if total < 4:
        raise PrepareError(f"the sources hold {total} tokens: too few to train on")
    if not writers["val"].doc_starts or not writers["train"].doc_starts:
        if settings["sft"]:
            raise PrepareError(f"--sft: {docs} examples, too few to hold out whole ones for validation; "
                               f"add examples or raise --val-fraction")
        split_tail(writers, settings["val_fraction"], np_dtype)
    index: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "dtype": settings["dtype"], "tokenizer": identity,
        "settings": settings, "documents": docs, "text_bytes": done_bytes,
        "sources": [{"name": s.key, "argument": s.argument, "kind": s.kind, "size": s.size} for s in found],
        "source_fingerprint": fingerprint.hexdigest(), "splits": {},
    }
    for split, w in writers.items():
        docs_name = f"{split}.docs.npy"
        with open(partial / docs_name, "wb") as f:
            np.save(f, np.asarray(w.doc_starts, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
        index["splits"][split] = {"tokens": w.tokens, "documents": len(w.doc_starts), "shards": w.shards,
                                  "doc_starts": docs_name, "text_bytes": w.text_bytes}
    return index


def split_tail(writers: dict[str, SplitWriter], val_fraction: float, dtype: np.dtype) -> None:
    """Too few documents to hold whole ones out: move the last ``val_fraction`` of the tokens
    (the tail of the token stream, which may hold the last few documents) into the validation
    split instead."""
    train, val = writers["train"], writers["val"]
    if val.tokens and not train.tokens:  # everything went to val (one document): swap roles
        train, val = val, train
        writers["train"], writers["val"] = train, val
        train.split, val.split = "train", "val"
        for i, shard in enumerate(train.shards):
            new = f"train-{i:05d}.bin"
            os.replace(train.directory / shard["file"], train.directory / new)
            shard["file"] = new
    moved = max(2, int(train.tokens * val_fraction))
    if train.tokens - moved < 2:
        raise PrepareError(f"the sources hold {train.tokens + val.tokens} tokens: too few for a training "
                           f"and a validation split")
    keep = train.tokens - moved
    # Copy the tail (it may span shards) into the validation split a bounded piece at a time,
    # through memory maps (a shard may be gigabytes), then truncate the training shards to ``keep``.
    offset = 0
    for shard in train.shards:
        begin = max(keep - offset, 0)
        if begin < shard["tokens"]:
            data = np.memmap(train.directory / shard["file"], dtype=dtype, mode="r")
            for at in range(begin, shard["tokens"], COPY_TOKENS):
                val.write(data[at:at + COPY_TOKENS])
            del data  # unmapped before the file is truncated below
        offset += shard["tokens"]
    val.finish()
    offset = 0
    kept_shards = []
    for shard in train.shards:
        n = min(shard["tokens"], max(keep - offset, 0))
        path = train.directory / shard["file"]
        offset += shard["tokens"]
        if n == 0:
            path.unlink()
            continue
        os.truncate(path, n * dtype.itemsize)
        kept_shards.append({"file": shard["file"], "tokens": n})
    train.shards, train.tokens = kept_shards, keep
    share = moved / (keep + moved)
    moved_bytes = int(train.text_bytes * share)
    train.text_bytes -= moved_bytes
    # The validation split starts at 0 (a document, or the rest of the one cut at ``keep``), and
    # the documents that start inside the moved tail start there too: its resets must see them.
    val.doc_starts = [0] + [s - keep for s in train.doc_starts if s > keep]
    train.doc_starts = [s for s in train.doc_starts if s < keep]
    val.text_bytes = moved_bytes


def publish(partial: Path, out: Path, index: dict[str, Any]) -> None:
    """Move the finished files into ``out``, then write the index: until that last step ``out``
    has no index and reads as incomplete."""
    from ...models.checkpoint import atomic_write

    (out / INDEX_NAME).unlink(missing_ok=True)
    for p in out.iterdir():  # an older preparation's files (its index is already gone)
        if p.name not in (PARTIAL, LOCK_NAME) and ours(p.name):
            p.unlink()
    for p in sorted(partial.iterdir()):
        os.replace(p, out / p.name)
    partial.rmdir()
    dir_fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    text = json.dumps(index, indent=1) + "\n"
    atomic_write(out / INDEX_NAME, lambda tmp: tmp.write_text(text))
