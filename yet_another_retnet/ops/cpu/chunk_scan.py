"""The state before every chunk of chunkwise retention, as a scan (``csrc/chunk_scan.cpp``).

With ``R_i`` what chunk ``i`` alone adds to the state and ``d = gamma^c``::

    before_0 = prev (or 0),   before_{i+1} = d * before_i + R_i,   final = before_n

The fast chunkwise form (:mod:`yet_another_retnet.ops.retention`) computes ``before`` as one
``(n x n)`` decay-matrix product per head: right for GPUs and float64, but on the CPU it is ``n``
times the work of the scan. :func:`chunk_scan` runs the C++ scan (forward and backward) for CPU
float32.

Reference: the decay-matrix product in :func:`yet_another_retnet.ops.retention.retention_chunkwise`
(the path everywhere else); ``tests/cpu/test_chunk_scan.py`` checks the kernel against it and a
float64 loop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _extension

__all__ = ["chunk_scan", "chunk_scan_applies", "chunk_scan_kernel_available", "supports"]


def supports(contributions: Tensor, decay: Tensor) -> bool:
    """Whether :func:`chunk_scan` takes these inputs: CPU float32 with a constant decay, torch
    >= 2.4 (for the backward), the kernels not ruled out. Pure: never builds the extension."""
    return (contributions.device.type == "cpu" and contributions.dtype == torch.float32
            and decay.dtype == torch.float32 and not decay.requires_grad
            and _extension.HAS_REGISTER_AUTOGRAD and _extension.usable())


def chunk_scan(contributions: Tensor, decay: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(befores, final)`` of the recurrence above, differentiable in ``contributions`` and ``prev``.

    Args:
        contributions: ``(batch, heads, n, size)``, ``R_i`` flattened (``size = dk * dv``).
        decay: ``(heads,)``, ``gamma^c`` per head.
        prev: ``(batch, heads, size)`` or ``None`` (a zero state).

    Returns:
        ``befores`` ``(batch, heads, n, size)`` (the state before each chunk) and ``final``
        ``(batch, heads, size)``. Only for inputs where :func:`supports` (the caller keeps the
        matrix form for the rest).
    """
    if not chunk_scan_kernel_available():
        raise RuntimeError("chunk_scan: the C++ extension is unavailable here (see chunk_scan.supports)")
    befores, final = torch.ops.yaretnet.chunk_scan(contributions, decay, prev)
    return befores, final


def register() -> None:
    """Shape-only forms and autograd of ``chunk_scan`` and its backward (called once the library
    is loaded)."""

    @_extension.register_fake("yaretnet::chunk_scan")
    def _(contributions: Tensor, decay: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        batch, heads, _, size = contributions.shape
        return torch.empty_like(contributions, memory_format=torch.contiguous_format), \
            contributions.new_empty(batch, heads, size)

    @_extension.register_fake("yaretnet::chunk_scan_backward")
    def _(grad_befores: Tensor, grad_final: Tensor, decay: Tensor, has_prev: bool) -> tuple[Tensor, Tensor]:
        batch, heads, _, size = grad_befores.shape
        return (torch.empty_like(grad_befores, memory_format=torch.contiguous_format),
                grad_befores.new_empty((batch, heads, size) if has_prev else (0,)))

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        contributions, decay, prev = inputs
        ctx.set_materialize_grads(False)  # the backward fills in what it needs
        ctx.save_for_backward(decay)
        ctx.has_prev = prev is not None
        ctx.shape = contributions.shape

    def backward(ctx: Any, grad_befores: Tensor | None, grad_final: Tensor | None) -> tuple[Tensor | None, ...]:
        (decay,) = ctx.saved_tensors
        batch, heads, n, size = ctx.shape
        if grad_befores is None:
            grad_befores = decay.new_zeros(batch, heads, n, size)
        if grad_final is None:
            grad_final = decay.new_zeros(batch, heads, size)
        grad_contributions, grad_prev = torch.ops.yaretnet.chunk_scan_backward(
            grad_befores, grad_final, decay, ctx.has_prev)
        return grad_contributions, None, (grad_prev if ctx.has_prev else None)  # decay: a constant table

    # The scan's backward is the transpose of a linear map, so its own backward (for a double
    # backward) is the forward scan again.
    def scan_backward_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        grad_befores, _, decay, has_prev = inputs
        ctx.save_for_backward(decay)
        ctx.has_prev = has_prev
        ctx.shape = grad_befores.shape

    def scan_backward_backward(ctx: Any, gg_contributions: Tensor | None,
                               gg_prev: Tensor | None) -> tuple[Tensor | None, ...]:
        (decay,) = ctx.saved_tensors
        if gg_contributions is None:
            gg_contributions = decay.new_zeros(ctx.shape)
        prev = gg_prev if ctx.has_prev and gg_prev is not None else None
        befores, final = torch.ops.yaretnet.chunk_scan(gg_contributions, decay, prev)
        return befores, final, None, None

    if _extension.HAS_REGISTER_AUTOGRAD:  # older torch uses the plain forms
        torch.library.register_autograd("yaretnet::chunk_scan", backward, setup_context=setup_context)
        torch.library.register_autograd("yaretnet::chunk_scan_backward", scan_backward_backward,
                                        setup_context=scan_backward_setup)


# The previous layout's names, kept for their callers.
def chunk_scan_kernel_available() -> bool:
    """Whether the scan kernel is loaded (building the extension on the first call; its backward
    needs ``torch.library.register_autograd``, torch >= 2.4)."""
    return _extension.load() and _extension.HAS_REGISTER_AUTOGRAD


def chunk_scan_applies(contributions: Tensor, decay: Tensor) -> bool:
    """:func:`supports`, then the extension built (on the first call) and loaded."""
    return supports(contributions, decay) and _extension.load()
