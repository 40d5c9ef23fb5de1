"""The paper's feed-forward network, ``fc2(gelu(fc1 x))``, as one autograd node on CPU float32.

Forward: the two products (with their biases, if any) around one kernel pass that writes the GELU
and its slope ``Phi(h) + h phi(h)`` (``csrc/mlp.cpp``). Backward: the products' gradients
with the pre-activation's gradient as one multiply by the saved slope, where ``F.gelu``'s backward
recomputes erf and exp per element (its costliest element-wise op: ~0.8 ms per layer at 2 x 1,024
tokens, FFN 512). The slope is saved in place of the pre-activation, so the saved memory is the
same: the input, the GELU's output and the slope.

Reference: :func:`gelu_mlp_reference`, the same in PyTorch ops: the path everywhere else (other
devices, dtypes, autocast, ``torch.compile`` tracing, no C++ toolchain, ``YARETNET_FAST_PATH=0``),
what a double backward differentiates, and what ``tests/cpu/test_gelu_mlp.py`` checks the node against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _extension
from .matmul import grad_weight, linear, mm_nt

__all__ = ["gelu_mlp", "gelu_mlp_apply", "gelu_mlp_reference", "supports"]


def gelu_mlp_reference(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """``F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)``: the plain form of :func:`gelu_mlp`."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def supports(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the fused node takes these inputs: all CPU float32, a gradient to come (without one
    the slope would be written for nothing), outside autocast and ``torch.compile`` tracing, the
    kernels not ruled out. Pure: never builds the extension."""
    tensors = [t for t in (x, *params) if t is not None]
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and x.dim() >= 1 and not _extension.is_compiling() and not _extension.autocast_enabled("cpu")
            and _extension.usable())


class _GeluMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                residual: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        post, slope = torch.ops.yaretnet.gelu_slope(mm_nt(rows, w1, b1))
        ctx.save_for_backward(x, w1, b1, w2, b2, post, slope)
        add = None if residual is None else residual.reshape(-1, w2.shape[0])
        return mm_nt(post, w2, b2, add).view(*x.shape[:-1], w2.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w1, b1, w2, b2, post, slope = ctx.saved_tensors
        # The residual's gradient is the output's (its share of a sum).
        d_residual = grad if ctx.needs_input_grad[5] else None
        if torch.is_grad_enabled():  # create_graph=True: through the plain form
            grads = _extension.differentiable_grads(gelu_mlp_reference, [x, w1, b1, w2, b2], grad)
            return (*grads, d_residual)
        need_x, need_w1, need_b1, need_w2, need_b2, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        dw2 = grad_weight(g, post) if need_w2 else None
        db2 = g.sum(0) if need_b2 else None
        dpre = mm_nt(g, w2.t()).mul_(slope)  # a fresh product: multiplied in place
        dw1 = grad_weight(dpre, rows) if need_w1 else None
        db1 = dpre.sum(0) if need_b1 else None
        dx = mm_nt(dpre, w1.t()).view(x.shape) if need_x else None
        return dx, dw1, db1, dw2, db2, d_residual


def gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
             residual: Tensor | None = None) -> Tensor:
    """The two-matrix GELU feed-forward network, plus ``residual`` if given.

    Args:
        x: ``(..., embed_dim)``.
        w1, b1: ``(ffn_dim, embed_dim)`` and ``(ffn_dim,)`` or ``None``: the first projection.
        w2, b2: ``(embed_dim, ffn_dim)`` and ``(embed_dim,)`` or ``None``: the second.
        residual: ``(..., embed_dim)`` or ``None``: added to the output, inside the second
            product (:func:`ops.matmul.linear`).

    Returns:
        ``(..., embed_dim)``, differentiable in every tensor (twice through the plain form). The
        fused node where :func:`supports`; without autograd the GELU in place on the first
        product's fresh output; else :func:`gelu_mlp_reference`.
    """
    if supports(x, w1, b1, w2, b2, residual) and _extension.load():
        out: Tensor = _GeluMLP.apply(x, w1, b1, w2, b2, residual)
        return out
    if not torch.is_grad_enabled() and not _extension.is_compiling():
        # Inference (prefill): nothing is saved for a backward, so the activation overwrites
        # the product it reads (one buffer less to fault in and stream through).
        hidden = torch.ops.aten.gelu_(linear(x, w1, b1))
        return linear(hidden, w2, b2, residual)
    out = gelu_mlp_reference(x, w1, b1, w2, b2)
    return out if residual is None else residual + out


def register() -> None:
    """The shape-only form of ``gelu_slope`` (called once the library is loaded; the node's
    autograd is :class:`_GeluMLP`)."""

    @_extension.register_fake("yaretnet::gelu_slope")
    def _(x: Tensor) -> tuple[Tensor, Tensor]:
        return _extension.contiguous_like(x), _extension.contiguous_like(x)


# The previous layout's name, kept for its callers.
def gelu_mlp_apply(x: Tensor, *params: Tensor | None) -> bool:
    """:func:`supports`, and the extension loads (building it on the first call)."""
    return supports(x, *params) and _extension.load()
