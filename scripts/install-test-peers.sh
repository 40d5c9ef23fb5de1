#!/usr/bin/env bash
# Optional real peers the tests compare against: torchscale 0.3.0 (Microsoft's RetNet) and its
# pure-Python imports. Installed without their dependency trees (timm would pull torchvision).
set -euo pipefail
python -m pip install --quiet --disable-pip-version-check --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
