"""Matrix-vector products for decoding on the CPU: a compiled kernel with ``torch.mv`` beside it.

A decoding step reads every weight once (two FLOPs per weight), so its speed is the speed at which
the weights stream from memory. :func:`gemv` runs ``csrc/gemv.cpp`` (eight rows in flight per
thread, bfloat16 widened in registers, PyTorch's own thread pool), which reads weights ~1.1x
(float32) to ~1.4x (bfloat16) faster than ``torch.mv`` on our CPUs. The kernel is built from source
by ``torch.utils.cpp_extension`` the first time it is needed (a C++ compiler and ninja are required;
about 8 s, cached under ``~/.cache/torch_extensions`` afterwards). Where it cannot be built, or with
``YARETNET_CPU_KERNELS=0`` in the environment, :func:`gemv` is ``torch.mv``/``torch.addmv``: the
plain reference it is tested against.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["gemv", "gemv_kernel_available"]

_log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
_DTYPES = (torch.float32, torch.bfloat16)
_lock = threading.Lock()
#: ``None`` until the first use decides; then whether the kernel is loaded.
_kernel: bool | None = None


def _build() -> bool:
    """Compile and load the kernel once per process; ``False`` (with one warning) if it cannot be."""
    if os.environ.get("YARETNET_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        # -march=native: the build is for this machine. The name carries torch's version and the
        # CPU's capability so a cache shared across machines or torch upgrades never mixes builds.
        tag = f"{torch.__version__}_{torch.backends.cpu.get_cpu_capability()}"
        name = "yaretnet_cpu_" + "".join(c if c.isalnum() else "_" for c in tag)
        _log.info("building the decoding kernel %s (once per machine)", name)
        cpp_extension.load(
            name=name, sources=[str(_SOURCE)], is_python_module=False, verbose=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
        _register_fake()
        return True
    except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back
        _log.warning("decoding kernel unavailable, using torch.mv (%s: %s)", type(exc).__name__, exc)
        return False


def _register_fake() -> None:
    """Shape-only implementation, so ``torch.compile`` can trace through the op."""
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @register("yaretnet::gemv")
    def _(weight: Tensor, x: Tensor, add: Tensor | None = None) -> Tensor:
        return weight.new_empty(weight.shape[0])


def gemv_kernel_available() -> bool:
    """Whether :func:`gemv` runs the compiled kernel (building it on the first call)."""
    global _kernel
    if _kernel is None:
        with _lock:
            if _kernel is None:
                _kernel = _build()
    return _kernel


def gemv(weight: Tensor, x: Tensor, add: Tensor | None = None) -> Tensor:
    """``weight @ x (+ add)``: ``weight`` ``(rows, cols)``, ``x`` ``(cols,)``, ``add`` ``(rows,)``.

    Returns ``(rows,)`` in ``weight``'s dtype, accumulated in float32. The kernel runs for CPU float32
    or bfloat16 weights outside autograd; anything else (and every call where the kernel is
    unavailable) is ``torch.mv``/``torch.addmv``.
    """
    if (weight.device.type == "cpu" and weight.dtype in _DTYPES and weight.dim() == 2 and x.dim() == 1
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and gemv_kernel_available()):
        return torch.ops.yaretnet.gemv(weight, x, add)
    return torch.mv(weight, x) if add is None else torch.addmv(add, weight, x)
