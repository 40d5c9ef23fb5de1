"""A whole preparation: the arguments checked, an earlier identical one reused, the directory
locked, the shards written into ``.partial/`` and published."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from ..shards import (
    DTYPES,
    INDEX_NAME,
    PreparedDataError,
    dtype_for_vocab,
    open_prepared,
    read_index,
)
from .common import LOCK_NAME, PARTIAL, TOKENIZER_FILE, PrepareError, ours
from .sources import UNIT_BYTES, Source, find_sources
from .write import SHARD_TOKENS, publish, write_splits


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


def _tokenizer_identity(path: str | None) -> dict[str, Any]:
    from ..data import EOD_TOKENS, ByteTokenizer, HFTokenizer

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
        stray = sorted(p.name for p in out.iterdir() if not ours(p.name))
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
            index = write_splits(found, partial, tokenizer, identity, settings, workers, progress, unit_bytes)
            index["source_stat"] = stat_key
            if identity["type"] == "hf" and tokenizer is not None:
                shutil.copyfile(tokenizer, partial / TOKENIZER_FILE)
            publish(partial, out, index)
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
