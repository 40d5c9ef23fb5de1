"""The corpus of a training run: read, tokenized and split, or prepared shards read through
memory maps (:func:`load_data`)."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import distributed as dist_utils
from .config import PREPARED_DIR, TrainConfig, TrainingError
from .data import (
    HF_TOKENIZER_FILE,
    ByteTokenizer,
    HFTokenizer,
    TokenSource,
    default_corpus_text,
    encode_corpus,
    read_text_files,
    split_tokens,
)
from .shards import PreparedData, TensorStream, is_prepared, open_prepared


@dataclass
class Corpus:
    train: TokenSource
    val: TokenSource
    bytes_per_token: float  # of the validation text, to turn nats/token into bits/byte
    sha256: str
    description: str
    prepared: bool = False
    staged: Path | None = None  # prepared beside --out, moved into it when the run starts


def build_tokenizer(spec: str | None) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec is None else HFTokenizer(spec)


def load_corpus(data: str | None, tokenizer: ByteTokenizer | HFTokenizer, seq_len: int,
                val_fraction: float) -> Corpus:
    """Read, tokenize and split the corpus; ``TrainingError`` if it cannot make one sequence."""
    try:
        text = default_corpus_text() if data is None else read_text_files(data)
    except (FileNotFoundError, ValueError) as err:
        raise TrainingError(str(err)) from err
    tokens = encode_corpus(text, tokenizer)
    where = "the default corpus" if data is None else f"data path {data}"
    if len(tokens) < 2 * (seq_len + 1):
        raise TrainingError(
            f"{where} has {len(tokens)} tokens, too few for a training and a validation sequence of "
            f"seq_len {seq_len} (need at least {2 * (seq_len + 1)}); lower --seq-len or add text"
        )
    train, val = split_tokens(tokens, val_fraction)
    val_bytes = len(tokenizer.decode(val).encode("utf-8"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    description = f"{where}: {len(text.encode('utf-8')):,} bytes, {len(train):,} train / {len(val):,} val tokens"
    return _checked_corpus(Corpus(TensorStream(train), TensorStream(val), val_bytes / len(val), digest, description),
                           where, seq_len)


def _checked_corpus(corpus: Corpus, where: str, seq_len: int) -> Corpus:
    train, val = corpus.train, corpus.val
    if len(val) < 2:
        raise TrainingError(f"{where}: the validation split is empty; raise --val-fraction")
    if len(train) < seq_len + 1:
        raise TrainingError(
            f"{where}: the training split has {len(train)} tokens, fewer than one sequence of {seq_len + 1}"
        )
    return corpus


def load_data(config: TrainConfig, info: dist_utils.DistInfo | None = None) -> tuple[Corpus, ByteTokenizer | HFTokenizer]:
    """The run's corpus and tokenizer.

    No ``--data``: the embedded corpus as one in-memory byte stream (the default run, as ever).
    A directory written by ``retnet prepare``: its shards through memory maps, and the tokenizer
    it was prepared with. A text file or directory: prepared first (by rank 0 under torchrun) by
    the same code, reusing ``<out>/data`` when that already holds it whole (the same text,
    unchanged, the same settings), else into a staging directory beside ``--out`` that the run
    moves into place once every check has passed (:func:`adopt_staged_data`); a failed check
    removes it. ``<out>/data`` itself is never rewritten here: a ``--resume`` refused later (the
    text was edited, another tokenizer) must find the run's data as it was.
    """
    info = info or dist_utils.DistInfo()
    if config.data is None:
        tokenizer = build_tokenizer(config.tokenizer)
        return load_corpus(None, tokenizer, config.seq_len, config.val_fraction), tokenizer
    source = Path(config.data)
    directory = source
    staged = None
    if not is_prepared(source):
        if not source.exists():
            raise TrainingError(f"data path {source} does not exist")
        out = Path(config.out)
        directory = out / PREPARED_DIR
        if not _reusable(config, directory):
            directory = staged = out.parent / f".{out.name}.{PREPARED_DIR}-staged"
        if info.is_main:
            _prepare_on_the_fly(config, directory, staged is not None)
        dist_utils.barrier(info)
    try:
        try:
            data = open_prepared(directory)
        except ValueError as err:
            raise TrainingError(str(err)) from err
        tokenizer = _prepared_tokenizer(data, config.tokenizer if directory is source else None)
        if directory is not source and config.tokenizer is not None:
            # Prepared here from the user's file: keep reading that (the staged copy will move).
            tokenizer = HFTokenizer(config.tokenizer)
        where = f"data path {config.data}"
        index = data.index
        val_bytes = data.split_bytes("val")
        fingerprint = f"{index['source_fingerprint']}:{index['tokenizer'].get('sha256')}"
        description = (f"{where}: {index['text_bytes']:,} bytes in {index['documents']:,} documents, "
                       f"{len(data.train):,} train / {len(data.val):,} val tokens (memory-mapped {index['dtype']} shards)")
        corpus = Corpus(data.train, data.val, max(val_bytes, 1) / max(len(data.val), 1), fingerprint, description,
                        prepared=True, staged=staged)
        if len(data.train) + len(data.val) < 2 * (config.seq_len + 1):
            raise TrainingError(
                f"{where} has {len(data.train) + len(data.val)} tokens, too few for a training and a validation "
                f"sequence of seq_len {config.seq_len} (need at least {2 * (config.seq_len + 1)}); lower --seq-len or add text")
        return _checked_corpus(corpus, where, config.seq_len), tokenizer
    except BaseException:
        if staged is not None and info.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        raise


def discard_staged_data(corpus: Corpus, info: dist_utils.DistInfo) -> None:
    """Remove data prepared for a run that is not going to start."""
    if corpus.staged is not None and info.is_main:
        shutil.rmtree(corpus.staged, ignore_errors=True)


def adopt_staged_data(corpus: Corpus, out: Path) -> None:
    """Move data prepared beside the run directory into it (rank 0, once the run starts writing;
    the memory maps stay valid: a rename moves no data)."""
    if corpus.staged is None:
        return
    target = out / PREPARED_DIR
    if target.exists():
        shutil.rmtree(target)
    corpus.staged.replace(target)
    corpus.staged = None


def _reusable(config: TrainConfig, directory: Path) -> bool:
    """Whether ``directory`` (``<out>/data``) already holds the preparation of ``config.data``,
    whole, so that preparing reuses it and writes nothing there."""
    from .prepare import would_reuse

    if not is_prepared(directory):
        return False
    try:
        return would_reuse([str(config.data)], directory, tokenizer=config.tokenizer,
                           val_fraction=config.val_fraction, encoding=config.data_encoding)
    except ValueError as err:
        raise TrainingError(str(err)) from err


def _prepare_on_the_fly(config: TrainConfig, directory: Path, fresh: bool) -> None:
    """``retnet prepare`` of a plain text --data path into ``directory`` (nothing left on failure):
    a ``fresh`` (staging) directory is prepared anew, whatever a killed run left there; any other
    is only reused (:func:`_reusable` said it would be)."""
    from .prepare import prepare

    try:
        prepare([str(config.data)], directory, tokenizer=config.tokenizer, val_fraction=config.val_fraction,
                encoding=config.data_encoding, overwrite=fresh)
    except BaseException as err:
        if fresh:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(err, ValueError):
            raise TrainingError(str(err)) from err
        raise


def _prepared_tokenizer(data: PreparedData, requested: str | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer ``data`` was prepared with; a different ``--tokenizer`` is refused."""
    info = data.tokenizer_info
    if info.get("type") == "byte":
        tokenizer: ByteTokenizer | HFTokenizer = ByteTokenizer(end_of_document=info.get("eod_id") == 256)
        own = "the byte tokenizer"
    else:
        tokenizer = HFTokenizer(data.path / str(info.get("file", HF_TOKENIZER_FILE)))
        own = f"the tokenizer in {data.path}"
    if tokenizer.vocab_size != int(info.get("vocab_size", -1)):
        raise TrainingError(f"prepared data {data.path}: its tokenizer does not match its index")
    if requested is not None:
        digest = hashlib.sha256(Path(requested).read_bytes()).hexdigest() if Path(requested).is_file() else None
        if digest != info.get("sha256"):
            raise TrainingError(f"--tokenizer {requested} differs from {own}, which prepared {data.path}; "
                                f"drop --tokenizer or prepare the data again with it")
    return tokenizer

