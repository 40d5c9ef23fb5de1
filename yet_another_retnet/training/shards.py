"""Prepared token shards on disk, read through memory maps.

``retnet prepare`` (:mod:`.prepare`) writes a directory::

    index.json             written last: format, dtype, tokenizer identity, sources, splits
    tokenizer.json         the Hugging Face tokenizer it used (byte tokenizer: none)
    train-00000.bin ...    raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
    train.docs.npy         int64 start offset of every document in the split's token stream
    val-00000.bin ...      the held-out documents, likewise

A split's shards are one token stream; documents are separated by the tokenizer's
end-of-document id. Nothing here reads a whole shard: windows are gathered from ``np.memmap``
views, so resident memory holds only the pages a batch touches, whatever the corpus size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

INDEX_NAME = "index.json"
FORMAT = "yet-another-retnet-tokens"
FORMAT_VERSION = 1
DTYPES: dict[str, np.dtype[Any]] = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}  # little-endian on disk
SPLITS = ("train", "val")


class PreparedDataError(ValueError):
    """A prepared directory that is missing, incomplete, damaged or of the wrong kind."""


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``retnet prepare`` (it has an index)."""
    return (Path(path) / INDEX_NAME).is_file()


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest shard dtype that holds every id below ``vocab_size``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class TokenStream:
    """One split of a prepared directory: its shards as one token stream, never loaded whole.

    ``len(stream)`` is its token count; :meth:`windows` gathers rows of consecutive tokens and
    :meth:`resets` says where documents start inside them.
    """

    def __init__(self, shards: list[np.memmap], doc_starts: np.ndarray,
                 masks: list[np.memmap] | None = None) -> None:
        self._shards = shards
        self._masks = masks  # uint8 per token, 1 where it is scored (supervised fine-tuning)
        sizes = [len(s) for s in shards]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.doc_starts = doc_starts  # (documents,) int64, ascending, a memory map too

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def has_loss_mask(self) -> bool:
        return self._masks is not None

    def read(self, start: int, length: int, masks: bool = False) -> np.ndarray:
        """Tokens ``[start, start + length)`` as int64 ``(length,)`` (their loss mask, if ``masks``)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) lie outside a stream of {len(self)}")
        source = self._shards
        if masks:
            if self._masks is None:
                raise ValueError("this split has no loss mask (it was not prepared with --sft)")
            source = self._masks
        out = np.empty(length, dtype=np.int64)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        done = 0
        while done < length:
            shard = source[first]
            begin = start + done - int(self._offsets[first])
            take = min(length - done, len(shard) - begin)
            out[done:done + take] = shard[begin:begin + take]
            done += take
            first += 1
        return out

    def windows(self, starts: Tensor | np.ndarray, length: int) -> Tensor:
        """``(len(starts), length)`` long: the tokens from each start."""
        rows = [self.read(int(s), length) for s in np.asarray(starts).reshape(-1)]
        if not rows:
            return torch.empty(0, length, dtype=torch.long)
        return torch.from_numpy(np.stack(rows))

    def loss_masks(self, starts: Tensor | np.ndarray, length: int) -> Tensor:
        """``(len(starts), length)`` bool: True for tokens that are scored as targets."""
        rows = [self.read(int(s), length, masks=True) for s in np.asarray(starts).reshape(-1)]
        return torch.from_numpy(np.stack(rows).astype(bool)) if rows else torch.zeros(0, length, dtype=torch.bool)

    def resets(self, starts: Tensor | np.ndarray, length: int) -> Tensor:
        """``(len(starts), length)`` bool: True where a document starts inside a window (its
        first position is True too when a document starts exactly there)."""
        starts_np = np.asarray(starts).reshape(-1).astype(np.int64)
        mask = np.zeros((len(starts_np), length), dtype=bool)
        for row, s in enumerate(starts_np):
            lo = int(np.searchsorted(self.doc_starts, s, side="left"))
            hi = int(np.searchsorted(self.doc_starts, s + length, side="left"))
            mask[row, np.asarray(self.doc_starts[lo:hi], dtype=np.int64) - s] = True
        return torch.from_numpy(mask)


class TensorStream:
    """An in-memory token tensor with the :class:`TokenStream` interface (the embedded corpus)."""

    def __init__(self, tokens: Tensor, doc_starts: np.ndarray | None = None) -> None:
        self.tokens = tokens
        self.doc_starts = np.zeros(1, dtype=np.int64) if doc_starts is None else doc_starts

    def __len__(self) -> int:
        return len(self.tokens)

    has_loss_mask = False

    def loss_masks(self, starts: Tensor | np.ndarray, length: int) -> Tensor:
        raise ValueError("an in-memory token stream has no loss mask")

    def windows(self, starts: Tensor | np.ndarray, length: int) -> Tensor:
        s = torch.as_tensor(np.asarray(starts)).reshape(-1).long()
        return self.tokens[s[:, None] + torch.arange(length)]

    def resets(self, starts: Tensor | np.ndarray, length: int) -> Tensor:
        return TokenStream.resets(self, starts, length)  # type: ignore[arg-type]


@dataclass
class PreparedData:
    """A prepared directory, opened: its index and one :class:`TokenStream` per split."""

    path: Path
    index: dict[str, Any]
    train: TokenStream
    val: TokenStream

    @property
    def tokenizer_info(self) -> dict[str, Any]:
        return dict(self.index["tokenizer"])

    @property
    def eod_id(self) -> int | None:
        value = self.index["tokenizer"].get("eod_id")
        return None if value is None else int(value)

    def split_bytes(self, split: str) -> int:
        return int(self.index["splits"][split]["text_bytes"])


def read_index(path: str | Path) -> dict[str, Any]:
    """The validated ``index.json`` of a prepared directory; :class:`PreparedDataError` if not one.

    Every field a reader uses is checked here, by name, so that a damaged or hand-edited index is
    one clear error rather than a ``KeyError`` deep in training; and every file name in it must be
    a plain name inside the directory (the index is data from elsewhere, never a path to follow).
    """
    directory = Path(path)
    index_path = directory / INDEX_NAME
    if not directory.is_dir():
        raise PreparedDataError(f"prepared data {directory} is not a directory")
    if not index_path.is_file():
        raise PreparedDataError(
            f"prepared data {directory} has no {INDEX_NAME}: it is incomplete (an interrupted `retnet "
            f"prepare`?) or not prepared data; run `retnet prepare ... --out {directory}` again")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PreparedDataError(f"{index_path} is unreadable: {err}") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise PreparedDataError(f"{index_path} is not a yet-another-retnet token index")
    if index.get("version") != FORMAT_VERSION:
        raise PreparedDataError(f"{index_path}: format version {index.get('version')!r}, expected {FORMAT_VERSION}")
    if index.get("dtype") not in DTYPES:
        raise PreparedDataError(f"{index_path}: unknown dtype {index.get('dtype')!r}")
    splits = index.get("splits")
    if not isinstance(splits, dict) or any(not isinstance(splits.get(s), dict) for s in SPLITS):
        raise PreparedDataError(f"{index_path}: no train and val splits")
    for name in ("documents", "text_bytes"):
        _count(index_path, index, name, name)
    if not isinstance(index.get("source_fingerprint"), str):
        raise PreparedDataError(f"{index_path}: field 'source_fingerprint' is missing or not a string")
    if not isinstance(index.get("settings", {}), dict):
        raise PreparedDataError(f"{index_path}: field 'settings' is not an object")
    tokenizer = index.get("tokenizer")
    if not isinstance(tokenizer, dict) or tokenizer.get("type") not in ("byte", "hf"):
        raise PreparedDataError(f"{index_path}: field 'tokenizer' is missing or not a byte or hf tokenizer")
    _count(index_path, tokenizer, "vocab_size", "tokenizer.vocab_size")
    if tokenizer.get("eod_id") is not None:
        _count(index_path, tokenizer, "eod_id", "tokenizer.eod_id")
    if tokenizer["type"] == "hf":
        _plain_name(index_path, tokenizer.get("file", "tokenizer.json"), "tokenizer.file")
    for split in SPLITS:
        entry = splits[split]
        for name in ("tokens", "documents", "text_bytes"):
            _count(index_path, entry, name, f"splits.{split}.{name}")
        _plain_name(index_path, entry.get("doc_starts", f"{split}.docs.npy"), f"splits.{split}.doc_starts")
        shards = entry.get("shards", [])
        if not isinstance(shards, list) or not all(isinstance(shard, dict) for shard in shards):
            raise PreparedDataError(f"{index_path}: field 'splits.{split}.shards' is not a list of shards")
        for i, shard in enumerate(shards):
            where = f"splits.{split}.shards[{i}]"
            _plain_name(index_path, shard.get("file"), f"{where}.file")
            _count(index_path, shard, "tokens", f"{where}.tokens")
            if "mask_file" in shard:
                _plain_name(index_path, shard["mask_file"], f"{where}.mask_file")
    return index


def _count(index_path: Path, entry: dict[str, Any], key: str, field: str) -> int:
    """``entry[key]``, a count; :class:`PreparedDataError` naming ``field`` if it is missing or
    not a non-negative integer (``True`` and ``"12"`` are not counts)."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PreparedDataError(f"{index_path}: field {field!r} must be a non-negative integer, got {value!r}")
    return value


def _plain_name(index_path: Path, value: Any, field: str) -> str:
    """``value`` as the name of a file beside ``index_path``; :class:`PreparedDataError` naming
    ``field`` if it is anything else: an absolute path or a ``..`` in an index from elsewhere
    would make a reader open files outside the prepared directory."""
    if (not isinstance(value, str) or not value or Path(value).name != value or value.startswith(".")
            or "\\" in value):
        raise PreparedDataError(f"{index_path}: field {field!r} must be a plain file name in "
                                f"{index_path.parent}, got {value!r}")
    return value


def open_prepared(path: str | Path) -> PreparedData:
    """Open a prepared directory: check every shard's size against the index, map them read-only.

    A shard shorter or longer than its index entry (truncated by a full disk or a copy that
    stopped) raises :class:`PreparedDataError` naming the file.
    """
    directory = Path(path)
    index = read_index(directory)
    dtype = DTYPES[index["dtype"]]
    itemsize = dtype.itemsize
    streams = {}
    for split in SPLITS:
        entry = index["splits"][split]
        maps: list[np.memmap] = []
        mask_maps: list[np.memmap] = []
        for shard in entry.get("shards", []):  # names and counts checked by read_index
            name = str(shard["file"])
            file = directory / name
            expected = int(shard["tokens"]) * itemsize
            size = file.stat().st_size if file.is_file() else -1
            if size != expected:
                what = "is missing" if size < 0 else f"has {size:,} bytes, expected {expected:,} (truncated or damaged)"
                raise PreparedDataError(f"prepared data {directory}: shard {name} {what}; run `retnet prepare` again")
            if expected:
                maps.append(np.memmap(file, dtype=dtype, mode="r"))
            if "mask_file" in shard:
                mask_file = directory / str(shard["mask_file"])
                if (mask_file.stat().st_size if mask_file.is_file() else -1) != int(shard["tokens"]):
                    raise PreparedDataError(f"prepared data {directory}: loss mask {mask_file.name} is missing or "
                                            f"truncated; run `retnet prepare` again")
                if expected:
                    mask_maps.append(np.memmap(mask_file, dtype=np.uint8, mode="r"))
        docs_name = str(entry.get("doc_starts", f"{split}.docs.npy"))
        docs_file = directory / docs_name
        try:
            doc_starts = np.load(docs_file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise PreparedDataError(f"prepared data {directory}: {docs_name} is unreadable: {err}") from err
        if doc_starts.dtype != np.int64 or doc_starts.ndim != 1 or len(doc_starts) != int(entry["documents"]):
            raise PreparedDataError(f"prepared data {directory}: {docs_name} does not match the index")
        sft = bool(index.get("settings", {}).get("sft"))
        stream = TokenStream(maps, doc_starts, mask_maps if sft else None)
        if len(stream) != int(entry["tokens"]):
            raise PreparedDataError(f"prepared data {directory}: the {split} split's shards do not add up to its tokens")
        streams[split] = stream
    return PreparedData(directory, index, streams["train"], streams["val"])

