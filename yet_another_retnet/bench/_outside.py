"""Benchmarks kept outside the installed package, in the source repository's ``benchmarks/``.

The peer comparison loads pinned releases of other libraries (yet-another-retnet 0.5.1,
torchscale 0.3.0, a Hugging Face Llama), so it does not ship in the wheel. From a source
checkout (``pip install -e .`` or ``PYTHONPATH=<checkout>``), the old import paths
``yet_another_retnet.bench.peers`` and ``yet_another_retnet.bench.peers_training`` and
``retnet bench peers`` still reach it: the folder is found beside the package, and a finder
on ``sys.meta_path`` (installed when ``yet_another_retnet.bench`` is imported) maps those module
names to its files. In an installed wheel, importing them raises a ``ModuleNotFoundError`` that
says where they went.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: ``benchmarks/`` of the checkout this package was imported from (absent in an installed wheel).
BENCHMARKS_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


class RelocatedBenchmarkError(ModuleNotFoundError):
    """The benchmark lives in the source repository, and this package is not a checkout."""


def where(name: str) -> str:
    """The one-line explanation of where benchmark ``name`` went."""
    return (f"benchmark {name!r} is not part of the installed package: it lives in the source "
            f"repository as benchmarks/{name}.py; run `retnet bench {name}` from a source checkout "
            "(git clone, then pip install -e .)")


#: The benchmarks that moved out, by their module name under ``yet_another_retnet.bench``.
RELOCATED = ("peers", "peers_training")
PACKAGE = "yet_another_retnet.bench"


class _Finder(importlib.abc.MetaPathFinder):
    """Finds ``yet_another_retnet.bench.<name>`` for the relocated benchmarks in ``benchmarks/``."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in RELOCATED:
            return None
        file = BENCHMARKS_DIR / f"{name}.py"
        if not file.is_file():
            raise RelocatedBenchmarkError(where(name), name=fullname)
        return importlib.util.spec_from_file_location(fullname, file)


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once; after the standard finders)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.append(_Finder())
