"""Shared test settings: the devices a test runs on.

A test that takes the ``device`` fixture runs on CPU, and again on CUDA where a GPU is present
(the CUDA case skips cleanly without one). Inputs are built on CPU (the float64 reference in
tests/reference.py runs there) and moved; results come back with ``.cpu()`` to be compared.
"""

from __future__ import annotations

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
