"""The state before every chunk of chunkwise retention, as a scan (``csrc/chunk_scan.cpp``).

With ``R_i`` what chunk ``i`` alone adds to the state and ``d = gamma^c``::

    before_0 = prev (or 0),   before_{i+1} = d * before_i + R_i,   final = before_n

The fast chunkwise form (:mod:`.retention`) computes ``before`` as one ``(n x n)`` decay-matrix
product per head: right for GPUs and float64, but on the CPU it is ``n`` times the work of the
scan and ran at ~100 GFLOP/s (~45 ms of a 16k-token d256 training step). :func:`chunk_scan` runs
the C++ scan (forward and backward) for CPU float32; the matrix form stays the path everywhere
else and the reference it is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension

__all__ = ["chunk_scan", "chunk_scan_applies", "chunk_scan_kernel_available"]

def chunk_scan_kernel_available() -> bool:
    """Whether the scan kernel is loaded (building the extension on the first call; its backward
    needs ``torch.library.register_autograd``, torch >= 2.4)."""
    return _extension.load() and hasattr(torch.library, "register_autograd")


def chunk_scan_applies(contributions: Tensor, decay: Tensor) -> bool:
    """Whether :func:`chunk_scan` takes these inputs: CPU float32 with a constant decay."""
    return (contributions.device.type == "cpu" and contributions.dtype == torch.float32
            and decay.dtype == torch.float32 and not decay.requires_grad and chunk_scan_kernel_available())


def chunk_scan(contributions: Tensor, decay: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(befores, final)`` of the recurrence above, differentiable in ``contributions`` and ``prev``.

    Args:
        contributions: ``(batch, heads, n, size)``, ``R_i`` flattened (``size = dk * dv``).
        decay: ``(heads,)``, ``gamma^c`` per head.
        prev: ``(batch, heads, size)`` or ``None`` (a zero state).

    Returns:
        ``befores`` ``(batch, heads, n, size)`` (the state before each chunk) and ``final``
        ``(batch, heads, size)``. Only for inputs where :func:`chunk_scan_applies`.
    """
    if not chunk_scan_kernel_available():
        raise RuntimeError("chunk_scan: the C++ extension is unavailable here (see chunk_scan_applies)")
    befores, final = torch.ops.yaretnet.chunk_scan(contributions, decay, prev)
    return befores, final
