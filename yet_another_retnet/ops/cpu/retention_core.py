"""The middle of a retention layer as one CPU kernel (``csrc/retention_core.cpp``): from the fused
projection ``[q | k | v | gate]`` to what enters the output projection.

For ``proj`` ``(batch, length, 2 h dk + 2 h dv)`` and ``length`` a whole number of chunks::

    q, k, v, z = split_heads(proj)                 # q and k rotated by position
    O, final   = chunkwise retention of q, k, v    # from the state prev, chunk by chunk
    y          = silu(z) * (GroupNorm_head(O) * weight + bias)     # (batch, length, h dv)

That is :func:`.split_heads.split_heads`, :func:`.chunk_kernels.chunk_retention` and
:func:`.norm_gate.norm_gate` in a row; on CPU float32 one kernel does all three per (batch, head),
each chunk's rows packed into cache once, and its backward writes the projection's gradient
directly, so none of the three intermediate layouts (heads, retained values, their gradients) is
streamed through memory and back. :func:`retention_core_reference` composes the three plain forms:
the path everywhere else, what a double backward differentiates, and what the kernel is tested
against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .chunk_kernels import chunk_retention_reference, kernel_shapes_fit, walks_spread
from .norm_gate import norm_gate_reference
from .split_heads import split_heads_reference

__all__ = ["retention_core", "retention_core_applies", "retention_core_reference"]


def retention_core_reference(
    proj: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
    chunk_decay: Tensor, prev: Tensor | None, norm_weight: Tensor, norm_bias: Tensor, eps: float, heads: int,
    key_dim: int, chunk: int,
) -> tuple[Tensor, Tensor]:
    """:func:`retention_core` as the three plain forms in a row. Returns ``(y, final)``."""
    q, k, v, gate = split_heads_reference(proj, cos, sin, heads, key_dim)
    length = q.shape[2]
    q, k, v = (t.unflatten(2, (length // chunk, chunk)) for t in (q, k, v))
    out, final = chunk_retention_reference(q, k, v, mask, query_decay, key_decay, chunk_decay, prev)
    return norm_gate_reference(out.flatten(2, 3), gate, norm_weight, norm_bias, eps), final


def retention_core_applies(proj: Tensor, cos: Tensor | None, heads: int, key_dim: int, chunk: int,
                           *tables: Tensor) -> bool:
    """Whether :func:`retention_core` takes the kernel (building the extension on the first call):
    CPU float32, the length a whole number of chunks, ``chunk``, ``key_dim`` and the head width
    multiples of 32, constant tables, and the ``batch * heads`` walks spread evenly over the
    threads: the chunk kernels' conditions (:func:`.chunk_kernels.chunk_retention_applies`)."""
    if not (proj.device.type == "cpu" and proj.dtype == torch.float32 and proj.dim() == 3):
        return False
    batch, length, width = proj.shape
    value_dim = (width - 2 * heads * key_dim) // 2
    if length == 0 or length % chunk or value_dim <= 0 or value_dim % heads:
        return False
    if cos is not None and (cos.dtype != torch.float32 or cos.requires_grad):
        return False
    return walks_spread(batch * heads) and kernel_shapes_fit(chunk, key_dim, value_dim // heads, *tables)


def retention_core(
    proj: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
    chunk_decay: Tensor, prev: Tensor | None, norm_weight: Tensor, norm_bias: Tensor, eps: float, heads: int,
    key_dim: int, chunk: int,
) -> tuple[Tensor, Tensor]:
    """Split, rotation, chunkwise retention, head norm and swish gate of a retention layer.

    Args:
        proj: ``(batch, length, 2 heads key_dim + 2 value_dim)``, columns ``[q | k | v | gate]``
            (keys unscaled: the scale lives in the tables); ``length`` a multiple of ``chunk``.
        cos, sin: ``(1 or batch, length, key_dim)`` rotation tables, or both ``None``.
        mask, query_decay, key_decay: ``(heads, 1, chunk, chunk)``, ``(heads, 1, chunk, 1)``,
            ``(heads, 1, chunk, 1)``: the chunk's decay tables (``ops/decay.py``'s ``ChunkTables``).
        chunk_decay: ``(heads,)``, ``gamma^chunk``.
        prev: ``(batch, heads, key_dim, head_dim)``, the state before the first token, or ``None``.
        norm_weight, norm_bias: ``(value_dim,)``, the head norm's affine; ``eps`` its epsilon.

    Returns:
        ``(y (batch, length, value_dim), final (batch, heads, key_dim, head_dim))``,
        differentiable in ``proj``, ``prev``, ``norm_weight`` and ``norm_bias``. One kernel call
        where :func:`retention_core_applies`, else :func:`retention_core_reference`.
    """
    tables = (mask, query_decay, key_decay, chunk_decay)
    if (retention_core_applies(proj, cos, heads, key_dim, chunk, *tables)
            and all(t.dtype == torch.float32 for t in (norm_weight, norm_bias))
            and (prev is None or prev.dtype == torch.float32)):
        # The retained values and the states before each chunk are kept only for a backward.
        keep = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (proj, prev, norm_weight, norm_bias))
        y, final, _, _ = torch.ops.yaretnet.retention_core(proj, cos, sin, *tables, prev, norm_weight, norm_bias,
                                                           float(eps), heads, key_dim, chunk, keep)
        return y, final
    return retention_core_reference(proj, cos, sin, *tables, prev, norm_weight, norm_bias, eps, heads, key_dim, chunk)
