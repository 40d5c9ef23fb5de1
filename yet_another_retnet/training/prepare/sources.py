"""The sources of a preparation (files, directories, tables, hub names) and the units of work they
are cut into: pieces of a few MiB of text ending at a line, or row groups of a table."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import PrepareError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".py")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
#: Bytes of text per unit of work (units end at a line boundary).
UNIT_BYTES = 4 << 20
#: Rows per unit of a parquet row group split or a datasets table.
UNIT_ROWS = 8192


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
            rows = len(load_dataset_dir(src.path))
            for a in range(0, rows, UNIT_ROWS):
                units.append(Unit(i, "hf", src.path, a, min(rows, a + UNIT_ROWS), True))
    return units


def load_dataset_dir(path: str) -> Any:
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
