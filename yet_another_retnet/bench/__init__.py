"""Benchmarks: retention ops, inference and training cost, and quality against a same-size Transformer.

The peer comparison lives in the repository's ``benchmarks/``, outside the wheel; :mod:`._outside`
keeps its old module names (``yet_another_retnet.bench.peers``, ``.peers_training``) working
from a source checkout.
"""

from ._outside import install as _install_relocated

_install_relocated()
