"""Tokenizing: one unit of work read, decoded strictly and tokenized (in a worker process), and
the units' results in unit order from a bounded pool of workers."""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .common import PrepareError
from .sources import Source, Unit, load_dataset_dir

#: Units handed to the worker processes per worker ahead of the one being written: enough to
#: keep them busy, few enough that results waiting for their turn stay a bounded amount of memory.
IN_FLIGHT_PER_WORKER = 2


@dataclass
class UnitResult:
    """One unit's tokens, cut into pieces (a piece is a run of tokens of one document).

    Everything is a compact numpy array, already in the shard dtype: a worker process hands this
    back through a pipe and the writer only slices it, so the writer stays cheap next to the
    tokenizing workers (Python lists of ints or of small objects would cost more to move than to
    make).
    """

    tokens: np.ndarray  # (T,) shard dtype, the unit's tokens (end-of-document ids included)
    piece_tokens: np.ndarray  # (P,) int64, tokens of each piece
    piece_bytes: np.ndarray  # (P,) int64, source text bytes of each piece
    piece_ends: np.ndarray  # (P,) bool, whether a document ends with the piece
    raw_bytes: int
    digest: str
    mask: np.ndarray | None = None  # (T,) uint8 (supervised fine-tuning): 1 where a token is scored


@dataclass
class TokenizerSpec:
    """What a worker needs to rebuild the tokenizer: ``None`` for bytes, else a JSON path."""

    path: str | None
    encoding: str = "utf-8"
    field: str = "text"
    sft: bool = False  # jsonl rows of prompt and completion: only the completion is scored
    dtype: str = "uint32"  # the shard dtype: workers hand back tokens in it


_WORKER: dict[Any, Any] = {}


def _init_worker(spec: TokenizerSpec) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    _WORKER.clear()
    _WORKER["spec"] = spec
    if spec.path is None:
        _WORKER["tok"] = None
        _WORKER["eod"] = 256
    else:
        from tokenizers import Tokenizer

        from ..data import HFTokenizer

        _WORKER["tok"] = Tokenizer.from_file(spec.path)
        _WORKER["eod"] = HFTokenizer(spec.path).eod_id


def _decode(raw: bytes, unit: Unit, offset: int, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        at = unit.start + offset + err.start
        raise PrepareError(
            f"{unit.path}: bytes at offset {at} are not valid {encoding} ({err.reason}); name the "
            f"file's encoding with --data-encoding") from None


def _encode_texts(texts: list[str], raws: list[bytes] | None) -> list[np.ndarray]:
    tok = _WORKER["tok"]
    if tok is None:  # bytes: uint8 views, widened once when the unit is assembled
        if raws is not None and _WORKER["spec"].encoding.replace("_", "-").lower() in ("utf-8", "utf8"):
            return [np.frombuffer(r, dtype=np.uint8) for r in raws]
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]
    # encode_batch_fast (tokenizers >= 0.20) skips the character offsets, which nothing here reads.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [np.asarray(e.ids, dtype=np.uint32) for e in encode(texts, add_special_tokens=False)]


def encode_unit(unit: Unit) -> UnitResult:
    """Read and tokenize ``unit``: its tokens, its document pieces and a digest of what it read."""
    spec: TokenizerSpec = _WORKER["spec"]
    eod = _WORKER["eod"]
    digest = hashlib.sha256()
    texts: list[str] = []
    raws: list[bytes] | None = None
    ends: list[bool] = []
    raw_bytes = 0
    if unit.kind in ("text", "jsonl"):
        with open(unit.path, "rb") as f:
            f.seek(unit.start)
            raw = f.read(unit.end - unit.start)
        digest.update(raw)
        raw_bytes = len(raw)
        nul = raw.find(b"\x00")
        if nul >= 0 and spec.encoding.replace("_", "-").lower() in ("utf-8", "utf8", "ascii", "latin-1"):
            raise PrepareError(f"{unit.path} looks binary (a NUL byte at offset {unit.start + nul}), not text")
        if unit.kind == "text":
            texts, raws, ends = [_decode(raw, unit, 0, spec.encoding)], [raw], [unit.last]
        else:
            raws = []
            pos = 0
            for line in raw.split(b"\n"):
                here = pos
                pos += len(line) + 1
                if not line.strip():
                    continue
                decoded = _decode(line, unit, here, spec.encoding)
                try:
                    obj = json.loads(decoded)
                except ValueError as err:
                    raise PrepareError(f"{unit.path}: the line at byte offset {unit.start + here} is not JSON "
                                       f"({err.args[0] if err.args else err})") from None
                names = ("prompt", "completion") if spec.sft else (spec.field,)
                values = [obj.get(n) if isinstance(obj, dict) else None for n in names]
                for n, value in zip(names, values, strict=True):
                    if not isinstance(value, str):
                        raise PrepareError(f"{unit.path}: the line at byte offset {unit.start + here} has no string "
                                           f"field {n!r}" + ("" if spec.sft else " (choose the field with --field)"))
                    texts.append(value)
                    raws.append(value.encode("utf-8"))
                    ends.append(True)
    else:
        if spec.sft:
            raise PrepareError(f"{unit.path}: --sft reads jsonl files of prompt and completion fields")
        if unit.kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(unit.path).read_row_group(unit.start)
            if spec.field not in table.column_names:
                raise PrepareError(f"{unit.path} has no column {spec.field!r} (columns: "
                                   f"{', '.join(table.column_names)}; choose one with --field)")
            values = table.column(spec.field).to_pylist()
        else:
            ds = _WORKER.get(("ds", unit.path))
            if ds is None:
                ds = _WORKER[("ds", unit.path)] = load_dataset_dir(unit.path)
            if spec.field not in ds.column_names:
                raise PrepareError(f"{unit.path} has no column {spec.field!r} (columns: "
                                   f"{', '.join(ds.column_names)}; choose one with --field)")
            values = ds[unit.start:unit.end][spec.field]
        for row, value in enumerate(values):
            if not isinstance(value, str):
                where = f"row {row} of row group {unit.start}" if unit.kind == "parquet" else f"row {unit.start + row}"
                raise PrepareError(f"{unit.path}: {where} has no text in column {spec.field!r}")
            texts.append(value)
            ends.append(True)
        raws = [t.encode("utf-8") for t in texts]
        for r in raws:
            digest.update(len(r).to_bytes(8, "little"))
            digest.update(r)
        raw_bytes = sum(len(r) for r in raws)
    encoded = _encode_texts(texts, raws)
    nbytes = [len(r) for r in raws] if raws else [0] * len(texts)
    if spec.sft:  # pairs of (prompt, completion): one document each, the prompt not scored
        return _assemble_pairs(encoded, nbytes, eod, raw_bytes, digest.hexdigest())
    return _assemble(encoded, nbytes, ends, eod, raw_bytes, digest.hexdigest())


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    """``parts`` as one array in the shard dtype (the vocabulary was checked to fit it)."""
    dtype = np.dtype(_WORKER["spec"].dtype)
    if not parts:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(parts, dtype=dtype, casting="same_kind")


def _assemble_pairs(encoded: list[np.ndarray], text_bytes: list[int], eod: int | None, raw_bytes: int,
                    digest: str) -> UnitResult:
    parts, masks, lengths = [], [], []
    marker = [] if eod is None else [np.asarray([eod], dtype=np.uint32)]
    for prompt, completion in zip(encoded[0::2], encoded[1::2], strict=True):
        parts += [prompt, completion, *marker]
        scored = len(completion) + len(marker)
        lengths.append(len(prompt) + scored)
        masks += [np.zeros(len(prompt), np.uint8), np.ones(scored, np.uint8)]
    nbytes = np.asarray(text_bytes, dtype=np.int64)
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint8)
    return UnitResult(_concat(parts), np.asarray(lengths, dtype=np.int64), nbytes[0::2] + nbytes[1::2],
                      np.ones(len(lengths), dtype=bool), raw_bytes, digest, mask)


def _assemble(encoded: list[np.ndarray], text_bytes: list[int], ends: list[bool], eod: int | None,
              raw_bytes: int, digest: str) -> UnitResult:
    parts: list[np.ndarray] = []
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    piece_ends = np.asarray(ends, dtype=bool).reshape(-1)
    if eod is None:
        parts = encoded
    else:
        marker = np.asarray([eod], dtype=np.uint32)
        for ids, end in zip(encoded, ends, strict=True):
            parts.append(ids)
            if end:
                parts.append(marker)
        lengths += piece_ends
    return UnitResult(_concat(parts), lengths, np.asarray(text_bytes, dtype=np.int64).reshape(-1), piece_ends,
                      raw_bytes, digest)


def _stream_hub(name: str, spec: TokenizerSpec, batch: int = 1000) -> Iterator[UnitResult]:
    """A hub dataset, streamed (needs a network): results in batches of ``batch`` rows."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("hf:NAME needs the `datasets` package: pip install datasets") from err
    stream = datasets.load_dataset(name, split="train", streaming=True)
    texts: list[str] = []

    def flush() -> UnitResult:
        raws = [t.encode("utf-8") for t in texts]
        digest = hashlib.sha256(b"".join(len(r).to_bytes(8, "little") + r for r in raws)).hexdigest()
        result = _assemble(_encode_texts(texts, raws), [len(r) for r in raws], [True] * len(texts),
                           _WORKER["eod"], sum(len(r) for r in raws), digest)
        texts.clear()
        return result

    for row in stream:
        value = row.get(spec.field) if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise PrepareError(f"hf:{name}: a row has no string field {spec.field!r} (choose it with --field)")
        texts.append(value)
        if len(texts) == batch:
            yield flush()
    if texts:
        yield flush()


def results(units: list[Unit], hub: list[Source], spec: TokenizerSpec,
             workers: int) -> Iterator[tuple[Unit | None, UnitResult]]:
    """Every unit's result, in unit order (then the hub datasets' batches, unit ``None``)."""
    if workers == 1 or len(units) <= 1:
        _init_worker(spec)
        yield from ((u, encode_unit(u)) for u in units)
    else:
        yield from _pooled(units, spec, workers)
        _init_worker(spec)
    for src in hub:
        yield from ((None, r) for r in _stream_hub(src.path, spec))


def _pooled(units: list[Unit], spec: TokenizerSpec, workers: int) -> Iterator[tuple[Unit, UnitResult]]:
    """``units`` tokenized by ``workers`` processes; their results in unit order.

    Only ``IN_FLIGHT_PER_WORKER * workers`` units are handed out ahead of the one being written
    (results that finish early wait in memory for their turn), so memory does not grow with the
    corpus. A worker that dies (the out-of-memory killer, kill -9) breaks the pool and is a
    :class:`PrepareError` here, where ``multiprocessing.Pool`` would wait for its result forever.
    """
    import multiprocessing
    from concurrent.futures import Future, ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # fork where there is one: the workers run numpy and tokenizers only (never torch, whose
    # thread pools a forked child must not touch), and a spawned worker would import torch.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(spec,))
    todo = iter(units)
    pending: collections.deque[tuple[Unit, Future[UnitResult]]] = collections.deque()
    try:
        for unit in itertools.islice(todo, IN_FLIGHT_PER_WORKER * workers):
            pending.append((unit, pool.submit(encode_unit, unit)))
        while pending:
            unit, future = pending.popleft()
            result = future.result()
            for later in itertools.islice(todo, 1):  # one out, one in: the window stays the same
                pending.append((later, pool.submit(encode_unit, later)))
            yield unit, result
    except BrokenProcessPool:
        raise PrepareError(f"a tokenizing worker process died (killed by the out-of-memory killer or a signal?); "
                           f"--out is left as it was: run again, with fewer --workers (now {workers}) if memory "
                           f"was short") from None
    finally:  # on an error, the units not started are dropped: only running ones are waited for
        pool.shutdown(wait=True, cancel_futures=True)
