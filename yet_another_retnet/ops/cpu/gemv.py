"""Matrix-vector products for decoding on the CPU: a compiled kernel with ``torch.mv`` beside it.

A decoding step reads every weight once (two FLOPs per weight), so its speed is the speed at which
the weights stream from memory. :func:`gemv` runs ``csrc/gemv.cpp`` (eight rows in flight per
thread, PyTorch's own thread pool), which reads weights ~1.1x (float32) to ~1.4x (bfloat16) faster
than ``torch.mv`` on our CPUs. bfloat16 weights are widened in registers (exact), or where the CPU
has AVX512-BF16 multiplied by the vector rounded to bfloat16 (:func:`bf16_dot`; what a bfloat16
model's own forward feeds its products), float32 sums either way. The kernel is built from source
as part of the package's C++ extension (:mod:`._extension`) the first time it is needed.

Reference: ``torch.mv``/``torch.addmv``, the path wherever :func:`supports` says no (and where the
extension cannot be built, or with ``YARETNET_FAST_PATH=0``); ``tests/cpu/test_gemv.py`` checks the
kernel against it and against float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension

__all__ = ["bf16_dot", "gemv", "gemv_kernel_available", "supports"]

_DTYPES = (torch.float32, torch.bfloat16)


def bf16_dot() -> bool:
    """Whether the kernels multiply bfloat16 weights by vectors rounded to bfloat16 (VDPBF16PS: the
    extension built with AVX512-BF16) rather than widening the weights to float32. ``False``
    without the extension."""
    return bool(_extension.load() and torch.ops.yaretnet.gemv_bf16_dot())


def supports(weight: Tensor, x: Tensor) -> bool:
    """Whether :func:`gemv` takes the kernel for these inputs: CPU float32 or bfloat16 ``weight``
    ``(rows, cols)``, ``x`` ``(cols,)``, outside autograd, the kernels not ruled out. Pure: never
    builds the extension."""
    return (weight.device.type == "cpu" and weight.dtype in _DTYPES and weight.dim() == 2 and x.dim() == 1
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and _extension.usable())


def gemv(weight: Tensor, x: Tensor, add: Tensor | None = None) -> Tensor:
    """``weight @ x (+ add)``: ``weight`` ``(rows, cols)``, ``x`` ``(cols,)``, ``add`` ``(rows,)``.

    Returns ``(rows,)`` in ``weight``'s dtype, accumulated in float32. The kernel where
    :func:`supports` (building the extension on first use); anything else (and every call where
    the kernel is unavailable) is ``torch.mv``/``torch.addmv``.
    """
    if supports(weight, x) and _extension.load():
        return torch.ops.yaretnet.gemv(weight, x, add)
    return torch.mv(weight, x) if add is None else torch.addmv(add, weight, x)


def register() -> None:
    """The op's shape-only form (called once the library is loaded)."""

    @_extension.register_fake("yaretnet::gemv")
    def _(weight: Tensor, x: Tensor, add: Tensor | None = None) -> Tensor:
        return weight.new_empty(weight.shape[0])


# The previous layout's name, kept for its callers.
def gemv_kernel_available() -> bool:
    """Whether :func:`gemv` can run the compiled kernel (building it on the first call)."""
    return _extension.load()
