#!/usr/bin/env bash
# The prepared device check for one lent GPU (one H100): at most 115+40+85+55+55 s = 5.8 minutes
# even with every step at its limit (plus the installs, seconds).
#
# It installs nothing from the network (the device machine reaches no registry): the project with
# --no-deps, and flash-linear-attention from wheels carried with the tree. Before the call, on a
# machine with network access, from the repository root:
#
#     pip download flash-linear-attention==0.6.0 fla-core==0.6.0 --no-deps -d wheels/
#
# (wheels/ is git-ignored: name it in the device tool's carry list.) Then, on the device:
#
#     bash scripts/gpu-check.sh            # results into $OUT (or docs/results/gpu)
#
# Steps, each under its own time limit so one stuck step cannot eat the rest:
#   1. the CUDA tests: our kernels compiled (both schedules; fp32/bf16/fp16, gradients, selection, fla's
#      backend, a bf16 training step, generation) and every device-parametrized test's CUDA case;
#   2. the benchmark (python -m yet_another_retnet.bench.gpu): kernels, training, decoding, each
#      section a separate run writing gpu.json and gpu.md under $OUT/<section>/.
# What each figure means and the targets: docs/gpu.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-docs/results/gpu}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
log() { echo "[gpu-check $(date -u +%H:%M:%S)] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"

log "install (no network)"
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { log "editable install failed (see install.log): using PYTHONPATH"; export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; }
if compgen -G "wheels/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-index wheels/*.whl >>"$OUT/install.log" 2>&1 \
        || log "fla wheels did not install (see install.log): fla's rows will say so"
else
    log "no wheels/ folder: fla's rows will say it is not installed"
fi

# The C++ CPU kernels are not what this checks, and a fresh machine would spend the first test's
# time limit building them: the CPU side of every test takes the plain PyTorch path.
export YARETNET_FAST_PATH=0

status=0
log "1/2 CUDA tests"
timeout 115 "$PY" -m pytest -q -p no:cacheprovider tests/ops/triton/test_triton_cuda.py tests/ops/triton/test_triton_interpreter.py \
    2>&1 | tee "$OUT/tests-triton.log" | tail -15 || status=1
timeout 40 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/ops/test_retention_forms.py tests/models/test_retnet.py tests/models/test_generation.py tests/models/test_cuda_graph.py \
    2>&1 | tee "$OUT/tests-devices.log" | tail -5 || status=1

log "2/2 benchmark"
timeout 85 "$PY" -m yet_another_retnet.bench.gpu --sections kernels --budget-s 60 --out "$OUT/kernels" 2>&1 | tail -3 || status=1
timeout 55 "$PY" -m yet_another_retnet.bench.gpu --sections training --out "$OUT/training" 2>&1 | tail -3 || status=1
timeout 55 "$PY" -m yet_another_retnet.bench.gpu --sections decode --out "$OUT/decode" 2>&1 | tail -3 || status=1
for section in kernels training decode; do
    [ -f "$OUT/$section/gpu.md" ] && sed -n '/^## /,$p' "$OUT/$section/gpu.md"
done
log "done (status $status)"
exit "$status"
