"""Weight-only int8 quantization: per-output-channel scales, and the products that read it.

A weight ``W`` ``(out, in)`` is stored as ``q`` int8 ``(out, in)`` and ``scale`` ``(out,)`` with
``W ~= q * scale[:, None]`` (symmetric, ``scale = max |W_row| / 127``): a quarter of float32's
bytes, and decoding is bound by the bytes of weights each token reads.

:func:`qlinear` is ``x @ W^T (+ bias) (+ residual)`` on that form. For the few rows of a decoding
step (up to :data:`KERNEL_MAX_ROWS`) it runs ``csrc/qgemv.cpp`` (int8 widened in registers, each
weight byte read once per step for the whole batch); for more rows (a prompt) it dequantizes the
weight and runs the float product (:func:`qlinear_reference`, also what the kernel is tested
against and the path wherever the extension is unavailable).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension
from .matmul import linear

__all__ = ["KERNEL_MAX_ROWS", "dequantize_int8", "qlinear", "qlinear_reference", "quantize_int8"]

#: The most rows :func:`qlinear` sends to the kernel; past this the dequantized matrix product
#: (compute-bound, on the BLAS) is the faster of the two.
KERNEL_MAX_ROWS = 32
_X_DTYPES = (torch.float32, torch.bfloat16)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(q int8 (out, in), scale float32 (out,))`` of ``weight`` ``(out, in)``, per output row:
    ``scale = max |row| / 127`` and ``q = round(row / scale)`` (an all-zero row gets scale 1)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("weight holds inf or NaN: it cannot be quantized")
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``q * scale[:, None]`` in ``dtype``: ``(out, in)`` (computed in float32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def qlinear_reference(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None,
                      residual: Tensor | None = None) -> Tensor:
    """:func:`qlinear` as dequantize-then-matmul (same arguments and result)."""
    return linear(x, dequantize_int8(q, scale, x.dtype), None if bias is None else bias.to(x.dtype), residual)


def qlinear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None,
            residual: Tensor | None = None) -> Tensor:
    """``x @ (q * scale[:, None])^T (+ bias) (+ residual)``.

    Args:
        x: ``(..., in)`` float32 or bfloat16.
        q: ``(out, in)`` int8; scale: ``(out,)`` per-row scales.
        bias: ``(out,)`` or ``None``; residual: ``(..., out)`` added, or ``None``.

    Returns ``(..., out)`` in ``x``'s dtype (float32 sums in the kernel).
    """
    rows = x.numel() // max(1, x.shape[-1])
    if (x.device.type == "cpu" and x.dtype in _X_DTYPES and q.dtype == torch.int8 and 0 < rows <= KERNEL_MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad) and _extension.load()):
        flat = x.reshape(rows, x.shape[-1])
        add = None if residual is None else residual.reshape(rows, -1)
        out = torch.ops.yaretnet.qlinear_int8(flat, q, scale, bias, add)
        return out.view(*x.shape[:-1], q.shape[0])
    return qlinear_reference(x, q, scale, bias, residual)

