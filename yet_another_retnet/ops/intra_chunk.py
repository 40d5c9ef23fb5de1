"""The parallel form inside every chunk of chunkwise retention: ``((Q K^T) * M) V`` per chunk.

:func:`intra_chunk` runs ``csrc/intra_chunk.cpp`` on CPU float32: a register-tiled product per
chunk that skips the tiles above the diagonal (the causal mask zeroes them anyway), with each
chunk's ``(c x c)`` scores in a per-thread buffer instead of written out for all chunks, and a
backward that recomputes the scores instead of keeping them. :func:`intra_chunk_reference` is
the same in three PyTorch ops: the path wherever the kernel does not apply (other devices or
dtypes, chunk or head sizes that are not multiples of 32, a mask that needs a gradient, no C++
toolchain, torch < 2.4, ``YARETNET_CPU_KERNELS=0``) and what the kernel is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension

__all__ = ["intra_chunk", "intra_chunk_applies", "intra_chunk_reference"]

#: The kernel's tile width: chunk size, dk and dv must be multiples of it.
_TILE = 32


def intra_chunk_applies(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> bool:
    """Whether :func:`intra_chunk` runs the kernel for these inputs (building the extension on the
    first call): CPU float32, chunk, dk and dv multiples of 32, a constant mask."""
    return (q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == mask.dtype == torch.float32
            and q.dim() == 5 and q.shape[-2] % _TILE == 0 and q.shape[-1] % _TILE == 0
            and v.shape[-1] % _TILE == 0 and not mask.requires_grad
            and _extension.load() and hasattr(torch.library, "register_autograd"))


def intra_chunk_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``((q @ k^T) * mask) @ v``: the plain form of :func:`intra_chunk`."""
    return ((q @ k.transpose(-1, -2)) * mask) @ v


def intra_chunk(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``((q @ k^T) * mask) @ v`` for every chunk, differentiable in ``q``, ``k``, ``v``.

    Args:
        q, k: ``(batch, heads, chunks, c, dk)``. v: ``(batch, heads, chunks, c, dv)``.
        mask: ``(heads, 1, c, c)``, a chunk's decay mask (shared by the chunks of a head), zero
            above the diagonal: the kernel never computes the tiles there.

    Returns:
        ``(batch, heads, chunks, c, dv)``. The kernel where :func:`intra_chunk_applies`, else
        :func:`intra_chunk_reference`.
    """
    if intra_chunk_applies(q, k, v, mask):
        return torch.ops.yaretnet.intra_chunk(q, k, v, mask)
    return intra_chunk_reference(q, k, v, mask)
