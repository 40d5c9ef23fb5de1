"""bfloat16 matrix products inside a float32 model, for prompt prefill on CPUs with bf16 units.

On CPUs with AVX512-BF16 (AMD Zen 4/5, Intel Cooper Lake) or AMX (Intel Sapphire Rapids and
later), oneDNN multiplies bfloat16 matrices several times faster than float32 ones, accumulating
in float32. A prefill is almost all matrix products; everything between them (norms, the
retention core, its state) is better kept in float32. Inside :func:`bf16_products`, every large
inference-time product of :func:`~yet_another_retnet.ops.matmul.mm_nt` (the projections and the
FFN: what :func:`~yet_another_retnet.ops.matmul.linear` runs) rounds its two operands to bfloat16,
runs oneDNN's bf16 product and hands back float32 (bias and residual added in float32). The
weights are rounded per call (a pass over them, small next to a product of thousands of rows).

Results differ from float32 by the operands' rounding (relative ~2^-9 per product). Outside the
context, or on CPUs without bf16 units, nothing changes. Training (autograd on) is never affected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["bf16_products", "bf16_products_active", "cpu_has_bf16"]

#: Products with fewer rows stay float32 (decoding steps read weights, they do not multiply much).
MIN_ROWS = 64
_local = threading.local()


@cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 dot products (``avx512_bf16`` or ``amx_bf16`` in its flags)
    and PyTorch has oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def bf16_products(enabled: bool = True) -> Iterator[bool]:
    """Run this thread's large float32 inference products in bfloat16 while active.

    Yields whether they do (``False`` where the CPU has no bf16 units or ``enabled`` is false).
    """
    previous = getattr(_local, "on", False)
    _local.on = bool(enabled) and cpu_has_bf16()
    try:
        yield _local.on
    finally:
        _local.on = previous


def bf16_products_active(a: Tensor, b: Tensor) -> bool:
    """Whether ``a @ b.T`` should run in bfloat16 here (float32 CPU operands, enough rows, no autograd)."""
    return (getattr(_local, "on", False) and a.dtype == torch.float32 and b.dtype == torch.float32
            and a.device.type == "cpu" and a.shape[0] >= MIN_ROWS and not torch.is_grad_enabled())


def mm_nt_bf16(a: Tensor, b: Tensor, bias: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """``add + a @ b.T + bias`` with the product in bfloat16 (float32 accumulation), float32 out."""
    out = torch.ops.mkldnn._linear_pointwise(a.to(torch.bfloat16), b.to(torch.bfloat16), None, "none", [], "")
    out = out.float()
    if bias is not None:
        out += bias
    if add is not None:
        out += add
    return out
