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
import importlib.metadata
import importlib.util
import os
import re

import torch
from torch import Tensor

from .chunkwise import MAX_CHUNK, MAX_KEY_DIM, chunk_retention_triton, kernel_chunk
from .decode import retention_step_triton

__all__ = [
    "MAX_CHUNK",
    "MAX_KEY_DIM",
    "chunk_retention_triton",
    "interpreter_problem",
    "interpreting",
    "kernel_chunk",
    "retention_step_triton",
    "supports",
    "supports_step",
    "triton_available",
    "triton_problem",
]

#: Input dtypes the kernels take (they compute in float32 whatever the input).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _release(package: str) -> tuple[int, int] | None:
    """``(major, minor)`` of an installed distribution, read from its metadata (nothing imported)."""
    try:
        found = re.match(r"(\d+)\.(\d+)", importlib.metadata.version(package))
    except importlib.metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


#: The oldest Triton release our kernels run on (3.1's language refuses them; 3.2 to 3.9 were run
#: under the interpreter, 3.3 to 3.9 also compiled for sm_90).
MIN_TRITON = (3, 2)


@functools.lru_cache(maxsize=1)
def triton_problem() -> str | None:
    """Why our kernels cannot run in this environment at all (``None``: they can): ``triton``
    missing, or older than :data:`MIN_TRITON` (PyTorch before 2.6 brings such a release with its
    CUDA wheels; CUDA calls then take the plain PyTorch form). Checked once, without importing it."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    release = _release("triton")
    if release is not None and release < MIN_TRITON:
        return (f"Triton {release[0]}.{release[1]} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, the oldest "
                "release our kernels run on")
    return None


def triton_available() -> bool:
    """Whether Triton is installed at a release our kernels run on (see :func:`triton_problem`)."""
    return triton_problem() is None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels in this environment (``None``: it can).

    Triton before 3.7 passes a kernel's integer arguments to the interpreted body as one-element
    arrays and converts them with ``int()``, which NumPy 2.4 made an error for arrays that are not
    0-d: every kernel with a loop bound fails there (seen with Triton 3.6 and NumPy 2.4; Triton 3.7
    and NumPy 2.3 each work). Compiled kernels on a GPU are not affected."""
    triton_release, numpy_release = _release("triton"), _release("numpy")
    if triton_release and numpy_release and triton_release < (3, 7) and numpy_release >= (2, 4):
        return (f"Triton {'.'.join(map(str, triton_release))}'s interpreter fails under NumPy "
                f"{'.'.join(map(str, numpy_release))} (needs Triton >= 3.7 or NumPy < 2.4)")
    return None


def _device_ok(x: Tensor) -> bool:
    if x.device.type == "cuda":
        return True
    # The interpreter runs on CPU tensors, in NumPy, which has no bfloat16.
    return (x.device.type == "cpu" and interpreting() and x.dtype != torch.bfloat16
            and interpreter_problem() is None)


def supports(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None = None) -> bool:
    """Whether :func:`chunk_retention_triton` takes ``q``, ``k`` ``(b, h, L, dk)``, ``v`` ``(b, h, L, dv)``
    and ``prev_state``: a Triton our kernels run on, CUDA tensors (or CPU ones under the interpreter),
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
