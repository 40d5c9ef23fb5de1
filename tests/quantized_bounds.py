"""Error bounds the quantized kernels' tests share (ops/cpu/csrc/quantized.cpp, int_dot.h)."""

from __future__ import annotations

import torch

from yet_another_retnet.ops.cpu.quantized import integer_dot

#: The quantized step against the dequantized forward: float32 rounding, or with integer dot
#: products every product's activations rounded to 16 bits (each value off by up to 2^-16 of its
#: vector's largest), compounded over the layers; a misplaced weight would be off by ~1e-1.
STEP_TOLERANCE = 5e-4 if integer_dot() else 2e-5


def activation_rounding(x: torch.Tensor, row_sums: torch.Tensor) -> torch.Tensor | float:
    """What rounding ``x`` ``(n, in)`` to 16-bit fixed point (one scale per row, each value off by
    at most ``max |x| / 65534``) can move a product whose weight rows have absolute sums
    ``row_sums`` ``(out,)``: ``(n, out)`` in float64, or 0 where the kernels take no integer dot
    products."""
    if not integer_dot():
        return 0.0
    return 1.01 * x.double().abs().amax(1, keepdim=True) / 65534 * row_sums.double()
