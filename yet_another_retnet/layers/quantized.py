"""Linear layers with int8 weights (per-output-channel scales) or int4 weights (per-group scales):
what a quantized model's projections and head become (``models/quantized.py``).

Both hold their weight as row-wise buffers (:meth:`qparams`: each a tensor with one row per output
channel, so the rows of several layers stack into one product) and run them through
:meth:`product`. Their scales (and int4's lows) stay float32 whatever the model's dtype: cast with
the model, a scale would lose what the kernels read it for (float16 turns the scales of rows whose
weights are all under ~1e-2 subnormal, measured up to 28% off in a product; bfloat16 rounds
each by up to 2^-9, a whole row off together)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.cpu.quantized import (
    dequantize_int4,
    dequantize_int8,
    qlinear,
    qlinear_int4,
    quantize_int4,
    quantize_int8,
)

__all__ = ["Int4Linear", "QuantizedLinear"]


class _RowQuantized(nn.Module):
    """What both quantized layers share: float32 scales through every cast, and ``float_like``, an
    empty tensor in the layer's float dtype (the model's: its bias, its dequantized ``weight``) on
    its device, which casts and moves with the model."""

    #: The buffers kept in float32 through ``.to()``, ``.half()`` and loading.
    _FLOAT32: tuple[str, ...] = ("weight_scale",)
    float_like: Tensor
    bias: nn.Parameter | None

    def _register_float_like(self, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        # Not in the state dict: the model's dtype is its embedding's (models/quantized.py sets it
        # on load).
        self.register_buffer("float_like", torch.empty(0, dtype=dtype or torch.float32, device=device),
                             persistent=False)

    def _apply(self, fn: Any, recurse: bool = True) -> _RowQuantized:
        kept = {name: self._buffers[name] for name in self._FLOAT32}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            if before is not None and after is not None and after.dtype != torch.float32:
                self._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        return self

    def qparams(self) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _take(self, linear: nn.Linear, parts: tuple[Tensor, ...]) -> None:
        """The quantized ``parts`` of ``linear``'s weight into the row-wise buffers (in
        :meth:`qparams`' order), and its bias."""
        with torch.no_grad():
            for buffer, part in zip(self.qparams(), parts, strict=True):
                buffer.copy_(part)
            if linear.bias is not None:
                assert self.bias is not None
                self.bias.copy_(linear.bias)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A file saved before the scales stayed float32 holds them in the model's dtype.
        for name in self._FLOAT32:
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                state_dict[prefix + name] = t.float()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantizedLinear(_RowQuantized):
    """``y = x W^T + b`` with ``W`` held as int8 ``weight_int8`` ``(out, in)`` and float32
    ``weight_scale`` ``(out,)`` (buffers, so they go to the state dict), inference only.

    ``weight`` is the dequantized matrix, made on each access in the layer's float dtype
    (``float_like``'s, the model's): the code that runs a whole prompt reads it (one layer's worth
    at a time), the decoding step reads the int8 form through
    :func:`~yet_another_retnet.ops.cpu.quantized.qlinear`.
    """

    weight_int8: Tensor
    weight_scale: Tensor
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._register_float_like(dtype, device)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """The int8 form of ``linear`` (its weight quantized per output row; bias kept)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device, weight.dtype)
        layer._take(linear, quantize_int8(weight))
        return layer

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``(out, in)`` in the layer's float dtype (a fresh tensor)."""
        return dequantize_int8(self.weight_int8, self.weight_scale, self.float_like.dtype)

    def qparams(self) -> tuple[Tensor, ...]:
        """The weight's row-wise buffers: ``(int8 (out, in), scale (out,))``."""
        return self.weight_int8, self.weight_scale

    @staticmethod
    def product(x: Tensor, params: tuple[Tensor, ...], bias: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        """``x`` ``(..., in)`` times the weight given by ``params`` (:meth:`qparams`, or several
        layers' stacked by rows), ``(..., rows)``."""
        return qlinear(x, params[0], params[1], bias, residual)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x`` ``(..., in)`` -> ``(..., out)`` (plus ``residual`` if given)."""
        return qlinear(x, self.weight_int8, self.weight_scale, self.bias, residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


class Int4Linear(_RowQuantized):
    """``y = x W^T + b`` with ``W`` held as int4: ``weight_int4`` uint8 ``(out, padded / 2)`` (two
    codes a byte), float32 ``weight_scale`` and ``weight_low`` ``(out, groups)`` per group of
    ``group_size`` input columns (:func:`~yet_another_retnet.ops.cpu.quantized.quantize_int4`);
    inference only. ``weight`` is the dequantized matrix, made on each access (as for
    :class:`QuantizedLinear`)."""

    _FLOAT32 = ("weight_scale", "weight_low")
    weight_int4: Tensor
    weight_scale: Tensor
    weight_low: Tensor
    bias: nn.Parameter | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = max(1, -(-in_features // group_size))
        self.register_buffer("weight_int4", torch.zeros(out_features, groups * group_size // 2, dtype=torch.uint8,
                                                        device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_low", torch.zeros(out_features, groups, dtype=torch.float32, device=device))
        self._register_float_like(dtype, device)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        """The int4 form of ``linear`` (groups of ``group_size`` input columns; bias kept)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, weight.device,
                    weight.dtype)
        layer._take(linear, quantize_int4(weight, group_size))
        return layer

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``(out, in)`` in the layer's float dtype (a fresh tensor)."""
        return dequantize_int4(self.weight_int4, self.weight_scale, self.weight_low, self.in_features,
                               self.float_like.dtype)

    def qparams(self) -> tuple[Tensor, ...]:
        """The weight's row-wise buffers: ``(packed (out, padded / 2), scale, low (out, groups))``."""
        return self.weight_int4, self.weight_scale, self.weight_low

    @staticmethod
    def product(x: Tensor, params: tuple[Tensor, ...], bias: Tensor | None = None,
                residual: Tensor | None = None) -> Tensor:
        """As :meth:`QuantizedLinear.product`, for int4 ``params``."""
        return qlinear_int4(x, params[0], params[1], params[2], bias, residual)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x`` ``(..., in)`` -> ``(..., out)`` (plus ``residual`` if given)."""
        return qlinear_int4(x, self.weight_int4, self.weight_scale, self.weight_low, self.bias, residual)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4, group_size={self.group_size}")
