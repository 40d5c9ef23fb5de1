#!/usr/bin/env bash
# yet_another_retnet.hf under older transformers releases than the one installed (CI installs the
# newest 5.x): 4.57, the oldest the [hf] extra allows, and 5.17, the last 5.x seen naming the cache
# `past_key_values` (newer ones name it `cache`; hf/compat.py reads which). Each goes into a
# folder of its own, put first on PYTHONPATH with the hub, tokenizers, accelerate and datasets
# releases it works with, so the environment's own packages stay as they are.
#
#     bash scripts/test-transformers-versions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
status=0
run() {
    local name="$1"; shift
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$root/$name" "$@"
    echo "== transformers $name"
    PYTHONPATH="$root/$name${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider \
        tests/hf/test_transformers.py || status=1
}
run 4.57 "transformers==4.57.6" "huggingface_hub==0.36.0" "tokenizers==0.22.1" "accelerate==1.10.1" "datasets==4.1.1"
run 5.17 "transformers==5.17.0" "huggingface_hub==1.33.0"
exit "$status"
