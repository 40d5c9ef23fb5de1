"""The kernels' portable build (``YARETNET_CPU_MARCH``, e.g. ``x86-64-v3``: no AVX-512), which CI
builds and tests besides the native one (.ci/run), really is built without AVX-512."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from yet_another_retnet.ops import _extension


def test_a_malformed_march_is_refused_not_ignored() -> None:
    code = "from yet_another_retnet.ops import _extension; _extension.load()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items()  # the kernels switched on
                                  if k not in (_extension.SWITCH, _extension.DEPRECATED_SWITCH)},
                               "YARETNET_CPU_MARCH": "native -O0; echo"})
    assert done.returncode != 0 and "YARETNET_CPU_MARCH must be a -march name" in done.stderr


@pytest.mark.skipif(_extension.march() in ("native", ""), reason="runs under YARETNET_CPU_MARCH (CI's portable step)")
def test_the_portable_build_uses_no_avx512() -> None:
    assert _extension.load(), "the portable extension did not build"
    assert _extension.library is not None and _extension.march() in _extension.library.name.replace("_", "-")
    if shutil.which("objdump") is None:
        pytest.skip("no objdump to inspect the build")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(_extension.library)],
                             capture_output=True, text=True, check=True).stdout
    assert "%zmm" not in listing and "%k1" not in listing  # AVX-512 registers
    assert "%ymm" in listing or "%xmm" in listing  # vector code is there
