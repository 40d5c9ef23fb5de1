"""Our own Triton kernels for retention on CUDA tensors.

- :mod:`.chunkwise`: chunkwise retention, forward and backward (an ``autograd.Function``).
- :mod:`.decode`: one recurrent step (decoding), inference only.

Nothing here imports Triton until a kernel is launched. :func:`supports` and
:func:`supports_step` are pure predicates on the inputs' metadata: which calls the kernels take.
On CPU tensors they take a call only under Triton's interpreter (``TRITON_INTERPRET=1``, which
runs the same kernels in NumPy: how the tests check them without a GPU). Which calls are routed
here is decided in :mod:`yet_another_retnet.ops.backends`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from .chunkwise import MAX_CHUNK, MAX_KEY_DIM, chunk_retention_triton, kernel_chunk
from .decode import retention_step_triton

__all__ = [
    "MAX_CHUNK",
    "MAX_KEY_DIM",
    "chunk_retention_triton",
    "interpreting",
    "kernel_chunk",
    "retention_step_triton",
    "supports",
    "supports_step",
    "triton_available",
]

#: Input dtypes the kernels take (they compute in float32 whatever the input).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_ok(x: Tensor) -> bool:
    if x.device.type == "cuda":
        return True
    # The interpreter runs on CPU tensors, in NumPy, which has no bfloat16.
    return x.device.type == "cpu" and interpreting() and x.dtype != torch.bfloat16


def supports(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None = None) -> bool:
    """Whether :func:`chunk_retention_triton` takes ``q``, ``k`` ``(b, h, L, dk)``, ``v`` ``(b, h, L, dv)``
    and ``prev_state``: Triton importable, CUDA tensors (or CPU ones under the interpreter),
    float32/bfloat16/float16, ``1 <= dk <= MAX_KEY_DIM``, at least one token."""
    return (triton_available() and q.dim() == 4 and q.dtype in KERNEL_DTYPES and _device_ok(q)
            and 1 <= q.shape[-1] <= MAX_KEY_DIM and q.shape[2] >= 1 and v.shape[-1] >= 1
            and q.numel() > 0 and (prev_state is None or prev_state.dtype == torch.float32))


def supports_step(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None = None) -> bool:
    """Whether :func:`retention_step_triton` takes one step's ``q``, ``k`` ``(b, h, dk)``, ``v``
    ``(b, h, dv)`` and ``prev_state``: as :func:`supports`, and no gradient wanted (the step
    kernel has no backward)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, prev_state))
    return (triton_available() and q.dim() == 3 and q.dtype in KERNEL_DTYPES and _device_ok(q)
            and 1 <= q.shape[-1] <= MAX_KEY_DIM and v.shape[-1] >= 1 and q.numel() > 0
            and (prev_state is None or prev_state.dtype == torch.float32) and not wants_grad)
