"""Decoding steps (one token per row, inference only) as CPU kernels (``csrc/decode_step.cpp``).

:func:`retention_step` is a retention layer's core. From the fused projection of one token per
row, ``proj`` ``(batch, 2 h dk + 2 h dv)`` laid out ``[q | k | v | g]``, and each layer's memory
``S`` ``(batch, h, dk, dv)``::

    q, k = rotate(q), rotate(k) * dk ** -0.5          # xPos/RoPE-style pair rotation (optional)
    S'   = gamma S + k^T v                             # the new memory, per head
    out  = act(g) * head_norm(q S')                    # (batch, h dv): what the output projection reads

:func:`retention_step` picks the kernel where :func:`supports` (CPU float32/bfloat16 projections
with a float32 memory outside autograd); reference: :func:`retention_step_reference`, the same in
PyTorch ops: the path under ``torch.compile`` (inductor fuses it), on other devices and for
float64, without a C++ toolchain; both return the same values to float32 rounding.

:func:`decoder_layer_step` runs a whole pre-norm decoder layer for one token per row in one call (its
weights gathered once by :func:`layer_step_plan`): block
norm, the q/k/v/g product, the core, the output product and residual, block norm, the FFN and
its residual. Its reference is the decoder layer's own step in PyTorch ops
(:mod:`yet_another_retnet.models.retnet`). ``tests/cpu/test_decode_step.py`` checks both kernels
against float64 and their references.
Why one call: every matrix-vector product streams megabytes of weights through the caches, so
each small op after one starts cold (~20 us of cache misses for ~5 us of work, measured); a layer
in PyTorch ops is ~25 of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import triton as _triton
from ..backends import default_cuda_backend
from ..norms import key_scale, rms_normalize
from ..position import rotate_pairs
from ..triton.decode import step_with_gamma
from . import _extension

__all__ = ["KERNEL_MAX_ROWS", "LayerStepPlan", "ProductWeight", "decoder_layer_step", "layer_step_plan",
           "retention_step", "retention_step_reference", "supports"]

Activation = Callable[[Tensor], Tensor]
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
#: The most rows :func:`decoder_layer_step` takes. It streams the weights once per eight rows, so
#: past this PyTorch's matrix products (which read them once) win: at d 768, float32, 32 rows
#: 45.4 against 48.4 ms per step, 64 rows 82.4 against 72.1 (d 256: 1.94 / 2.42 and 3.99 / 3.63).
KERNEL_MAX_ROWS = 32
#: The activations the kernels know (gate and FFN), by the number they take for them (``None``: identity).
_KERNEL_ACTIVATIONS: dict[Activation | None, int] = {None: 0, F.silu: 1, F.gelu: 2, F.relu: 3}


def supports(proj: Tensor, memory: Tensor, norm_weight: Tensor | None, norm_bias: Tensor | None,
             act: Activation | None) -> bool:
    """Whether :func:`retention_step` takes the kernel: CPU float32 or bfloat16 ``proj``
    ``(batch, width)`` with a unit column stride, float32 ``memory``, norm parameters in ``proj``'s
    dtype, a gate activation the kernel knows, no autograd, the kernels not ruled out. Pure: never
    builds the extension."""
    return (act in _KERNEL_ACTIVATIONS and _kernel_inputs(proj, memory, norm_weight, norm_bias)
            and proj.dim() == 2 and proj.stride(-1) == 1 and _extension.usable())


def retention_step(proj: Tensor, memory: Tensor, rotation: Tensor | None, gamma: Tensor,
                   norm_weight: Tensor | None, norm_bias: Tensor | None, eps: float, rms_norm: bool,
                   act: Activation | None, in_place: bool = False) -> tuple[Tensor, Tensor]:
    """``(out (batch, h dv) in proj's dtype, new memory (batch, h, dk, dv))`` for one token per row.

    Args:
        proj: ``(batch, 2 h dk + 2 h dv)`` the fused q/k/v/g projection (unit column stride).
        memory: ``(batch, h, dk, dv)`` the layer's memory in the compute dtype; not modified.
        rotation: the rotation factors of this token, complex ``(batch, 2, 1, dk / 2)`` (query,
            then key including ``dk ** -0.5``) or their ``torch.view_as_real``; ``None`` without
            rotation (the key is then scaled by ``dk ** -0.5`` alone).
        gamma: ``(h, 1, 1)`` decays in the memory's dtype.
        norm_weight, norm_bias: ``(h dv,)`` the head norm's affine (``None`` for none).
        eps: the head norm's epsilon.
        rms_norm: RMS norm over each head instead of the group norm (with ``norm_weight`` if given).
        act: the gate activation (``None`` for identity).
        in_place: where the step runs the Triton kernel (CUDA), write the new memory over ``memory``
            and return it (the caller keeps no copy of the old one); elsewhere ignored: the new
            memory is a new tensor.
    """
    if supports(proj, memory, norm_weight, norm_bias, act) and _extension.load():
        out, new_memory = torch.ops.yaretnet.retention_step(proj, memory.contiguous(), _real(rotation),
                                                            gamma.reshape(-1), norm_weight, norm_bias, eps,
                                                            rms_norm, _KERNEL_ACTIVATIONS[act])
        return out, new_memory
    # CUDA: the state update and q S' in one Triton kernel (ops/triton/decode.py), the rest as below.
    fused = (proj.device.type == "cuda" and memory.dtype == torch.float32 and not torch.is_grad_enabled()
             and _triton.triton_available() and default_cuda_backend() != "torch"
             and memory.shape[2] <= _triton.MAX_KEY_DIM)
    return retention_step_reference(proj, memory, rotation, gamma, norm_weight, norm_bias, eps, rms_norm, act,
                                    triton_core=fused, in_place=in_place)


def retention_step_reference(proj: Tensor, memory: Tensor, rotation: Tensor | None, gamma: Tensor,
                             norm_weight: Tensor | None, norm_bias: Tensor | None, eps: float, rms_norm: bool,
                             act: Activation | None, *, triton_core: bool = False,
                             in_place: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`retention_step` in PyTorch ops (same arguments and results); with ``triton_core`` the
    memory update and ``q S'`` go through the Triton step kernel (CUDA, float32 memory), which with
    ``in_place`` (a contiguous memory) writes the new memory over ``memory`` and returns it."""
    batch, heads, dk, dv = memory.shape
    key_dim, value_dim = heads * dk, heads * dv
    qk = proj[:, : 2 * key_dim]
    v = proj[:, 2 * key_dim : 2 * key_dim + value_dim]
    if proj.dtype != memory.dtype:  # half weights: retention runs in float32
        qk, v = qk.to(memory.dtype), v.to(memory.dtype)
    if rotation is not None:
        # Rotating (a, b) pairs by an angle is a complex product: one op for q and k at once,
        # and the key's dk^-0.5 rides along in its factor.
        pairs = qk.view(batch, 2, heads, dk // 2, 2)
        if rotation.is_complex():
            qk = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
        else:  # the same product in reals, (..., 2) pairs: what a compiled step passes
            qk = rotate_pairs(pairs, *rotation.unbind(-1))
        q, k = qk.reshape(batch, 2, heads, dk).unbind(1)
    else:
        q, k = qk.view(batch, 2, heads, dk).unbind(1)
        k = k * key_scale(dk)
    if triton_core:  # k already carries dk^-0.5
        over = memory if in_place and memory.is_contiguous() else None
        y, new_memory = step_with_gamma(q.reshape(batch, heads, dk), k.reshape(batch, heads, dk),
                                        v.reshape(batch, heads, dv), memory, gamma.reshape(-1), 1.0, over)
        y = y.view(batch, value_dim)
    else:
        new_memory = torch.addcmul(memory * gamma, k.view(batch, heads, dk, 1), v.view(batch, heads, 1, dv))
        # bmm on flat views: matmul's broadcasting would add an expand, reshapes and a copy check.
        y = torch.bmm(q.reshape(batch * heads, 1, dk), new_memory.view(batch * heads, dk, dv))
        y = y.view(batch, value_dim)
    if not rms_norm:
        if y.dtype == proj.dtype:  # one fused op: per-head normalisation and the affine
            y = F.group_norm(y, heads, norm_weight, norm_bias, eps)
        else:
            y = F.group_norm(y, heads, None, None, eps).to(proj.dtype)
            y = torch.addcmul(norm_bias, y, norm_weight)  # type: ignore[arg-type]
    else:
        y = y.view(batch, heads, dv)
        y = rms_normalize(y, eps).to(proj.dtype)
        y = y.view(batch, value_dim)
        if norm_weight is not None:
            y = y * norm_weight
    gate = proj[:, 2 * key_dim + value_dim :]
    if act is not None:
        gate = act(gate)
    return gate * y, new_memory


class LayerStepPlan(NamedTuple):
    """What :func:`decoder_layer_step` reads besides the input, memory and rotation, in the kernel's
    argument order: built once per layer by :func:`layer_step_plan` (parameters are held by
    reference, so in-place updates reach the kernel)."""

    tensors: tuple[Tensor | list[Tensor] | None, ...]
    options: tuple[float | bool | int, ...]
    dtype: torch.dtype


#: A product's weight for :func:`layer_step_plan`: a dense matrix in the model's dtype, or the parts
#: of a quantized one (``ops/cpu/quantized.py``): ``(q int8, scale)`` or ``(packed uint8, scale, low)``,
#: the scales and lows float32.
ProductWeight = Tensor | tuple[Tensor, ...]


def _product_parts(weight: ProductWeight, dtype: torch.dtype) -> list[Tensor] | None:
    """The kernel's list of tensors for one product, or ``None`` where it cannot take them."""
    parts = [weight] if isinstance(weight, Tensor) else list(weight)
    if any(t.device.type != "cpu" for t in parts):
        return None
    if len(parts) == 1:
        return parts if parts[0].dtype == dtype else None
    kinds = {2: torch.int8, 3: torch.uint8}
    if kinds.get(len(parts)) != parts[0].dtype or any(t.dtype != torch.float32 for t in parts[1:]):
        return None
    return parts


def layer_step_plan(*, norm1: tuple[Tensor, Tensor | None], qkvg: tuple[ProductWeight, Tensor | None],
                    gamma: Tensor, head_norm: tuple[Tensor | None, Tensor | None],
                    out: tuple[ProductWeight, Tensor | None], norm2: tuple[Tensor, Tensor | None],
                    fc1: tuple[ProductWeight, Tensor | None], fc2: tuple[ProductWeight, Tensor | None],
                    block_eps: float, head_eps: float, block_rms: bool, head_rms: bool, gate_act: Activation | None,
                    ffn_act: Activation | None, glu: bool, residual_scale: float) -> LayerStepPlan | None:
    """A pre-norm decoder layer's weights for :func:`decoder_layer_step`, or ``None`` where the
    kernel cannot run them (not all on the CPU, norms and biases not all float32 or all bfloat16, a
    product in another dtype, an activation it does not know, no C++ toolchain).

    Args:
        norm1, norm2: ``(weight, bias or None)`` of the block norms before retention and FFN
            (``block_rms``: RMSNorm, weight only). Their dtype is the model's.
        qkvg: the stacked q/k/v/g projection ``((2 h dk + 2 h dv, d_model), bias)``.
        gamma: ``(h, 1, 1)`` float32 decays.
        head_norm: the head norm's ``(weight, bias)`` ``(h dv,)`` each (with ``head_rms``: a weight
            or ``None``, and no bias).
        out: the output projection ``((d_model, h dv), bias)``.
        fc1, fc2: the FFN's products, ``fc1`` ``(ffn, d_model)`` or for a GLU ``(2 ffn, d_model)``
            (fc1 and gate stacked), ``fc2`` ``(d_model, ffn)``.
        gate_act, ffn_act: the gate's and the FFN's activations (``None``: identity).
        residual_scale: what the residual is multiplied by (DeepNorm's alpha; 1 for the paper).

    Each product's weight is a :data:`ProductWeight`: dense in the model's dtype, or int8 or int4
    (a quantized model's layers, read by ``csrc/quantized.cpp``'s rows inside the same call).
    """
    dtype = norm1[0].dtype
    floats = (*norm1, qkvg[1], *head_norm, out[1], *norm2, fc1[1], fc2[1])  # all in the model's dtype
    products = [_product_parts(w, dtype) for w in (qkvg[0], out[0], fc1[0], fc2[0])]
    if (gate_act not in _KERNEL_ACTIVATIONS or ffn_act not in _KERNEL_ACTIVATIONS or dtype not in _KERNEL_DTYPES
            or gamma.dtype != torch.float32 or gamma.device.type != "cpu" or any(p is None for p in products)
            or any(t is not None and (t.dtype != dtype or t.device.type != "cpu") for t in floats)
            or not _extension.load()):
        return None
    tensors = (*norm1, products[0], qkvg[1], gamma.reshape(-1), *head_norm, products[1], out[1], *norm2,
               products[2], fc1[1], products[3], fc2[1])
    options = (block_eps, head_eps, block_rms, head_rms, _KERNEL_ACTIVATIONS[gate_act], _KERNEL_ACTIVATIONS[ffn_act],
               glu, residual_scale)
    return LayerStepPlan(tensors, options, dtype)


def decoder_layer_step(x: Tensor, memory: Tensor, rotation: Tensor | None, plan: LayerStepPlan,
                       in_place: bool = False) -> tuple[Tensor, Tensor] | None:
    """One token per row through a pre-norm decoder layer in one kernel call (each weight read
    once for up to eight rows: a small batch costs about what one row does).

    Args:
        x: ``(batch, d_model)`` the layer's input (the residual stream, not normed).
        memory: ``(batch, h, dk, dv)`` float32 memory; not modified unless ``in_place``.
        rotation: as for :func:`retention_step`.
        plan: the layer's :func:`layer_step_plan`.
        in_place: step ``memory`` where it is (contiguous; the op ``decoder_layer_step_inplace``)
            and return it as the new memory, instead of a new tensor.

    Returns ``(x_out (batch, d_model) in x's dtype, new memory (batch, h, dk, dv))``, or ``None``
    where the kernel does not apply to these inputs (no rows or more than :data:`KERNEL_MAX_ROWS`,
    another dtype or device, autograd on): the caller then steps in PyTorch ops.
    """
    if not 0 < x.shape[0] <= KERNEL_MAX_ROWS or x.dtype != plan.dtype or not _kernel_inputs(x, memory):
        return None
    if in_place:
        if not memory.is_contiguous():
            return None
        out = torch.ops.yaretnet.decoder_layer_step_inplace(x.contiguous(), memory, _real(rotation), *plan.tensors,
                                                            *plan.options)
        return out, memory
    return torch.ops.yaretnet.decoder_layer_step(x.contiguous(), memory.contiguous(), _real(rotation), *plan.tensors,
                                                 *plan.options)


def _kernel_inputs(x: Tensor, memory: Tensor, *params: Tensor | None) -> bool:
    """CPU float32/bfloat16 ``x``, float32 memory, parameters in ``x``'s dtype, no autograd."""
    return (x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and memory.dtype == torch.float32
            and not torch.is_grad_enabled()
            and all(p is None or (p.dtype == x.dtype and p.device.type == "cpu") for p in params))


def _real(rotation: Tensor | None) -> Tensor | None:
    """The kernels' rotation argument: float32 ``(batch, 2, dk / 2, 2)`` contiguous."""
    if rotation is None:
        return None
    return (torch.view_as_real(rotation) if rotation.is_complex() else rotation).contiguous()


def register() -> None:
    """The ops' shape-only forms (called once the library is loaded), so ``torch.compile`` and
    ``torch.library.opcheck`` can trace them."""

    @_extension.register_fake("yaretnet::retention_step")
    def _(proj: Tensor, memory: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        return proj.new_empty(memory.shape[0], memory.shape[1] * memory.shape[3]), torch.empty_like(memory)

    @_extension.register_fake("yaretnet::retention_step_inplace")
    def _(proj: Tensor, memory: Tensor, *args: Any) -> Tensor:
        return proj.new_empty(memory.shape[0], memory.shape[1] * memory.shape[3])

    @_extension.register_fake("yaretnet::decoder_layer_step")
    def _(x: Tensor, memory: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        return torch.empty_like(x), torch.empty_like(memory)

    @_extension.register_fake("yaretnet::decoder_layer_step_inplace")
    def _(x: Tensor, memory: Tensor, *args: Any) -> Tensor:
        return torch.empty_like(x)
