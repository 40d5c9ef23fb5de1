"""The head norm and swish gate that end a retention layer, as one CPU kernel (``csrc/norm_gate.cpp``).

For the retained values ``x`` ``(batch, heads, length, head_dim)`` and the gate's pre-activation
``z`` ``(batch, length, heads * head_dim)``::

    out = silu(z) * (layer_norm(x over head_dim) * weight + bias)     # (batch, length, heads * head_dim)

the paper's GroupNorm (one group per head) with its affine, then the swish gate; what goes into
the output projection. On CPU float32 (head_dim a multiple of 16) one kernel reads each row once
and writes the result in the projection's layout, forward and backward (the weight and bias
gradients as per-thread partial sums).

Reference: :func:`norm_gate_reference`, the same in PyTorch ops: the path everywhere else (other
devices and dtypes, no C++ toolchain, torch < 2.4, ``YARETNET_FAST_PATH=0``), what a double
backward differentiates, and what ``tests/cpu/test_norm_gate.py`` checks the kernel against.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..retention import compute_dtype
from . import _extension

__all__ = ["head_group_norm", "norm_gate", "norm_gate_apply", "norm_gate_reference", "supports"]

#: The kernel's vector width: head_dim must be a multiple of it.
_LANES = 16


def head_group_norm(retained: Tensor, weight: Tensor, bias: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Per-head LayerNorm with affine: ``(b, h, L, dv)`` -> ``(b, L, h * dv)`` in ``dtype``.

    The normalisation runs in float32 for half inputs and in float64 for float64 ones (``.float()``
    would silently drop a float64 layer to float32 precision).
    """
    batch, heads, length, dv = retained.shape
    y = F.layer_norm(retained.transpose(1, 2).to(compute_dtype(retained.dtype)), (dv,), eps=eps).to(dtype)
    # One fused op for the affine. (F.group_norm would do norm and affine in one call, but measured
    # slower on CPU than layer_norm + addcmul, forward plus backward.)
    return torch.addcmul(bias, y.reshape(batch, length, heads * dv), weight)


def norm_gate_reference(retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor, eps: float,
                        dtype: torch.dtype | None = None) -> Tensor:
    """``silu(gate) * head_group_norm(retained)``: the plain form of :func:`norm_gate`."""
    return F.silu(gate) * head_group_norm(retained, weight, bias, eps, dtype or retained.dtype)


def supports(retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether :func:`norm_gate` takes the kernel for these inputs: all CPU float32, ``retained``
    4-D with ``head_dim`` a multiple of 16, ``dtype`` float32 or ``None``, torch >= 2.4, the
    kernels not ruled out. Pure: never builds the extension."""
    return (dtype in (None, torch.float32) and retained.dim() == 4 and retained.shape[-1] % _LANES == 0
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (retained, gate, weight, bias))
            and _extension.HAS_REGISTER_AUTOGRAD and _extension.usable())


def norm_gate(retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor, eps: float,
              dtype: torch.dtype | None = None) -> Tensor:
    """The head norm and swish gate of a retention layer.

    Args:
        retained: ``(batch, heads, length, head_dim)``, any strides.
        gate: ``(batch, length, heads * head_dim)``, the gate projection before its activation.
        weight, bias: ``(heads * head_dim,)``, the norm's affine.
        eps: the norm's epsilon.
        dtype: the normalised values' dtype before the affine (default ``retained.dtype``).

    Returns:
        ``(batch, length, heads * head_dim)``, differentiable in all four tensors. The kernel where
        :func:`supports`, else :func:`norm_gate_reference`.
    """
    if supports(retained, gate, weight, bias, dtype) and _extension.load():
        return torch.ops.yaretnet.norm_gate(retained, gate, weight, bias, float(eps))
    return norm_gate_reference(retained, gate, weight, bias, eps, dtype)


def register() -> None:
    """Shape-only forms and autograd of ``norm_gate`` (called once the library is loaded)."""
    like = _extension.contiguous_like

    @_extension.register_fake("yaretnet::norm_gate")
    def _(retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return like(gate)

    @_extension.register_fake("yaretnet::norm_gate_backward")
    def _(grad: Tensor, retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor,
          eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return like(retained), like(gate), like(weight), like(bias)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        retained, gate, weight, bias, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(retained, gate, weight, bias)

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        retained, gate, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            def reference(x: Tensor, z: Tensor, w: Tensor, b: Tensor) -> Tensor:
                return norm_gate_reference(x, z, w, b, ctx.eps)

            return (*_extension.differentiable_grads(reference, [retained, gate, weight, bias], grad), None)
        return (*torch.ops.yaretnet.norm_gate_backward(grad, retained, gate, weight, bias, ctx.eps), None)

    if _extension.HAS_REGISTER_AUTOGRAD:  # older torch uses the plain form
        torch.library.register_autograd("yaretnet::norm_gate", backward, setup_context=setup)


# The previous layout's name, kept for its callers.
def norm_gate_apply(retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor) -> bool:
    """:func:`supports`, and the extension loads (building it on the first call)."""
    return supports(retained, gate, weight, bias) and _extension.load()
