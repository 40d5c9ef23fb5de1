"""Block norms and feed-forward networks of a RetNet decoder layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.cpu.matmul import linear
from ..ops.cpu.mlp import gelu_mlp
from ..ops.norms import rms_normalize

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "swish": F.silu, "silu": F.silu, "relu": F.relu}
FFN_KINDS = ("mlp", "glu")
BLOCK_NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 (float64 for float64 inputs)."""

    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # float32 for half precision, but float64 stays float64 (``.float()`` would round it).
        xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return rms_normalize(xf, self.eps).to(x.dtype) * self.weight


def build_norm(kind: str, dim: int, eps: float, bias: bool = True, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """``"layernorm"`` (weight and, with ``bias``, bias) or ``"rmsnorm"`` (weight only)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias, device=device, dtype=dtype)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    raise ValueError(f"block_norm must be one of {BLOCK_NORMS}, got {kind!r}")


class FeedForward(nn.Module):
    """The paper's MLP ``fc2(act(fc1 x))`` or torchscale's GLU ``fc2(act(fc1 x) * gate x)``.

    Input and output ``(..., embed_dim)``; the hidden width is ``ffn_dim``.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, kind: str = "mlp", activation: str = "gelu",
                 bias: bool = False, activation_dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kind not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {kind!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        kw = {"device": device, "dtype": dtype}
        self.kind = kind
        self.activation = activation
        self.activation_dropout = activation_dropout
        self.fc1 = nn.Linear(embed_dim, ffn_dim, bias=bias, **kw)
        self.fc2 = nn.Linear(ffn_dim, embed_dim, bias=bias, **kw)
        self.gate = nn.Linear(embed_dim, ffn_dim, bias=bias, **kw) if kind == "glu" else None

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x`` ``(..., embed_dim)`` -> the same shape, plus ``residual`` if given (a block's
        skip connection, added inside the second product where it can: ``ops.matmul.linear``)."""
        if (self.gate is None and self.activation == "gelu"
                and (self.activation_dropout == 0.0 or not self.training)):
            # One autograd node with the GELU's slope saved (ops/cpu/mlp.py) where it applies.
            return gelu_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, residual)
        h = ACTIVATIONS[self.activation](linear(x, self.fc1.weight, self.fc1.bias))
        if self.gate is not None:
            h = h * linear(x, self.gate.weight, self.gate.bias)
        h = F.dropout(h, p=self.activation_dropout, training=self.training)
        return linear(h, self.fc2.weight, self.fc2.bias, residual)
