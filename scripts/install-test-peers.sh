#!/usr/bin/env bash
# Optional real peers the tests compare against (each such test skips cleanly without them):
# - torchscale 0.3.0 (Microsoft's RetNet) with fairscale, without their dependency trees (timm
#   would pull torchvision; the tests shim the one timm function torchscale imports);
# - Hugging Face transformers, the KV-cache Transformer baseline of the benchmarks, and what
#   yet_another_retnet.hf is tested against (with accelerate, which its Trainer needs);
# - lm-evaluation-harness, which `retnet eval --tasks` runs (with its [api] extra: its OpenAI-completions
#   model is run against `retnet serve`); pyarrow, datasets, TensorBoard, W&B;
# - flash-linear-attention 0.6.0, whose own RetNet the fla checkpoint tests compare against (it
#   needs transformers >= 5.6.2 and imports triton);
# - triton, whose interpreter runs our GPU kernels on CPU in tests/ops/triton/test_triton_interpreter.py.
# The installed torch is pinned so that no peer's requirements replace the CPU build.
set -euo pipefail
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
pip_install() { python -m pip install --quiet --disable-pip-version-check -c "$constraints" "$@"; }
pip_install --no-deps "torchscale==0.3.0" "fairscale==0.4.13"
pip_install "transformers>=5.6.2,<6" "accelerate>=1.1.0" "triton>=3.3" "einops"
pip_install "flash-linear-attention==0.6.0" "fla-core==0.6.0"
pip_install "lm-eval[api]>=0.4.5"
# retnet prepare's parquet / datasets sources and --log-to tensorboard,wandb (the [data] and
# [logging] extras).
pip_install "pyarrow>=12" "datasets>=2.14" "tensorboard>=2.14" "wandb>=0.16"
# yet-another-retnet 0.5.1 (the PyPI release this package replaces; same import name, so into a
# folder of its own): the oracle of tests/compat/test_yar051_api.py and a peer of `retnet bench peers`.
pip_install --no-deps --upgrade --target "$(dirname "$0")/../.peers/yaretnet051" "yet-another-retnet==0.5.1" "einops"
