"""``retnet prepare``: tokenize a corpus once into memory-mapped token shards.

Sources: text files (one document per file), directories of them, ``.jsonl`` (one document per
line, its ``text`` field or ``--field``), ``.parquet`` (one per row), a Hugging Face ``datasets``
directory saved with ``save_to_disk`` (one per row), or ``hf:NAME`` for a hub dataset streamed
over the network. The output layout is described in :mod:`.shards`.

How it stays correct at scale:

- The sources are cut into units of a few MiB (at line boundaries) that worker processes
  tokenize independently; the main process writes their results *in unit order*, so the output
  is the same with any number of workers.
- Documents are separated by the tokenizer's end-of-document id, and the held-out split takes
  whole documents (every ``1 / val_fraction``-th one), so validation text never appears in training.
- Bytes are decoded strictly (``--data-encoding``, UTF-8 by default): an undecodable byte stops
  the run with the file and byte offset instead of being replaced silently.
- Atomic: shards are written into ``DIR/.partial/`` and moved into place at the end, ``index.json``
  last. A directory without an index is incomplete; a rerun clears what it left and starts
  again. A lock keeps two runs out of one directory.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .shards import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    PreparedDataError,
    dtype_for_vocab,
    open_prepared,
    read_index,
)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
#: Bytes of text per unit of work (units end at a line boundary).
UNIT_BYTES = 4 << 20
#: Rows per unit of a parquet row group split or a datasets table.
UNIT_ROWS = 8192
#: Tokens per shard file.
SHARD_TOKENS = 1 << 30
#: Units handed to the worker processes per worker ahead of the one being written: enough to
#: keep them busy, few enough that results waiting for their turn stay a bounded amount of memory.
IN_FLIGHT_PER_WORKER = 2
#: Tokens copied per step when the validation split is cut from the tail of the training one.
COPY_TOKENS = 1 << 20
PARTIAL = ".partial"
LOCK_NAME = ".prepare.lock"
TOKENIZER_FILE = "tokenizer.json"


class PrepareError(ValueError):
    """Bad input to ``retnet prepare``: reported in one line, nothing left half-written."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: bytes ``[start, end)`` of a text or jsonl file, or rows of a table."""

    source: int  # index of the source file
    kind: str  # "text", "jsonl", "parquet", "hf"
    path: str
    start: int
    end: int
    last: bool  # text: the piece that ends its file's document


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


# --------------------------------------------------------------------------------------------
# Sources and units
# --------------------------------------------------------------------------------------------


@dataclass
class Source:
    argument: str  # as the user gave it (for messages)
    path: str  # a file, a datasets directory or a hub name
    kind: str
    size: int  # bytes (files), rows (tables)
    key: str  # stable name for the fingerprint (relative to the argument)


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in TEXT_SUFFIXES:
        return "text"
    return None


def find_sources(arguments: list[str]) -> list[Source]:
    """Expand the SRC arguments into files/datasets, sorted within each directory."""
    sources: list[Source] = []
    for arg in arguments:
        if arg.startswith("hf:"):
            sources.append(Source(arg, arg[3:], "hub", 0, arg))
            continue
        path = Path(arg)
        if not path.exists():
            raise PrepareError(f"source {arg} does not exist (a hub dataset is written hf:NAME)")
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
            sources.append(Source(arg, str(path), "hf", 0, path.name))
            continue
        if path.is_file():
            kind = _kind_of(path) or "text"  # a file named explicitly is read as text
            sources.append(Source(arg, str(path), kind, path.stat().st_size, path.name))
            continue
        found = sorted(p for p in path.rglob("*") if p.is_file() and _kind_of(p) is not None
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise PrepareError(f"source {arg} holds no text, jsonl or parquet files "
                               f"({', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)})")
        for p in found:
            sources.append(Source(arg, str(p), str(_kind_of(p)), p.stat().st_size, str(p.relative_to(path))))
    return sources


def _line_cuts(path: str, size: int, unit_bytes: int) -> list[int]:
    """Byte offsets that cut ``path`` into pieces of about ``unit_bytes``, each after a newline."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + unit_bytes < size:
            f.seek(cuts[-1] + unit_bytes)
            while True:
                block = f.read(1 << 16)
                if not block:
                    cuts.append(size)
                    return cuts
                newline = block.find(b"\n")
                if newline >= 0:
                    cuts.append(f.tell() - len(block) + newline + 1)
                    break
    if cuts[-1] != size:
        cuts.append(size)
    return cuts


def plan_units(sources: list[Source], unit_bytes: int = UNIT_BYTES) -> list[Unit]:
    units: list[Unit] = []
    for i, src in enumerate(sources):
        if src.kind in ("text", "jsonl"):
            cuts = _line_cuts(src.path, src.size, unit_bytes) if src.size else [0, 0]
            for a, b in itertools.pairwise(cuts):
                units.append(Unit(i, src.kind, src.path, a, b, b == cuts[-1]))
        elif src.kind == "parquet":
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(src.path).metadata
            except Exception as err:  # pyarrow raises its own error types on a bad file
                raise PrepareError(f"{src.path} is not a readable parquet file: {err}") from err
            for g in range(meta.num_row_groups):
                units.append(Unit(i, "parquet", src.path, g, g + 1, True))
        elif src.kind == "hf":
            rows = len(_load_dataset_dir(src.path))
            for a in range(0, rows, UNIT_ROWS):
                units.append(Unit(i, "hf", src.path, a, min(rows, a + UNIT_ROWS), True))
    return units


def _load_dataset_dir(path: str) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError("a datasets directory needs the `datasets` package: pip install datasets") from err
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise PrepareError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    return ds


# --------------------------------------------------------------------------------------------
# Tokenizing one unit (in a worker process)
# --------------------------------------------------------------------------------------------

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

        from .data import HFTokenizer

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
                ds = _WORKER[("ds", unit.path)] = _load_dataset_dir(unit.path)
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _SplitWriter:
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


def _is_val(doc: int, val_fraction: float) -> bool:
    """Every ``1 / val_fraction``-th document is held out (spread evenly, deterministic)."""
    return math.floor((doc + 1) * val_fraction) > math.floor(doc * val_fraction)


@dataclass
class PrepareResult:
    out: Path
    index: dict[str, Any]
    reused: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    #: CPU seconds spent in this process (planning, writing; with one worker, tokenizing too) and
    #: in the worker processes: where the time goes, whatever else shares the machine.
    cpu_main: float = 0.0
    cpu_workers: float = 0.0


class _Progress:
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


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrepareError(f"--out {out}: another `retnet prepare` is writing there") from None
        yield


def _ours(name: str) -> bool:
    """A file ``retnet prepare`` writes (what a rerun may delete)."""
    return (name in (INDEX_NAME, TOKENIZER_FILE, PARTIAL, LOCK_NAME)
            or (name.startswith(("train-", "val-")) and name.endswith((".bin", ".mask")))
            or name in ("train.docs.npy", "val.docs.npy")
            or (name.startswith(f".{INDEX_NAME}.") and name.endswith(".tmp")))


def _tokenizer_identity(path: str | None) -> dict[str, Any]:
    from .data import EOD_TOKENS, ByteTokenizer, HFTokenizer

    if path is None:
        tok = ByteTokenizer(end_of_document=True)
        return {"type": "byte", "vocab_size": tok.vocab_size, "eod_id": tok.eod_id, "sha256": "byte"}
    hf = HFTokenizer(path)
    if hf.eod_id is None:
        # Documents are separated by this id alone: without one they would run together silently,
        # and no option names another token to use instead.
        raise PrepareError(f"--tokenizer {path} has no end-of-document token (none of {', '.join(EOD_TOKENS)}), "
                           f"so documents would run into each other; add one of them to the tokenizer")
    return {"type": "hf", "vocab_size": hf.vocab_size, "eod_id": hf.eod_id, "file": TOKENIZER_FILE,
            "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def _stat_key(sources: list[Source]) -> list[list[Any]]:
    key: list[list[Any]] = []
    for s in sources:
        if s.kind == "hub":
            key.append([s.path, None, None])
        else:
            st = os.stat(s.path)
            key.append([os.path.abspath(s.path), st.st_size, st.st_mtime_ns])
    return key


@dataclass
class _Plan:
    """What a preparation is made of, checked: its sources, tokenizer and settings, and the
    sources' size and modification time (what a later run compares to reuse the output)."""

    found: list[Source]
    identity: dict[str, Any]
    settings: dict[str, Any]
    stat_key: list[list[Any]]


def _plan(sources: list[str], out: Path, tokenizer: str | None, field_name: str, val_fraction: float,
          encoding: str, dtype: str | None, shard_tokens: int, sft: bool) -> _Plan:
    """The checked arguments of :func:`prepare` (:class:`PrepareError` naming the bad one)."""
    if not sources:
        raise PrepareError("give at least one source")
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if dtype is not None and dtype not in DTYPES:
        raise PrepareError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_tokens < 1:
        raise PrepareError(f"shard_tokens must be >= 1, got {shard_tokens}")
    try:
        "".encode(encoding)
    except LookupError:
        raise PrepareError(f"--data-encoding: unknown encoding {encoding!r}") from None
    if not _cuts_at_newlines(encoding):
        raise PrepareError(f"--data-encoding {encoding}: a newline is not the single byte 0x0A in it (as in "
                           f"UTF-16 and UTF-32), so the files cannot be cut at lines; convert them to UTF-8 first "
                           f"(e.g. iconv -f {encoding} -t UTF-8)")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} exists and is not a directory")
    found = find_sources(sources)
    identity = _tokenizer_identity(tokenizer)
    vocab = int(identity["vocab_size"])
    chosen = dtype or dtype_for_vocab(vocab)
    if vocab > np.iinfo(DTYPES[chosen].type).max + 1:
        raise PrepareError(f"--dtype {chosen}: the tokenizer has {vocab:,} ids, more than {chosen} holds; "
                           f"use uint32")
    settings = {"field": field_name, "val_fraction": val_fraction, "encoding": encoding, "dtype": chosen,
                "shard_tokens": shard_tokens, "sft": sft}
    return _Plan(found, identity, settings, _stat_key(found))


def _cuts_at_newlines(encoding: str) -> bool:
    """Whether text in ``encoding`` may be cut into units at ``b"\\n"`` bytes and each unit decoded
    on its own: a newline must be that one byte, as in UTF-8, Latin-1 and the other ASCII-based
    encodings (a byte-order mark at the start of a file, as in utf-8-sig, is fine). In UTF-16 and
    UTF-32 a 0x0A byte can be half of another character, and a unit after the first would lose the
    file's byte-order mark."""
    try:
        encoder = codecs.getincrementalencoder(encoding)()
        encoder.encode("a\n")  # a byte-order mark, if the encoding writes one, comes out here
        return bool(encoder.encode("a\n") == b"a\n")
    except (LookupError, TypeError, ValueError):
        return False


def _same_preparation(out: Path, plan: _Plan) -> dict[str, Any] | None:
    """The index in ``out`` if it records this very preparation (same sources, unchanged on disk,
    same settings and tokenizer), else ``None``; says nothing of whether its files are whole."""
    if not (out / INDEX_NAME).is_file() or any(s.kind == "hub" for s in plan.found):
        return None  # a hub dataset may change under the same name: never the same
    try:
        old = read_index(out)
    except ValueError:
        return None
    if (old.get("settings") != plan.settings or old.get("source_stat") != plan.stat_key
            or old.get("tokenizer") != plan.identity):
        return None
    return old


def _whole(out: Path, plan: _Plan) -> bool:
    """Whether the preparation in ``out`` opens as a reader would open it, with the tokenizer copy
    it records. Checked before reusing it: reusing a damaged one would answer "nothing to do"
    while every reader refuses it and says to run `retnet prepare` again."""
    try:
        open_prepared(out)
        if plan.identity["type"] == "hf":
            copy = out / TOKENIZER_FILE
            return hashlib.sha256(copy.read_bytes()).hexdigest() == plan.identity["sha256"]
    except (PreparedDataError, OSError):
        return False
    return True


def would_reuse(
    sources: list[str],
    out: str | Path,
    tokenizer: str | None = None,
    field_name: str = "text",
    val_fraction: float = 0.05,
    encoding: str = "utf-8",
    dtype: str | None = None,
    shard_tokens: int = SHARD_TOKENS,
    sft: bool = False,
) -> bool:
    """Whether :func:`prepare` with these arguments would reuse ``out`` as it is; writes nothing.

    ``retnet train`` asks this before it prepares a text path into a run directory: data that
    would be replaced is prepared beside it instead, so a run refused afterwards (``--resume``
    with edited data) still has its own. Raises :class:`PrepareError` for bad arguments."""
    out = Path(out)
    plan = _plan(sources, out, tokenizer, field_name, val_fraction, encoding, dtype, shard_tokens, sft)
    return _same_preparation(out, plan) is not None and _whole(out, plan)


def prepare(
    sources: list[str],
    out: str | Path,
    tokenizer: str | None = None,
    field_name: str = "text",
    val_fraction: float = 0.05,
    workers: int = 1,
    encoding: str = "utf-8",
    dtype: str | None = None,
    shard_tokens: int = SHARD_TOKENS,
    overwrite: bool = False,
    progress: TextIO | None = None,
    unit_bytes: int = UNIT_BYTES,
    sft: bool = False,
) -> PrepareResult:
    """Tokenize ``sources`` into ``out`` (see the module docstring); returns the index.

    An ``out`` that already holds the same preparation (same sources, unchanged on disk, same
    settings), whole, is reused as it is unless ``overwrite`` asks for a fresh one; a damaged one
    is prepared again. Raises :class:`PrepareError` for bad input, leaving ``out`` as it was (or
    without an index, if an older preparation was being replaced).
    """
    started = time.perf_counter()
    cpu_before = _cpu_seconds()
    out = Path(out)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PrepareError(f"--workers must be a positive integer, got {workers!r}")
    plan = _plan(sources, out, tokenizer, field_name, val_fraction, encoding, dtype, shard_tokens, sft)
    found, identity, settings, stat_key = plan.found, plan.identity, plan.settings, plan.stat_key
    if out.is_dir():
        stray = sorted(p.name for p in out.iterdir() if not _ours(p.name))
        if stray:
            raise PrepareError(f"--out {out} holds files that are not prepared data ({', '.join(stray[:3])}); "
                               f"choose an empty or new directory")
    with _locked(out):
        if (out / INDEX_NAME).is_file() and not overwrite:  # --overwrite: always a fresh preparation
            old = _same_preparation(out, plan)
            if old is not None and _whole(out, plan):
                return PrepareResult(out, old, reused=True, seconds=time.perf_counter() - started)
            if old is None:
                raise PrepareError(f"--out {out} already holds prepared data from other sources or settings; "
                                   f"pass --overwrite to replace it, or choose another --out")
            # This very preparation, damaged (a truncated shard, a lost file): made again below.
        partial = out / PARTIAL
        shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
        partial.mkdir()
        try:
            index = _write(found, partial, tokenizer, identity, settings, workers, progress, unit_bytes)
            index["source_stat"] = stat_key
            if identity["type"] == "hf" and tokenizer is not None:
                shutil.copyfile(tokenizer, partial / TOKENIZER_FILE)
            _publish(partial, out, index)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    cpu_main, cpu_workers = (after - before for after, before in zip(_cpu_seconds(), cpu_before, strict=True))
    return PrepareResult(out, index, seconds=time.perf_counter() - started, cpu_main=cpu_main,
                         cpu_workers=cpu_workers)


def _cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and of its finished child processes."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def _results(units: list[Unit], hub: list[Source], spec: TokenizerSpec,
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


def _write(found: list[Source], partial: Path, tokenizer: str | None, identity: dict[str, Any],
           settings: dict[str, Any], workers: int, progress: TextIO | None, unit_bytes: int) -> dict[str, Any]:
    units = plan_units([s for s in found], unit_bytes)
    hub = [s for s in found if s.kind == "hub"]
    spec = TokenizerSpec(tokenizer, settings["encoding"], settings["field"], settings["sft"], settings["dtype"])
    np_dtype = DTYPES[settings["dtype"]]
    writers = {s: _SplitWriter(partial, s, np_dtype, settings["shard_tokens"], settings["sft"]) for s in ("train", "val")}
    bar = _Progress(sum(s.size for s in found if s.kind in ("text", "jsonl")), progress)
    docs = 0
    open_split: str | None = None  # the split of a document that continues into the next unit
    done_bytes = 0
    fingerprint = hashlib.sha256()
    docs_per_source: dict[int, int] = {}
    for unit, result in _results(units, hub, spec, workers):
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
                open_split = "val" if _is_val(docs, settings["val_fraction"]) else "train"
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
        _split_tail(writers, settings["val_fraction"], np_dtype)
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


def _split_tail(writers: dict[str, _SplitWriter], val_fraction: float, dtype: np.dtype) -> None:
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


def _publish(partial: Path, out: Path, index: dict[str, Any]) -> None:
    """Move the finished files into ``out``, then write the index: until that last step ``out``
    has no index and reads as incomplete."""
    from ..models.checkpoint import atomic_write

    (out / INDEX_NAME).unlink(missing_ok=True)
    for p in out.iterdir():  # an older preparation's files (its index is already gone)
        if p.name not in (PARTIAL, LOCK_NAME) and _ours(p.name):
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    """The options of ``retnet prepare`` on an argparse parser."""
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="text files, directories, .jsonl, .parquet, a datasets directory, or hf:NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and index.json")
    p.add_argument("--tokenizer", metavar="JSON", default=None,
                   help="a Hugging Face `tokenizers` JSON file (default: UTF-8 bytes plus an end-of-document id 256)")
    p.add_argument("--field", default="text", help="the jsonl field / parquet or dataset column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="share of documents held out for validation (default: 0.05)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), metavar="N",
                   help="tokenizing processes (default: the CPU count, at most 8)")
    p.add_argument("--data-encoding", default="utf-8", metavar="NAME",
                   help="the sources' text encoding; undecodable bytes are an error (default: utf-8)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="shard dtype (default: uint16 when the vocabulary fits)")
    p.add_argument("--sft", action="store_true",
                   help="supervised fine-tuning: jsonl rows with 'prompt' and 'completion'; only completions are scored")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data from other sources or settings")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: Any) -> int:
    """``retnet prepare`` from parsed arguments."""
    result = prepare(args.sources, args.out, tokenizer=args.tokenizer, field_name=args.field,
                     val_fraction=args.val_fraction, workers=args.workers, encoding=args.data_encoding,
                     dtype=args.dtype, overwrite=args.overwrite, progress=None if args.quiet else sys.stderr,
                     sft=args.sft)
    index = result.index
    splits = index["splits"]
    if result.reused:
        print(f"{result.out}: already prepared from these sources with these settings; nothing to do")
    print(f"{result.out}: {index['documents']:,} documents, {index['text_bytes'] / 1e6:,.1f} MB of text -> "
          f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens ({index['dtype']}, "
          f"tokenizer {index['tokenizer']['type']}, vocabulary {index['tokenizer']['vocab_size']:,})"
          + ("" if result.reused else f" in {result.seconds:.1f} s"))
    if not result.reused:
        print(f"cpu: {result.cpu_main:.2f} s in the main process, {result.cpu_workers:.2f} s in worker processes")
    return 0
