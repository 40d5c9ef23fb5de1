"""Weight-only quantization: int8 with per-output-channel scales, int4 with per-group scales, and
the products that read them.

A weight ``W`` ``(out, in)`` is stored as ``q`` int8 ``(out, in)`` and ``scale`` ``(out,)`` with
``W ~= q * scale[:, None]`` (symmetric, ``scale = max |W_row| / 127``): a quarter of float32's
bytes, and decoding is bound by the bytes of weights each token reads.

:func:`qlinear` is ``x @ W^T (+ bias) (+ residual)`` on that form. For the few rows of a decoding
step (up to :data:`KERNEL_MAX_ROWS`) it runs ``csrc/quantized.cpp`` (each weight byte read once per
step for the whole batch; int8 widened in registers, and with AVX512-VNNI integer dot products against
the activations rounded to 16 bits: :func:`integer_dot`); for more rows (a prompt) it dequantizes the
weight and runs the float product (:func:`qlinear_reference`, the reference: what the kernel is
tested against in tests/models/test_quantized.py and tests/cpu/test_quantized_int4.py, and the
path wherever the extension is unavailable). :func:`supports` says whether a call takes the kernel.

int4 (:func:`quantize_int4`) cuts each row into groups of ``group_size`` consecutive input columns
(a multiple of 32), each with its own ``scale`` and ``low``: ``W[r, c] ~= code * scale + low`` with
``code`` in 0..15 (asymmetric: ``low`` is the group's minimum, ``scale = (max - min) / 15``). Two
codes share a byte; within each block of 32 columns, byte ``k`` holds column ``k`` in its low nibble
and column ``k + 16`` in its high one, so one 16-byte load widens into two runs of 16 consecutive
columns. A row whose width is not a multiple of the group is padded by repeating its last column
(which moves no group's range); the kernel meets the padding with zeros of ``x``. :func:`qlinear_int4` runs ``csrc/quantized.cpp``'s int4 kernel for up to
:data:`KERNEL_MAX_ROWS` rows (each packed byte read once per step), the dequantized product
(:func:`qlinear_int4_reference`) otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _extension
from .matmul import linear

__all__ = ["INT4_GROUP_SIZES", "KERNEL_MAX_ROWS", "dequantize_int4", "dequantize_int8", "integer_dot",
           "interleave_int4", "qlinear", "qlinear_int4",
           "qlinear_int4_reference", "qlinear_reference", "quantize_int4", "quantize_int8", "supports"]

#: The most rows :func:`qlinear` sends to the kernel; past this the dequantized matrix product
#: (compute-bound, on the BLAS) is the faster of the two.
KERNEL_MAX_ROWS = 32
_X_DTYPES = (torch.float32, torch.bfloat16)
#: The group sizes int4 accepts (input columns per scale): multiples of the 32-column packing block.
INT4_GROUP_SIZES = (32, 64, 128, 256)


def integer_dot() -> bool:
    """Whether the kernels take integer dot products (the extension built with AVX512-VNNI): the
    activations are then rounded to 16-bit fixed point once per call, one scale per vector (each
    value off by at most ``max |x| / 65534``), and summed exactly in int32 against the int8 or int4
    weights (``csrc/int_dot.h``). ``False`` without the extension."""
    return bool(_extension.load() and torch.ops.yaretnet.quantized_integer_dot())


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


def supports(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`qlinear` (``weight`` int8) or :func:`qlinear_int4` (``weight`` packed uint8)
    takes the kernel for ``x`` ``(..., in)``: CPU float32 or bfloat16, 1 to :data:`KERNEL_MAX_ROWS`
    rows, outside autograd, the kernels not ruled out. Pure: never builds the extension."""
    rows = x.numel() // max(1, x.shape[-1])
    return (x.device.type == "cpu" and x.dtype in _X_DTYPES and weight.dtype in (torch.int8, torch.uint8)
            and 0 < rows <= KERNEL_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad)
            and _extension.usable())


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



# --------------------------------------------------------------------------------------------
# int4, per group
# --------------------------------------------------------------------------------------------


def _check_group(group_size: object) -> int:
    if group_size not in INT4_GROUP_SIZES or isinstance(group_size, bool):
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    return int(group_size)


def quantize_int4(weight: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """``(packed uint8 (out, padded / 2), scale float32 (out, groups), low float32 (out, groups))``
    of ``weight`` ``(out, in)``: ``padded`` is ``in`` rounded up to a multiple of ``group_size``
    and ``groups = padded / group_size``. Per group: ``low = min``, ``scale = (max - min) / 15``
    (1 for a constant group), ``code = round((w - low) / scale)`` in 0..15; packing as the module
    docstring says."""
    group = _check_group(group_size)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds inf or NaN: it cannot be quantized")
    out, cols = w.shape
    groups = max(1, -(-cols // group))
    padded = groups * group
    # The padding repeats each row's last column, so it changes no group's minimum or maximum.
    if padded != cols:
        w = torch.cat([w, w[:, -1:].expand(out, padded - cols)], dim=1) if cols else w.new_zeros(out, padded)
    g = w.view(out, groups, group)
    low, high = g.amin(dim=2), g.amax(dim=2)
    # max - min of finite float32 values can overflow float32 (+-2e38 in one group): its codes would
    # dequantize to inf and NaN. Refused rather than stored.
    span = high.double() - low.double()
    if bool((span > torch.finfo(torch.float32).max).any()):
        row, grp = (int(i) for i in torch.nonzero(span > torch.finfo(torch.float32).max)[0])
        raise ValueError(f"weight row {row}, group {grp}: its values span {float(span[row, grp]):.3g}, beyond "
                         f"float32's range: it cannot be quantized to int4")
    scale = (high - low) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((g - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)
    blocks = codes.view(out, padded // 32, 2, 16)
    packed = (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out, padded // 2)
    return packed.contiguous(), scale.contiguous(), low.contiguous()


def _int4_codes(packed: Tensor) -> Tensor:
    """The codes ``(out, padded)`` (uint8, 0..15) of ``packed`` ``(out, padded / 2)``."""
    out = packed.shape[0]
    blocks = packed.reshape(out, -1, 16)  # reshape: packed may be a strided view (interleave_int4)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(out, -1)


def dequantize_int4(packed: Tensor, scale: Tensor, low: Tensor, in_features: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """``code * scale + low`` in ``dtype``, the first ``in_features`` columns: ``(out, in)``
    (computed in float32; float64 when ``dtype`` is float64)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    out, groups = scale.shape
    codes = _int4_codes(packed).to(work).view(out, groups, -1)
    w = codes * scale.to(work)[..., None] + low.to(work)[..., None]
    return w.view(out, -1)[:, :in_features].to(dtype)


def interleave_int4(packed: Tensor, scale: Tensor, low: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The same int4 weight with each row's scales, lows and codes side by side in one buffer:
    ``(packed, scale, low)`` views of it, equal to the arguments (scale and low in float32), that
    :func:`qlinear_int4` and the decoding kernels read where they are.

    Why: stored apart, a product's rows stream through memory as three (codes, scales, lows),
    and the kernel's four row streams a thread become twelve, which read markedly slower than four
    (measured in docs/performance.md). Interleaved, a row is one stream. Each row
    is ``[scale (groups) | low (groups) | codes (padded / 2)]`` float32, float32, uint8, the codes
    starting on a 64-byte line and the rows a whole number of lines long.
    """
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"interleave_int4: packed must be a 2-D uint8 tensor, got {tuple(packed.shape)} {packed.dtype}")
    if scale.dim() != 2 or scale.shape != low.shape or scale.shape[0] != packed.shape[0] or scale.shape[1] == 0:
        raise ValueError(f"interleave_int4: scale and low must both be ({packed.shape[0]}, groups), got "
                         f"{tuple(scale.shape)} and {tuple(low.shape)}")
    rows, half = packed.shape
    groups = scale.shape[1]
    header = -(-8 * groups // 64) * 64
    width = -(-(header + half) // 64) * 64
    buffer = torch.zeros(rows, width, dtype=torch.uint8, device=packed.device)
    scale_view = buffer[:, : 4 * groups].view(torch.float32)
    low_view = buffer[:, 4 * groups: 8 * groups].view(torch.float32)
    codes_view = buffer[:, header: header + half]
    scale_view.copy_(scale)
    low_view.copy_(low)
    codes_view.copy_(packed)
    return codes_view, scale_view, low_view


def qlinear_int4_reference(x: Tensor, packed: Tensor, scale: Tensor, low: Tensor, bias: Tensor | None = None,
                           residual: Tensor | None = None) -> Tensor:
    """:func:`qlinear_int4` as dequantize-then-matmul (same arguments and result)."""
    w = dequantize_int4(packed, scale, low, x.shape[-1], x.dtype)
    return linear(x, w, None if bias is None else bias.to(x.dtype), residual)


def qlinear_int4(x: Tensor, packed: Tensor, scale: Tensor, low: Tensor, bias: Tensor | None = None,
                 residual: Tensor | None = None) -> Tensor:
    """``x @ W^T (+ bias) (+ residual)`` with ``W`` the int4 form of :func:`quantize_int4`.

    Args:
        x: ``(..., in)`` float32 or bfloat16.
        packed: ``(out, padded / 2)`` uint8; scale, low: ``(out, groups)``.
        bias: ``(out,)`` or ``None``; residual: ``(..., out)`` added, or ``None``.

    Returns ``(..., out)`` in ``x``'s dtype (float32 sums in the kernel).
    """
    cols = x.shape[-1]
    padded = packed.shape[-1] * 2
    groups = scale.shape[-1] if scale.dim() == 2 else 0
    if (packed.dim() != 2 or packed.dtype != torch.uint8 or scale.shape != low.shape or groups == 0
            or padded % groups or not padded - padded // groups < cols <= padded):
        raise ValueError(f"qlinear_int4: packed {tuple(packed.shape)} {packed.dtype}, scale {tuple(scale.shape)} and "
                         f"low {tuple(low.shape)} do not form an int4 weight for {cols} input columns")
    rows = x.numel() // max(1, cols)
    if (x.device.type == "cpu" and x.dtype in _X_DTYPES and 0 < rows <= KERNEL_MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad) and _extension.load()):
        flat = x.reshape(rows, cols)
        add = None if residual is None else residual.reshape(rows, -1)
        out = torch.ops.yaretnet.qlinear_int4(flat, packed, scale, low, bias, add)
        return out.view(*x.shape[:-1], packed.shape[0])
    return qlinear_int4_reference(x, packed, scale, low, bias, residual)


def register() -> None:
    """The products' shape-only forms (called once the library is loaded), so ``torch.compile``
    and ``torch.library.opcheck`` can trace them: ``(rows, out_features)`` in ``x``'s dtype."""

    @_extension.register_fake("yaretnet::qlinear_int8")
    def _(x: Tensor, weight: Tensor, *args: Any) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    @_extension.register_fake("yaretnet::qlinear_int4")
    def _(x: Tensor, packed: Tensor, *args: Any) -> Tensor:
        return x.new_empty(x.shape[0], packed.shape[0])
