"""``retnet bench peers_training``: moved to the source repository's ``benchmarks/peers_training.py``.

This module stands in for it at its old import path: from a source checkout it loads that file
under this name (so ``from yet_another_retnet.bench import peers_training`` keeps working); from an
installed wheel importing it raises a ``ModuleNotFoundError`` that says where it went.
"""

from __future__ import annotations

import sys

from ._outside import load

if __name__ == "__main__":  # python -m yet_another_retnet.bench.peers_training
    sys.exit(load("peers_training", "yet_another_retnet.bench.peers_training").main())
else:
    sys.modules[__name__] = load("peers_training", __name__)
