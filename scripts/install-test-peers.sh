#!/usr/bin/env bash
# Optional real peers the tests compare against (each such test skips cleanly without them):
# - torchscale 0.3.0 (Microsoft's RetNet) with fairscale, without their dependency trees (timm
#   would pull torchvision; the tests shim the one timm function torchscale imports);
# - Hugging Face transformers, the KV-cache Transformer baseline of the benchmarks.
set -euo pipefail
python -m pip install --quiet --disable-pip-version-check --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
python -m pip install --quiet --disable-pip-version-check "transformers>=4.40"
# yet-another-retnet 0.5.1 (the PyPI release this package replaces; same import name, so into a
# folder of its own): the oracle of tests/test_compat_051.py and a peer of `retnet bench peers`.
python -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
    --target "$(dirname "$0")/../.peers/yaretnet051" "yet-another-retnet==0.5.1" "einops"
