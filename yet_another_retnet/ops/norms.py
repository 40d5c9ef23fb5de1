"""The two normalisations inside retention, each written once: the key scale and the RMS norm.

Every form of retention (parallel, chunkwise, recurrent, the decoding step, the CPU kernels'
Python side) scales keys by :func:`key_scale` and, with ``head_norm="rmsnorm"``, normalises each
head's output with :func:`rms_normalize`; the block :class:`~yet_another_retnet.layers.feedforward.RMSNorm`
uses the same function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def key_scale(key_dim: int) -> float:
    """The factor on the keys, ``key_dim ** -0.5`` (the dot-product attention scale)."""
    return float(key_dim**-0.5)


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the last dim of ``x`` ``(..., dim)``, in ``x``'s dtype.

    No affine and no cast: callers widen half inputs first (float32; float64 stays float64) and
    cast back, so the rounding is theirs to choose.
    """
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
