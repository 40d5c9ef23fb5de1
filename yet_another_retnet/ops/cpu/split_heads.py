"""A retention layer's fused projection split into per-head q, k, v and the gate, as one CPU kernel.

``proj`` ``(batch, length, 2 h dk + 2 h dv)`` holds ``[q | k | v | gate]``; queries and keys are
rotated by position (``ops/position.py``'s ``x * cos + rotate_every_two(x) * sin``). On CPU float32
one kernel (``csrc/split_heads.cpp``) writes q, k ``(b, h, L, dk)``, v ``(b, h, L, dv)`` and the
gate ``(b, L, h dv)`` contiguous in one pass, and its backward writes the four gradients back into
one projection gradient: in eager PyTorch that was a complex multiply, three layout copies, and
backward a conjugate multiply plus a concatenation. :func:`split_heads_reference` is the same in
PyTorch ops (views, not copies): the path everywhere else, what a double backward differentiates,
and what the kernel is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from .position import apply_rotation

__all__ = ["split_heads", "split_heads_apply", "split_heads_reference"]


def split_heads_reference(proj: Tensor, cos: Tensor | None, sin: Tensor | None, heads: int,
                          key_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The plain form of :func:`split_heads`: views of ``proj``, q and k rotated."""
    value_dim = (proj.shape[-1] - 2 * heads * key_dim) // 2
    qk, v, gate = proj.split([2 * heads * key_dim, value_dim, value_dim], dim=-1)
    q, k = (t.transpose(1, 2) for t in qk.unflatten(-1, (2, heads, key_dim)).unbind(2))
    if cos is not None and sin is not None:
        q, k = (apply_rotation(t, cos[:, None], sin[:, None]) for t in (q, k))
    return q, k, v.unflatten(-1, (heads, value_dim // heads)).transpose(1, 2), gate


def split_heads_apply(proj: Tensor, cos: Tensor | None) -> bool:
    """Whether the kernel takes these inputs (building the extension on the first call): CPU
    float32 projection and tables that need no gradient."""
    return (proj.device.type == "cpu" and proj.dtype == torch.float32 and proj.dim() == 3
            and (cos is None or (cos.dtype == torch.float32 and not cos.requires_grad))
            and _extension.load() and hasattr(torch.library, "register_autograd"))


def split_heads(proj: Tensor, cos: Tensor | None, sin: Tensor | None, heads: int,
                key_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split and rotate a retention layer's fused projection.

    Args:
        proj: ``(batch, length, 2 heads key_dim + 2 value_dim)``, columns ``[q | k | v | gate]``.
        cos, sin: ``(1 or batch, length, key_dim)``, each angle repeated for its (even, odd) pair,
            or both ``None`` (no rotation).
        heads, key_dim: the layer's head count and per-head query/key width.

    Returns:
        q, k ``(batch, heads, length, key_dim)``, v ``(batch, heads, length, value_dim / heads)``,
        gate ``(batch, length, value_dim)``; differentiable in ``proj``. Contiguous from the kernel
        (where :func:`split_heads_apply`), views from :func:`split_heads_reference` elsewhere.
    """
    if split_heads_apply(proj, cos):
        q, k, v, gate = torch.ops.yaretnet.split_heads(proj, cos, sin, heads, key_dim)
        return q, k, v, gate
    return split_heads_reference(proj, cos, sin, heads, key_dim)
