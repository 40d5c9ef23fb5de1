"""The middle of a retention layer as one CPU kernel (``csrc/retention_core.cpp``): from the fused
projection ``[q | k | v | gate]`` to what enters the output projection.

For ``proj`` ``(batch, length, 2 h dk + 2 h dv)`` and ``length`` a whole number of chunks::

    q, k, v, z = split_heads(proj)                 # q and k rotated by position
    O, final   = chunkwise retention of q, k, v    # from the state prev, chunk by chunk
    y          = silu(z) * (GroupNorm_head(O) * weight + bias)     # (batch, length, h dv)

That is :func:`.split_heads.split_heads`, :func:`.chunk_kernels.chunk_retention` and
:func:`.norm_gate.norm_gate` in a row; on CPU float32 one kernel does all three per (batch, head),
each chunk's rows packed into cache once, and its backward writes the projection's gradient
directly, so none of the three intermediate layouts (heads, retained values, their gradients) is
streamed through memory and back.

Reference: :func:`retention_core_reference`, the three plain forms composed: the path everywhere
else, what a double backward differentiates, and what ``tests/cpu/test_retention_core.py`` checks the
kernel against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _extension
from .chunk_kernels import chunk_retention_reference, shapes_fit, walks_spread
from .norm_gate import norm_gate_reference
from .split_heads import constant_table, split_heads_reference

__all__ = ["retention_core", "retention_core_applies", "retention_core_reference", "supports"]


def retention_core_reference(
    proj: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
    chunk_decay: Tensor, prev: Tensor | None, norm_weight: Tensor, norm_bias: Tensor, eps: float, heads: int,
    key_dim: int, chunk: int,
) -> tuple[Tensor, Tensor]:
    """:func:`retention_core` as the three plain forms in a row. Returns ``(y, final)``."""
    q, k, v, gate = split_heads_reference(proj, cos, sin, heads, key_dim)
    length = q.shape[2]
    q, k, v = (t.unflatten(2, (length // chunk, chunk)) for t in (q, k, v))
    out, final = chunk_retention_reference(q, k, v, mask, query_decay, key_decay, chunk_decay, prev)
    return norm_gate_reference(out.flatten(2, 3), gate, norm_weight, norm_bias, eps), final


def supports(proj: Tensor, cos: Tensor | None, heads: int, key_dim: int, chunk: int, *tables: Tensor) -> bool:
    """Whether :func:`retention_core` takes the kernel: CPU float32, the length a whole number of
    chunks, ``chunk``, ``key_dim`` and the head width multiples of 32, constant tables, and the
    ``batch * heads`` walks spread evenly over the threads: the chunk kernels' conditions
    (:func:`.chunk_kernels.supports_chunk_retention`); torch >= 2.4, the kernels not ruled out.
    Pure: never builds the extension."""
    if not (proj.device.type == "cpu" and proj.dtype == torch.float32 and proj.dim() == 3):
        return False
    batch, length, width = proj.shape
    value_dim = (width - 2 * heads * key_dim) // 2
    if length == 0 or length % chunk or value_dim <= 0 or value_dim % heads:
        return False
    if cos is not None and (cos.dtype != torch.float32 or cos.requires_grad):
        return False
    return (walks_spread(batch * heads) and shapes_fit(chunk, key_dim, value_dim // heads, *tables)
            and _extension.HAS_REGISTER_AUTOGRAD and _extension.usable())


def retention_core(
    proj: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
    chunk_decay: Tensor, prev: Tensor | None, norm_weight: Tensor, norm_bias: Tensor, eps: float, heads: int,
    key_dim: int, chunk: int,
) -> tuple[Tensor, Tensor]:
    """Split, rotation, chunkwise retention, head norm and swish gate of a retention layer.

    Args:
        proj: ``(batch, length, 2 heads key_dim + 2 value_dim)``, columns ``[q | k | v | gate]``
            (keys unscaled: the scale lives in the tables); ``length`` a multiple of ``chunk``.
        cos, sin: ``(1 or batch, length, key_dim)`` rotation tables, or both ``None``.
        mask, query_decay, key_decay: ``(heads, 1, chunk, chunk)``, ``(heads, 1, chunk, 1)``,
            ``(heads, 1, chunk, 1)``: the chunk's decay tables (``ops/decay.py``'s ``ChunkTables``).
        chunk_decay: ``(heads,)``, ``gamma^chunk``.
        prev: ``(batch, heads, key_dim, head_dim)``, the state before the first token, or ``None``.
        norm_weight, norm_bias: ``(value_dim,)``, the head norm's affine; ``eps`` its epsilon.

    Returns:
        ``(y (batch, length, value_dim), final (batch, heads, key_dim, head_dim))``,
        differentiable in ``proj``, ``prev``, ``norm_weight`` and ``norm_bias``. One kernel call
        where :func:`supports` (and the norm and ``prev`` are float32), else
        :func:`retention_core_reference`.
    """
    tables = (mask, query_decay, key_decay, chunk_decay)
    if (supports(proj, cos, heads, key_dim, chunk, *tables) and constant_table(sin)
            and all(t.dtype == torch.float32 for t in (norm_weight, norm_bias))
            and (prev is None or prev.dtype == torch.float32) and _extension.load()):
        # The retained values and the states before each chunk are kept only for a backward.
        keep = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (proj, prev, norm_weight, norm_bias))
        y, final, _, _ = torch.ops.yaretnet.retention_core(proj, cos, sin, *tables, prev, norm_weight, norm_bias,
                                                           float(eps), heads, key_dim, chunk, keep)
        return y, final
    return retention_core_reference(proj, cos, sin, *tables, prev, norm_weight, norm_bias, eps, heads, key_dim, chunk)


def register() -> None:
    """Shape-only forms and autograd of ``retention_core`` (called once the library is loaded)."""
    like = _extension.contiguous_like

    @_extension.register_fake("yaretnet::retention_core")
    def _(proj: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor, query_decay: Tensor,
          key_decay: Tensor, chunk_decay: Tensor, prev: Tensor | None, norm_weight: Tensor, norm_bias: Tensor,
          eps: float, heads: int, key_dim: int, chunk: int, keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, length, width = proj.shape
        dv = (width - 2 * heads * key_dim) // (2 * heads)
        retained = proj.new_empty(batch, heads, length, dv) if keep else proj.new_empty(0)
        befores = proj.new_empty(batch, heads, length // chunk, key_dim, dv) if keep else proj.new_empty(0)
        return proj.new_empty(batch, length, heads * dv), proj.new_empty(batch, heads, key_dim, dv), retained, befores

    @_extension.register_fake("yaretnet::retention_core_backward")
    def _(grad: Tensor, grad_final: Tensor | None, proj: Tensor, cos: Tensor | None, sin: Tensor | None,
          retained: Tensor, befores: Tensor, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
          chunk_decay: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float, heads: int, key_dim: int,
          chunk: int, has_prev: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, _, _, dv = retained.shape
        dprev = proj.new_empty(batch, heads, key_dim, dv) if has_prev else proj.new_empty(0)
        return like(proj), dprev, like(norm_weight), like(norm_bias)

    def setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        proj, cos, sin, mask, query_decay, key_decay, chunk_decay, prev, weight, bias, eps, heads, key_dim, chunk, \
            keep = inputs
        if not keep:
            raise RuntimeError("retention_core: a backward needs keep=True")
        ctx.set_materialize_grads(False)  # the final state, in training, gets no gradient: None
        ctx.args = (eps, heads, key_dim, chunk)
        ctx.has_prev = prev is not None
        ctx.has_rotation = cos is not None
        ctx.save_for_backward(proj, output[2], output[3], mask, query_decay, key_decay, chunk_decay, weight, bias,
                              *([cos, sin] if cos is not None else []), *([prev] if prev is not None else []))

    def backward(ctx: Any, grad: Tensor | None, grad_final: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        proj, retained, befores, mask, query_decay, key_decay, chunk_decay, weight, bias, *rest = ctx.saved_tensors
        cos, sin = (rest[0], rest[1]) if ctx.has_rotation else (None, None)
        prev = rest[-1] if ctx.has_prev else None
        eps, heads, key_dim, chunk = ctx.args
        tables = (mask, query_decay, key_decay, chunk_decay)
        if torch.is_grad_enabled():  # create_graph=True: through the plain forms
            def reference(proj: Tensor, prev: Tensor | None, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
                return retention_core_reference(proj, cos, sin, *tables, prev, weight, bias, eps, heads, key_dim,
                                                chunk)

            dproj, dprev, dweight, dbias = _extension.differentiable_grads(reference, [proj, prev, weight, bias],
                                                                           (grad, grad_final))
        else:
            if grad is None:
                grad = proj.new_zeros(proj.shape[0], proj.shape[1], weight.shape[0])
            dproj, dprev, dweight, dbias = torch.ops.yaretnet.retention_core_backward(
                grad, grad_final, proj, cos, sin, retained, befores, *tables, weight, bias, eps, heads, key_dim,
                chunk, ctx.has_prev)
        return (dproj, None, None, None, None, None, None, dprev if ctx.has_prev else None, dweight, dbias,
                None, None, None, None, None)

    if _extension.HAS_REGISTER_AUTOGRAD:  # older torch uses the plain forms
        torch.library.register_autograd("yaretnet::retention_core", backward, setup_context=setup)


# The previous layout's name, kept for its callers.
def retention_core_applies(proj: Tensor, cos: Tensor | None, heads: int, key_dim: int, chunk: int,
                           *tables: Tensor) -> bool:
    """:func:`supports`, and the extension loads (building it on the first call)."""
    return supports(proj, cos, heads, key_dim, chunk, *tables) and _extension.load()
