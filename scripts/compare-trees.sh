#!/usr/bin/env bash
# Old tree against new tree: our rows of the peer benchmark (training and decoding), both trees
# interleaved in one session; per row the median of each and the ratio new/old, flagged outside
# +-5%. Writes compare.json and compare.md to --out (default runs/compare-trees, ignored by git).
# Usage: scripts/compare-trees.sh OLD NEW [--rounds N] [--shapes 2x1024,...] [--contexts 512,...]
#        (every option: python benchmarks/compare_trees.py --help). Run it alone on the machine.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec python "$root/benchmarks/compare_trees.py" "$@"
