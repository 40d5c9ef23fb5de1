"""What every part of ``retnet prepare`` shares: its error and the names of the files it owns."""

from __future__ import annotations

from ..shards import INDEX_NAME

PARTIAL = ".partial"
LOCK_NAME = ".prepare.lock"
TOKENIZER_FILE = "tokenizer.json"


class PrepareError(ValueError):
    """Bad input to ``retnet prepare``: reported in one line, nothing left half-written."""


def ours(name: str) -> bool:
    """A file ``retnet prepare`` writes (what a rerun may delete)."""
    return (name in (INDEX_NAME, TOKENIZER_FILE, PARTIAL, LOCK_NAME)
            or (name.startswith(("train-", "val-")) and name.endswith((".bin", ".mask")))
            or name in ("train.docs.npy", "val.docs.npy")
            or (name.startswith(f".{INDEX_NAME}.") and name.endswith(".tmp")))
