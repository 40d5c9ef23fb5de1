"""Build and load the package's C++ extension (``csrc/*.cpp``) once per process.

The extension holds the decoding gemv kernel (:mod:`.gemv`) and the CPU buffer cache
(:mod:`.memory`). ``torch.utils.cpp_extension`` compiles it the first time one of them is needed
(a C++ compiler and ninja are required; about 10 s, cached under ``~/.cache/torch_extensions``).
Where it cannot be built, or with ``YARETNET_CPU_KERNELS=0`` in the environment, :func:`load`
returns ``False`` and the callers use their plain PyTorch paths.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

_log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name("csrc") / name for name in ("gemv.cpp", "cpu_memory.cpp")]
_lock = threading.Lock()
#: ``None`` until the first use decides; then whether the extension is loaded.
_loaded: bool | None = None


def _build() -> bool:
    if os.environ.get("YARETNET_CPU_KERNELS", "1") == "0":
        return False
    try:
        from torch.utils import cpp_extension

        # -march=native: the build is for this machine. The name carries torch's version and the
        # CPU's capability so a cache shared across machines or torch upgrades never mixes builds.
        tag = f"{torch.__version__}_{torch.backends.cpu.get_cpu_capability()}"
        name = "yaretnet_cpu_" + "".join(c if c.isalnum() else "_" for c in tag)
        _log.info("building the CPU extension %s (once per machine)", name)
        cpp_extension.load(
            name=name, sources=[str(s) for s in _SOURCES], is_python_module=False, verbose=False,
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
        )
        _register_fake()
        return True
    except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back
        _log.warning("CPU extension unavailable, using plain PyTorch (%s: %s)", type(exc).__name__, exc)
        return False


def _register_fake() -> None:
    """Shape-only implementations, so ``torch.compile`` can trace through the ops."""
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @register("yaretnet::gemv")
    def _(weight: Tensor, x: Tensor, add: Tensor | None = None) -> Tensor:
        return weight.new_empty(weight.shape[0])


def load() -> bool:
    """Whether the extension is loaded (building it on the first call)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
    return _loaded
