"""Benchmarks kept outside the installed package, in the source repository's ``benchmarks/``.

The peer comparison loads pinned releases of other libraries (yet-another-retnet 0.5.1,
torchscale 0.3.0, a Hugging Face Llama), so it does not ship in the wheel. From a source
checkout (``pip install -e .`` or ``PYTHONPATH=<checkout>``), the old import paths
``yet_another_retnet.bench.peers`` and ``yet_another_retnet.bench.peers_training`` and
``retnet bench peers`` still reach it: the folder is found beside the package.
"""

from __future__ import annotations

import importlib.util
import sys
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


def load(name: str, module_name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as ``module_name`` (registered in ``sys.modules``)."""
    path = BENCHMARKS_DIR / f"{name}.py"
    if not path.is_file():
        raise RelocatedBenchmarkError(where(name), name=module_name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
