"""A retention layer's fused projection split into per-head q, k, v and the gate, as one CPU kernel.

``proj`` ``(batch, length, 2 h dk + 2 h dv)`` holds ``[q | k | v | gate]``; queries and keys are
rotated by position (:mod:`yet_another_retnet.ops.position`'s ``x * cos + rotate_every_two(x) * sin``). On CPU float32
one kernel (``csrc/split_heads.cpp``) writes q, k ``(b, h, L, dk)``, v ``(b, h, L, dv)`` and the
gate ``(b, L, h dv)`` contiguous in one pass, and its backward writes the four gradients back into
one projection gradient: in eager PyTorch that was a complex multiply, three layout copies, and
backward a conjugate multiply plus a concatenation.

Reference: :func:`split_heads_reference`, the same in PyTorch ops (views, not copies): the path
everywhere else, what a double backward differentiates, and what ``tests/cpu/test_split_heads.py``
checks the kernel against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..position import apply_rotation
from . import _extension

__all__ = ["split_heads", "split_heads_apply", "split_heads_reference", "supports"]


def split_heads_reference(proj: Tensor, cos: Tensor | None, sin: Tensor | None, heads: int,
                          key_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The plain form of :func:`split_heads`: views of ``proj``, q and k rotated."""
    value_dim = (proj.shape[-1] - 2 * heads * key_dim) // 2
    qk, v, gate = proj.split([2 * heads * key_dim, value_dim, value_dim], dim=-1)
    q, k = (t.transpose(1, 2) for t in qk.unflatten(-1, (2, heads, key_dim)).unbind(2))
    if cos is not None and sin is not None:
        q, k = (apply_rotation(t, cos[:, None], sin[:, None]) for t in (q, k))
    return q, k, v.unflatten(-1, (heads, value_dim // heads)).transpose(1, 2), gate


def constant_table(table: Tensor | None) -> bool:
    """A rotation table the kernels read: none, or float32 needing no gradient (they return none
    for it). Both tables are checked: a caller may make either one differentiable."""
    return table is None or (table.dtype == torch.float32 and not table.requires_grad)


def supports(proj: Tensor, cos: Tensor | None) -> bool:
    """Whether :func:`split_heads` takes the kernel for these inputs: a CPU float32 projection
    ``(batch, length, width)`` and tables that need no gradient, torch >= 2.4, the kernels not
    ruled out. Pure: never builds the extension."""
    return (proj.device.type == "cpu" and proj.dtype == torch.float32 and proj.dim() == 3
            and constant_table(cos)
            and _extension.HAS_REGISTER_AUTOGRAD and _extension.usable())


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
        (where :func:`supports`), views from :func:`split_heads_reference` elsewhere.
    """
    if supports(proj, cos) and constant_table(sin) and _extension.load():
        q, k, v, gate = torch.ops.yaretnet.split_heads(proj, cos, sin, heads, key_dim)
        return q, k, v, gate
    return split_heads_reference(proj, cos, sin, heads, key_dim)


def register() -> None:
    """Shape-only forms and autograd of ``split_heads`` (called once the library is loaded)."""

    @_extension.register_fake("yaretnet::split_heads")
    def _(proj: Tensor, cos: Tensor | None, sin: Tensor | None, heads: int,
          key_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, length, width = proj.shape
        dv = (width - 2 * heads * key_dim) // (2 * heads)
        return (proj.new_empty(batch, heads, length, key_dim), proj.new_empty(batch, heads, length, key_dim),
                proj.new_empty(batch, heads, length, dv), proj.new_empty(batch, length, heads * dv))

    @_extension.register_fake("yaretnet::split_heads_backward")
    def _(dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, dgate: Tensor | None, cos: Tensor | None,
          sin: Tensor | None, batch: int, length: int, width: int, heads: int, key_dim: int) -> Tensor:
        like_any = next(t for t in (dq, dk, dv, dgate) if t is not None)
        return like_any.new_empty(batch, length, width)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        proj, cos, sin, heads, key_dim = inputs
        ctx.args = (*proj.shape, heads, key_dim)
        ctx.set_materialize_grads(False)  # the kernel takes a missing gradient as zeros
        ctx.save_for_backward(cos, sin)

    def backward(ctx: Any, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
                 dgate: Tensor | None) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        if all(g is None for g in (dq, dk, dv, dgate)):
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: the plain form's backward (a linear map)
            batch, length, width, heads, key_dim = ctx.args
            proj = torch.zeros(batch, length, width, dtype=torch.float32, requires_grad=True)
            outs = split_heads_reference(proj, cos, sin, heads, key_dim)
            used = [(o, g) for o, g in zip(outs, (dq, dk, dv, dgate), strict=True) if g is not None]
            (dproj,) = torch.autograd.grad([o for o, _ in used], proj, [g for _, g in used], create_graph=True)
            return dproj, None, None, None, None
        return torch.ops.yaretnet.split_heads_backward(dq, dk, dv, dgate, cos, sin, *ctx.args), None, None, None, None

    if _extension.HAS_REGISTER_AUTOGRAD:  # older torch uses the plain form
        torch.library.register_autograd("yaretnet::split_heads", backward, setup_context=setup)


# The previous layout's name, kept for its callers.
def split_heads_apply(proj: Tensor, cos: Tensor | None) -> bool:
    """:func:`supports`, and the extension loads (building it on the first call)."""
    return supports(proj, cos) and _extension.load()
