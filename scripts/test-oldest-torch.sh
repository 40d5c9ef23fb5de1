#!/usr/bin/env bash
# The test suite under the oldest PyTorch the package allows (torch>=2.2), in a virtual environment
# of its own. Not part of CI: PyPI has only CUDA builds of torch 2.2 (about 3 GB with their
# libraries). What runs differently there is in docs/reliability.md ("Supported versions").
#
#     bash scripts/test-oldest-torch.sh [VENV]        # default .venv/torch-2.2
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv/torch-2.2}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
venv="$(cd "$venv" && pwd)"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.2.2\nnumpy<2\n' > "$constraints"   # torch 2.2 was built against NumPy 1.x
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" \
    torch==2.2.2 "numpy<2" pytest hypothesis tokenizers safetensors psutil ninja matplotlib
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e .
# The C++ kernels are built for each torch: a folder of their own, beside the venv.
TORCH_EXTENSIONS_DIR="$venv/torch_extensions" CI= "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
