#!/usr/bin/env bash
# Optional real peers the tests compare against (each such test skips cleanly without them):
# - torchscale 0.3.0 (Microsoft's RetNet) with fairscale, without their dependency trees (timm
#   would pull torchvision; the tests shim the one timm function torchscale imports);
# - Hugging Face transformers, the KV-cache Transformer baseline of the benchmarks;
# - triton, whose interpreter runs our GPU kernels on CPU in tests/test_triton_kernels.py.
set -euo pipefail
python -m pip install --quiet --disable-pip-version-check --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
python -m pip install --quiet --disable-pip-version-check "transformers>=4.40"
python -m pip install --quiet --disable-pip-version-check "triton>=3.2" || echo "triton not installed; its tests will skip"
