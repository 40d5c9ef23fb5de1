"""Suite-wide settings: the devices a test runs on, and on CI, the skips that fail the run.

A test that takes the ``device`` fixture runs on CPU, and again on CUDA where a GPU is present
(the CUDA case skips cleanly without one). Inputs are built on CPU (the float64 reference in
tests/reference.py runs there) and moved; results come back with ``.cpu()`` to be compared.

Suite-wide policy: on CI, a test the product's claims depend on may not skip.

Optional peers (torchscale, fairscale, transformers, tokenizers) and the C++ kernels skip cleanly
for a user without them. On CI (``CI=true``, as CI services set it) the same skip fails the run,
because the README's claims ("tested against torchscale 0.3.0", the kernels' speed) rest on those
tests having run. A skip counts as required when its test is marked ``@pytest.mark.required`` or
its reason names one of :data:`REQUIRED`. ``YARETNET_ALLOW_SKIPS=1`` turns the policy off.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import torch

#: ``"cpu"`` always; ``"cuda"`` a case that skips where no GPU is present.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def float32_tol(device: torch.device, tol: float) -> float:
    """The bound for a float32 result on ``device``: on CUDA our Triton kernels' float32 products
    run in TF32 (unit roundoff 2^-11), so a bound under 2e-3 is raised to it there."""
    return max(tol, 2e-3) if device.type == "cuda" else tol


def fsdp2_problem() -> str | None:
    """Why ``--fsdp`` cannot run with this torch (``None``: it can): FSDP2 is torch >= 2.4."""
    from yet_another_retnet.training.distributed import fsdp2

    try:
        fsdp2()
    except ValueError as err:
        return str(err)
    return None


#: fp16 training off CUDA needs ``torch.amp.GradScaler`` (torch >= 2.3); torch 2.2 refuses it by name.
CPU_FP16 = hasattr(torch.amp, "GradScaler")


def kernels_expected() -> bool:
    """Whether the C++ CPU kernels must build here: a C++ compiler and ninja on PATH, and the
    kernels not switched off (``YARETNET_FAST_PATH=0`` or its deprecated alias). Tests that assert
    a kernel ran ask this, so a run with the kernels switched off tests the fallback instead."""
    from yet_another_retnet.ops.cpu import _extension

    return shutil.which("c++") is not None and shutil.which("ninja") is not None and _extension.switch_on()

# ---------------------------------------------------------------------------------------------
# `retnet train` in tests: the smallest model, and a corpus file
# ---------------------------------------------------------------------------------------------

#: ``retnet train`` options of the smallest model the tests train: on the CPU, no sample at the end.
TINY_MODEL = ["--d-model", "32", "--num-layers", "2", "--num-heads", "2", "--ffn-dim", "64", "--device", "cpu",
              "--sample-tokens", "0"]
#: ... with 16-token windows, batches of 2 and a two-window evaluation: a few steps take a second.
TINY = [*TINY_MODEL, "--seq-len", "16", "--batch-size", "2", "--eval-max-windows", "2"]


def write_corpus(path: Path, chars: int = 8_000) -> Path:
    """The first ``chars`` characters of the embedded default corpus (real text), written to ``path``."""
    from yet_another_retnet.training.data import default_corpus_text

    path.write_text(default_corpus_text()[:chars])
    return path


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~8 KB of real text, shared by the suite's training runs (read only)."""
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt")


#: Substrings of the skip reasons that may not happen on CI.
REQUIRED = (
    "torchscale", "fairscale", "transformers", "tokenizers",  # peers installed by .ci/run
    "kernel unavailable", "kernels unavailable", "extension unavailable", "extension is not built",
    "no C++ compiler", "needs a C++ compiler",  # the C++ kernels
    # the other peers and extras scripts/install-test-peers.sh and `.[dev]` install
    "flash-linear-attention", "yet-another-retnet 0.5.1", "triton is not installed", "'lm_eval'",
    "'accelerate'", "'fastapi'", "'uvicorn'", "'httpx'", "'tensorboard'", "'wandb'", "'pyarrow'",
    "'datasets'",
)


def _enforced() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1") and os.environ.get("YARETNET_ALLOW_SKIPS") != "1"


def _reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def required_skip(reason: str, marked: bool = False) -> bool:
    """Whether a skip for ``reason`` fails the run on CI."""
    return marked or any(word in reason for word in REQUIRED)


def _fail(report: Any, reason: str) -> None:
    report.outcome = "failed"
    report.longrepr = f"required on CI, but skipped: {reason} (see tests/conftest.py)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and _enforced() and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if required_skip(reason, item.get_closest_marker("required") is not None):
            _fail(report, reason)


_skipped_modules: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    # A module-level importorskip: failing the collection would stop the whole run, so it is
    # recorded here and fails the session at its end (pytest_sessionfinish).
    if report.skipped and _enforced() and required_skip(_reason(report)):
        _skipped_modules.append(f"{collector.nodeid}: {_reason(report)}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _skipped_modules:
        terminalreporter.write_line(f"FAILED (required on CI, but skipped) {line}", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_modules and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
