"""Which implementation runs a retention call: the plain PyTorch forms, our Triton kernels
(:mod:`yet_another_retnet.ops.triton`) or flash-linear-attention's ``chunk_retention``.

- ``backend=None`` (the default of :func:`~yet_another_retnet.ops.retention.retention_chunkwise`
  and :func:`~yet_another_retnet.ops.retention.retention_recurrent`): CUDA tensors go to our Triton
  kernels where Triton imports and the kernels take the inputs (:func:`.triton.supports`), else to
  the PyTorch forms, on the same device. CPU tensors always take the PyTorch forms (and the C++
  CPU kernels behind them): nothing here ever moves work between devices.
- ``YARETNET_CUDA_RETENTION`` in the environment changes that default for CUDA tensors: ``auto``
  (the default, as above), ``triton``, ``torch`` (our kernels off, as ``YARETNET_CPU_KERNELS=0``
  turns off the C++ ones) or ``fla``.
- An explicit ``backend`` (``"torch"``, ``"triton"``, ``"fla"``) is a demand: where it cannot run
  the call, the call fails with a ``ValueError`` saying why, rather than quietly running another
  implementation. ``"triton"`` runs on CPU tensors only under ``TRITON_INTERPRET=1`` (how the tests
  check the kernels without a GPU). ``"fla"`` wants CUDA tensors, the Eq. 8 decay (fla's kernels
  hard-wire it) and the package ``flash-linear-attention``.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
from torch import Tensor

from . import triton as _triton

__all__ = ["BACKENDS", "ENV", "chunkwise_backend", "default_cuda_backend", "fla_available", "fla_problem", "is_eq8",
           "recurrent_backend"]

#: The environment variable that picks the default for CUDA tensors.
ENV = "YARETNET_CUDA_RETENTION"
#: Accepted values of ``backend`` (``None``: automatic).
BACKENDS = ("torch", "triton", "fla")


@functools.lru_cache(maxsize=1)
def fla_available() -> bool:
    """Whether flash-linear-attention's ``fla`` package is installed (not imported here)."""
    return importlib.util.find_spec("fla") is not None


def default_cuda_backend() -> str:
    """``YARETNET_CUDA_RETENTION`` (``auto``, ``triton``, ``torch`` or ``fla``), read on each call."""
    wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", *BACKENDS):
        raise ValueError(f"{ENV} must be 'auto', 'triton', 'torch' or 'fla', got {wanted!r}")
    return wanted


def is_eq8(log_gamma: Tensor) -> bool:
    """Whether ``log_gamma`` ``(heads,)`` is the paper's Eq. 8, ``gamma_h = 1 - 2^(-5-h)``."""
    expected = [math.log1p(-(2.0 ** (-5 - h))) for h in range(log_gamma.shape[0])]
    actual = log_gamma.detach().to("cpu", torch.float64).tolist()
    return all(math.isclose(a, e, rel_tol=1e-9, abs_tol=0.0) for a, e in zip(actual, expected, strict=True))


def _check_name(backend: str | None) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def fla_problem(device_type: str, dtype: torch.dtype, log_gamma: Tensor, installed: bool) -> str | None:
    """Why fla's ``chunk_retention`` cannot run a call (``None``: it can): CUDA tensors, float32 or
    half inputs, the Eq. 8 decay, the package installed."""
    if device_type != "cuda":
        return f"fla's kernels need CUDA tensors, got device type {device_type!r}"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"fla's kernels take float32, bfloat16 or float16, got {dtype}"
    if not is_eq8(log_gamma):
        return "fla's chunk_retention hard-wires the Eq. 8 decay (gamma_h = 1 - 2^(-5-h)); these gammas differ"
    if not installed:
        return "flash-linear-attention (the 'fla' package) is not installed"
    return None


def chunkwise_backend(backend: str | None, q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None,
                      log_gamma: Tensor) -> str:
    """``"torch"``, ``"triton"`` or ``"fla"``: what runs this chunkwise call (see the module doc).

    Raises ``ValueError`` where an explicit ``backend`` (or ``YARETNET_CUDA_RETENTION`` on a CUDA
    call) asks for one that cannot run it."""
    _check_name(backend)
    if backend is None:
        if q.device.type != "cuda":
            return "torch"
        wanted = default_cuda_backend()
        if wanted == "auto":
            return "triton" if _triton.supports(q, k, v, prev_state) else "torch"
        backend = wanted
        where = f"{ENV}={wanted}"
    else:
        where = f"backend={backend!r}"
    if backend == "triton" and not _triton.supports(q, k, v, prev_state):
        raise ValueError(f"{where}: our Triton kernels do not take this call ({_triton_problem(q)})")
    if backend == "fla":
        problem = fla_problem(q.device.type, q.dtype, log_gamma, fla_available())
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
    return backend


def recurrent_backend(backend: str | None, q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None) -> str:
    """``"torch"`` or ``"triton"``: what runs one recurrent step (``"fla"`` has no step here)."""
    _check_name(backend)
    if backend is None:
        if q.device.type != "cuda":
            return "torch"
        wanted = default_cuda_backend()
        if wanted == "torch":
            return "torch"
        # (fla selected for chunkwise calls: the steps still take our kernel.)
        return "triton" if _triton.supports_step(q, k, v, prev_state) else "torch"
    if backend == "fla":
        raise ValueError("backend='fla' is for chunkwise calls; a recurrent step takes 'torch' or 'triton'")
    if backend == "triton" and not _triton.supports_step(q, k, v, prev_state):
        raise ValueError(f"backend='triton': the Triton step kernel does not take this call ({_triton_problem(q)}"
                         "; or a gradient is wanted: the step kernel has none)")
    return backend


def _triton_problem(q: Tensor) -> str:
    if _triton.triton_problem() is not None:
        return str(_triton.triton_problem())
    if q.device.type == "cpu" and not _triton.interpreting():
        return "CPU tensors run the kernels only under TRITON_INTERPRET=1"
    if q.dtype not in _triton.KERNEL_DTYPES:
        return f"dtype {q.dtype} (float32, bfloat16 or float16 only)"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return "Triton's interpreter has no bfloat16"
    if q.device.type == "cpu" and _triton.interpreter_problem() is not None:
        return str(_triton.interpreter_problem())
    if q.device.type not in ("cpu", "cuda"):
        return f"device {q.device}"
    return f"key dim {q.shape[-1]} (1 to {_triton.MAX_KEY_DIM}), or an empty input"
