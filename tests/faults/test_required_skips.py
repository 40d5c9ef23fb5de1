"""The suite's skip policy (tests/conftest.py): on CI a required test that skips fails the run,
for a user it skips cleanly."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

from .conftest import REPO, child_env

TESTS = textwrap.dedent("""
    import pytest

    def test_kernel():
        pytest.skip("kernels unavailable")

    def test_gpu():
        pytest.skip("needs CUDA")

    @pytest.mark.required
    def test_marked():
        pytest.skip("anything")
""")
PEER = 'import pytest\npytest.importorskip("torchscale_absent_peer")\n\ndef test_peer():\n    pass\n'


def test_required_skips_fail_on_ci_and_skip_for_users(tmp_path: Path) -> None:
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    required: may not skip on CI\n")
    (tmp_path / "test_skips.py").write_text(TESTS)
    (tmp_path / "test_peer.py").write_text(PEER)
    results = {}
    # The children test the policy itself: an outer run's opt-out (YARETNET_ALLOW_SKIPS=1) must not
    # reach them.
    for name, extra in (("ci", {"CI": "true", "YARETNET_ALLOW_SKIPS": ""}), ("user", {"CI": ""})):
        results[name] = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "."],
                                       cwd=tmp_path, env=child_env(**extra), capture_output=True, text=True,
                                       timeout=120)
    ci = results["ci"]
    assert ci.returncode == 1, ci.stdout[-2000:]
    assert "2 failed, 2 skipped" in ci.stdout  # the kernel and the marked test; CUDA may skip
    assert "FAILED (required on CI, but skipped) test_peer.py" in ci.stdout  # a module-level skip
    assert "required on CI, but skipped" in ci.stdout and "torchscale_absent_peer" in ci.stdout
    user = results["user"]
    assert user.returncode == 0 and "4 skipped" in user.stdout, user.stdout[-2000:]
