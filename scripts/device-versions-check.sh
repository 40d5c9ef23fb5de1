#!/usr/bin/env bash
# What can be checked here, without a GPU, of the device check under the GPU machine's own Triton
# (3.6 in its image; CI has a newer one): the kernels compiled for sm_90 by that Triton, and the
# interpreter tests run by it. Costs no device time; run it before spending a GPU session.
#
#     bash scripts/device-versions-check.sh              # Triton 3.6.0
#     TRITON_VERSION=3.7.0 bash scripts/device-versions-check.sh
#
# Triton (and, for the interpreter, a NumPy older than 2.4: see docs/gpu.md) go into a folder of
# their own put first on PYTHONPATH, so the environment's own packages stay as they are.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
version="${TRITON_VERSION:-3.6.0}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$site" "triton==$version" "numpy<2.4"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import numpy, triton; print('triton', triton.__version__, 'numpy', numpy.__version__)"

echo "== kernels compiled for sm_90 (every dtype x head dim the launchers configure)"
"$PY" -m yet_another_retnet.ops.triton.compile_check
echo "== interpreter tests"
"$PY" -m pytest -q -p no:cacheprovider tests/ops/triton/test_triton_interpreter.py tests/ops/test_fla_backend.py
