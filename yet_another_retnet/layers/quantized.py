"""A linear layer with int8 weights (per-output-channel scales): what a quantized model's
projections and head become (``models/quantized.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.quantized import dequantize_int8, qlinear, quantize_int8

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as int8 ``weight_int8`` ``(out, in)`` and float
    ``weight_scale`` ``(out,)`` (buffers, so they go to the state dict), inference only.

    ``weight`` is the dequantized matrix, made on each access in the scale's dtype: the code that
    runs a whole prompt reads it (one layer's worth at a time), the decoding step reads the int8
    form through :func:`~yet_another_retnet.ops.quantized.qlinear`.
    """

    weight_int8: Tensor
    weight_scale: Tensor
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype or torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """The int8 form of ``linear`` (its weight quantized per output row; bias kept)."""
        q, scale = quantize_int8(linear.weight)
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, weight.dtype)
        layer.weight_int8.copy_(q)
        layer.weight_scale.copy_(scale)
        if linear.bias is not None:
            assert layer.bias is not None
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``(out, in)`` in the scale's dtype (a fresh tensor)."""
        return dequantize_int8(self.weight_int8, self.weight_scale, self.weight_scale.dtype)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x`` ``(..., in)`` -> ``(..., out)`` (plus ``residual`` if given)."""
        return qlinear(x, self.weight_int8, self.weight_scale, self.bias, residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
