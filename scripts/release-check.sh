#!/usr/bin/env bash
# Release check: build the sdist and wheel, `twine check` them, verify the wheel ships sources
# only (Python and the C++ kernel sources, every one the extension compiles: the kernels are
# built with -march=native on the user's machine at first use, never shipped as a binary), then
# install the wheel into a clean virtual environment and run a smoke test of the public API, the
# 0.5.1 API and the CLI there, once with the C++ toolchain and once without one (the package
# must fall back to plain PyTorch with a message). The environment reuses this Python's
# site-packages for torch and the other dependencies (--system-site-packages); the smoke test
# checks that yet_another_retnet itself comes from the wheel.
# Usage: bash scripts/release-check.sh   (from anywhere; needs build, twine, setuptools)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== build (sdist + wheel) (at ${SECONDS} s)"
# Without isolation where this Python has the build requirements (no download), else isolated.
python -m build --no-isolation --sdist --wheel --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 \
    || python -m build --sdist --wheel --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; exit 1; }
ls "$work/dist"
echo "== twine check (at ${SECONDS} s)"
python -m twine check --strict "$work"/dist/*

echo "== wheel and sdist contents (at ${SECONDS} s)"
python - "$root" "$work"/dist/*.whl "$work"/dist/*.tar.gz <<'PY'
import sys, tarfile, zipfile
from pathlib import Path

root, wheel, sdist = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
names = zipfile.ZipFile(wheel).namelist()
package = [n for n in names if not n.split("/")[0].endswith(".dist-info")]
bad = [n for n in package if not n.endswith((".py", ".cpp", ".h", "py.typed"))]
assert not bad, f"the wheel must hold sources only (no compiled binaries), found: {bad}"
csrc = sorted(p.relative_to(root).as_posix() for d in ("ops/cpu/csrc",)
              for p in (root / "yet_another_retnet" / d).iterdir())
missing = [n for n in csrc if n not in names]
assert not missing, f"the wheel lacks kernel sources: {missing}"
import re
# The build's source list: ops/cpu/_extension.py names each family (csrc/<family>.cpp);
# every one of them, and every header they include, must be in the wheel.
text = (root / "yet_another_retnet/ops/cpu/_extension.py").read_text()
families = re.search(r"FAMILIES = \(([^)]*)\)", text).group(1)
compiled = [f"yet_another_retnet/ops/cpu/csrc/{f}.cpp" for f in re.findall(r'"(\w+)"', families)]
assert len(compiled) > 10 and all(c in names for c in compiled), compiled
included = {m for p in csrc if p.endswith((".cpp", ".h"))
            for m in re.findall(r'#include "([\w.]+)"', (root / p).read_text())}
assert all(f"yet_another_retnet/ops/cpu/csrc/{h}" in names for h in included), included
in_sdist = tarfile.open(sdist).getnames()
missing = [n for n in csrc if not any(s.endswith("/" + n) for s in in_sdist)]
assert not missing, f"the sdist lacks kernel sources: {missing}"
# The peer comparison (benchmarks/: pinned releases of other libraries) stays out of the wheel;
# bench/_outside.py, which says where it went, ships.
outside = {p.name for p in (root / "benchmarks").glob("*.py")}
leaked = [n for n in names if n.rsplit("/", 1)[-1] in outside or n.startswith("benchmarks/")]
assert not leaked, f"benchmarks/ must not ship in the wheel, found: {leaked}"
assert "yet_another_retnet/bench/_outside.py" in names
print(f"wheel: {len(package)} files, sources only; {len(csrc)} kernel sources in wheel and sdist")
PY

echo "== clean environment with the wheel (at ${SECONDS} s)"
# --without-pip: the environment runs this Python's pip from the shared site-packages (saves
# ensurepip's minute on a slow host); it installs into the environment all the same.
python -m venv --system-site-packages --without-pip "$work/venv"
# Run from inside a virtual environment, --system-site-packages reaches the base interpreter's
# packages, not this environment's torch: name this Python's site-packages in a .pth file too (as
# paths, so their own .pth hooks, an editable install of this package among them, stay out).
python - "$work/venv/bin/python" <<'PY'
import subprocess, sys, sysconfig
from pathlib import Path

ask = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
target = Path(subprocess.check_output([sys.argv[1], "-c", ask], text=True).strip())
ours = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
(target / "_release_check_parent.pth").write_text("".join(p + "\n" for p in ours))
PY
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "$work"/dist/*.whl
cd "$work"  # not the repository: its source tree must not be importable

echo "== smoke test with the C++ toolchain (at ${SECONDS} s)"
# A fresh extension cache: the kernels compile here, as on a user's first use.
mkdir "$work/ext"
TORCH_EXTENSIONS_DIR="$work/ext" "$work/venv/bin/python" "$root/scripts/release_smoke.py" "$work/venv" 1

echo "== smoke test without a C++ compiler (CXX/CC missing, PATH without compilers or ninja) (at ${SECONDS} s)"
mkdir "$work/ext-empty"
env PATH="$work/venv/bin" CXX=/nonexistent/c++ CC=/nonexistent/cc TORCH_EXTENSIONS_DIR="$work/ext-empty" \
    "$work/venv/bin/python" "$root/scripts/release_smoke.py" "$work/venv" 0 2> "$work/nocc.err" \
    || { cat "$work/nocc.err"; exit 1; }
grep -q "CPU extension unavailable, using plain PyTorch" "$work/nocc.err" \
    || { echo "no fallback message on stderr:"; cat "$work/nocc.err"; exit 1; }
grep -m1 "CPU extension unavailable" "$work/nocc.err"
echo "release check passed in ${SECONDS} s"
