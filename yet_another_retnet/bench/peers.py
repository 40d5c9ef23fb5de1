"""``retnet bench peers``: moved to the source repository's ``benchmarks/peers.py``.

This module stands in for it at its old import path: from a source checkout it loads that file
under this name (so ``from yet_another_retnet.bench import peers`` keeps working); from an
installed wheel importing it raises a ``ModuleNotFoundError`` that says where it went.
"""

from __future__ import annotations

import sys

from ._outside import load

if __name__ == "__main__":  # python -m yet_another_retnet.bench.peers
    sys.exit(load("peers", "yet_another_retnet.bench.peers").main())
else:
    sys.modules[__name__] = load("peers", __name__)
