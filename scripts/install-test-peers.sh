#!/usr/bin/env bash
# Optional real peers the tests compare against (each such test skips cleanly without them):
# - torchscale 0.3.0 (Microsoft's RetNet) with fairscale, without their dependency trees (timm
#   would pull torchvision; the tests shim the one timm function torchscale imports);
# - Hugging Face transformers, the KV-cache Transformer baseline of the benchmarks, and what
#   yet_another_retnet.hf is tested against (with accelerate, which its Trainer needs);
# - lm-evaluation-harness, which `retnet eval --tasks` runs.
set -euo pipefail
python -m pip install --quiet --disable-pip-version-check --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
python -m pip install --quiet --disable-pip-version-check "transformers>=4.57" "accelerate>=1.1.0"
python -m pip install --quiet --disable-pip-version-check "lm-eval>=0.4.5"
