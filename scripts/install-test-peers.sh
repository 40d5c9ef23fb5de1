#!/usr/bin/env bash
# Optional real peers the tests compare against (each such test skips cleanly without them):
# - torchscale 0.3.0 (Microsoft's RetNet) with fairscale, without their dependency trees (timm
#   would pull torchvision; the tests shim the one timm function torchscale imports);
# - Hugging Face transformers, the KV-cache Transformer baseline of the benchmarks;
# - flash-linear-attention 0.6.0, whose own RetNet the fla checkpoint tests compare against (it
#   needs transformers >= 5.6.2; torch is pinned so pip cannot replace the CPU build).
set -euo pipefail
python -m pip install --quiet --disable-pip-version-check --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
python -m pip install --quiet --disable-pip-version-check "transformers>=4.40"
# fla imports triton (no torch requirement: pip leaves the installed torch alone).
python -m pip install --quiet --disable-pip-version-check "flash-linear-attention==0.6.0" "fla-core==0.6.0" \
    "transformers>=5.6.2,<6" "triton>=3.3" "einops"
