"""Corpora and tokenizers for training and evaluation.

The default corpus needs no download: it is the English help text that every CPython ships in
``pydoc_data.topics`` (~465 KB), tokenized byte by byte (vocabulary 256).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py", ".json", ".jsonl", ".csv")


def default_corpus_text() -> str:
    """The embedded default corpus: CPython's ``pydoc_data.topics``, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, nothing to download or train."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def split_tokens(tokens: Tensor, val_fraction: float = 0.05) -> tuple[Tensor, Tensor]:
    """Split a 1-D token tensor into (train, validation): the last ``val_fraction`` validates."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


def encode_corpus(text: str, tokenizer: ByteTokenizer | None = None) -> Tensor:
    """A 1-D long tensor of the tokens of ``text``."""
    tokenizer = tokenizer or ByteTokenizer()
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def read_text_files(path: str | Path) -> str:
    """The text of a file, or of every text file under a directory (sorted), joined by blank lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
    )
    if not files:
        raise ValueError(f"data path {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not text.strip():
        raise ValueError(f"data path {path} is empty")
    return text
