"""Float32 matrix products on CPU through the faster of ATen's BLAS and oneDNN.

PyTorch's CPU build sends a float32 ``mm``/``addmm``/``F.linear`` to MKL. On AMD CPUs MKL's
sgemm takes a slow code path: on a 2-core AMD EPYC (Zen 5, AVX-512) with torch 2.13, a 4,096^2
product runs at ~220 GFLOP/s through ``torch.matmul`` and at ~460 through oneDNN (bundled with
PyTorch, ISA-dispatched), and the shapes of a training step gain 1.2-2.3x. On the Intel Xeons
this project was first tuned on, MKL is the reference. So the choice is made by measurement,
once per machine: the result is recorded in the user's cache directory, keyed by the CPU and
torch's version, and every later process reads it (:func:`cpu_backend`), because the two
backends round differently and a choice re-measured per process can flip on a loaded host (two
identical training runs would then differ). ``YARETNET_CPU_MATMUL=aten|onednn`` fixes it; a
training run records its choice in its checkpoint and a resumed run uses it (:func:`pin_cpu_backend`).

:func:`linear` is ``residual + x @ weight.T + bias`` with autograd; :func:`mm_nt` and
:func:`grad_weight` are the raw products for hand-written backwards (:mod:`.mlp`). Each is
exactly ATen's product wherever the oneDNN path does not apply: other devices and dtypes,
autocast, small products, a double backward, ``torch.compile`` graphs. The weight gradients'
transposed copies run ``csrc/matmul.cpp`` where :func:`supports`.

Reference: ATen's ``F.linear``/``addmm`` (``YARETNET_CPU_MATMUL=aten``) and ``x.t().contiguous()``;
``tests/cpu/test_matmul.py`` checks both backends against each other and float64.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bf16_products import bf16_products_active, mm_nt_bf16
from . import _extension

__all__ = ["cpu_backend", "grad_weight", "linear", "mm_nt", "pin_cpu_backend", "supports"]

#: Products of fewer multiply-adds stay on ATen: oneDNN's per-call cost is larger (a 1 x 256 x
#: 1,024 product: 14 us through ATen, 17 through oneDNN; from 64 rows oneDNN wins, Zen 5).
MIN_MACS = 1 << 22

ENV = "YARETNET_CPU_MATMUL"
_ENV = ENV
_choice: str | None = None


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _measure() -> str:
    """Time a 512 x 512 x 512 product both ways (interleaved, best of six each); oneDNN only if
    it is clearly faster, so a machine where the two are close keeps ATen's numerics."""
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available():
        return "aten"
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    best = {"aten": float("inf"), "onednn": float("inf")}
    runs = {"aten": lambda: F.linear(a, w), "onednn": lambda: _onednn_linear(a, w, None)}
    try:
        for _ in range(6):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    except RuntimeError:  # a build whose oneDNN cannot run here
        return "aten"
    return "onednn" if best["onednn"] < 0.8 * best["aten"] else "aten"


BACKENDS = ("aten", "onednn")
#: The file of recorded choices, under ``$YARETNET_CACHE_DIR`` or the user's cache directory.
RECORD_NAME = "cpu-matmul-backend.json"


def _wanted() -> str:
    wanted = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if wanted not in ("auto", *BACKENDS):
        raise ValueError(f"{_ENV} must be 'auto', 'aten' or 'onednn', got {wanted!r}")
    if wanted == "onednn" and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        raise RuntimeError(f"{_ENV}=onednn, but this PyTorch build has no oneDNN linear op")
    return wanted


def record_path() -> Path:
    """Where the per-machine choice is kept."""
    root = os.environ.get("YARETNET_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yet_another_retnet")
    return Path(root) / RECORD_NAME


def _machine_key() -> str:
    return f"torch {torch.__version__} cpu {_extension._cpu_digest()}"


def _recorded() -> str:
    """This machine's recorded choice, measuring and recording it first if there is none. A record
    that cannot be read or written (a read-only home) costs a measurement per process, nothing else."""
    path, key = record_path(), _machine_key()
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        records = {}
    if not isinstance(records, dict):
        records = {}
    if records.get(key) in BACKENDS:
        return str(records[key])
    choice = _measure()
    records[key] = choice
    with contextlib.suppress(OSError):  # written atomically: a concurrent reader sees old or new
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(records, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
    return choice


def cpu_backend() -> str:
    """``"onednn"`` or ``"aten"``: what large float32 CPU products run on in this process.

    ``YARETNET_CPU_MATMUL`` (``aten``, ``onednn`` or ``auto``, the default) is read on the first
    call; ``auto`` uses the choice :func:`pin_cpu_backend` fixed, else this machine's recorded
    choice (measured, ~20 ms, the first time on a machine)."""
    global _choice
    if _choice is None:
        wanted = _wanted()
        _choice = _recorded() if wanted == "auto" else wanted
    return _choice


def pin_cpu_backend(name: str) -> str:
    """Use ``name`` (``"aten"`` or ``"onednn"``) for the rest of this process, unless
    ``YARETNET_CPU_MATMUL`` names one; returns the backend in force. A resumed training run calls
    it with the backend its checkpoint recorded, so that it continues bit for bit."""
    global _choice
    if name not in BACKENDS:
        raise ValueError(f"the CPU matmul backend must be one of {BACKENDS}, got {name!r}")
    wanted = _wanted()
    if wanted != "auto":
        _choice = wanted
    elif name == "onednn" and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        _choice = "aten"
    else:
        _choice = name
    return _choice


def _use_onednn(macs: int, *tensors: Tensor | None) -> bool:
    # Not under torch.compile: inductor cannot lower the oneDNN op with a plain weight (it expects
    # the packed weights of its own freezing pass), so a graph keeps ATen's product.
    return (macs >= MIN_MACS
            and all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in tensors)
            and not _extension.is_compiling() and not _extension.autocast_enabled("cpu")
            and cpu_backend() == "onednn")


def mm_nt(a: Tensor, b: Tensor, bias: Tensor | None = None, add: Tensor | None = None) -> Tensor:
    """``add + a @ b.T + bias`` without autograd: ``a`` ``(M, K)``, ``b`` ``(N, K)`` (either may be
    a transposed view), ``bias`` ``(N,)``, ``add`` ``(M, N)``; returns a new ``(M, N)``."""
    if bf16_products_active(a, b):  # inside ops.bf16_products.bf16_products(): a bf16 prefill
        return mm_nt_bf16(a, b, bias, add)
    if _use_onednn(a.shape[0] * a.shape[1] * b.shape[0], a, b, bias, add):
        if add is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(a, add, b, bias, "add")
        return _onednn_linear(a, b, bias)
    if add is not None:
        return torch.addmm(add if bias is None else add + bias, a, b.t())
    return F.linear(a, b, bias)


def supports(x: Tensor) -> bool:
    """Whether the transposed copy of ``x`` runs the kernel (``csrc/matmul.cpp``): a 2-D float32
    CPU tensor, the kernels not ruled out. Pure: never builds the extension. (Which backend runs
    the products themselves is :func:`cpu_backend`.)"""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and _extension.usable()


def _transposed(x: Tensor) -> Tensor:
    """``x.t().contiguous()`` for a 2-D float32 CPU ``x``: the extension's blocked copy where it
    is built (ATen's copy of a transposed view is slow here: strided reads)."""
    if supports(x) and _extension.load():
        out: Tensor = torch.ops.yaretnet.transpose_copy(x)
        return out
    return x.t().contiguous()


def grad_weight(grad: Tensor, x: Tensor) -> Tensor:
    """A linear layer's weight gradient ``grad.T @ x``: ``grad`` ``(M, N)``, ``x`` ``(M, K)``,
    returns ``(N, K)`` (a transposed view where that orientation is the faster one)."""
    n, k = grad.shape[1], x.shape[1]
    if not _use_onednn(grad.shape[0] * n * k, grad, x):
        return grad.t().mm(x)
    # Both operands come transposed (the reduction runs over M). oneDNN reads its left operand
    # row-major (it would copy a transposed one) and its right one at any strides: the smaller
    # of the two is copied transposed, and the output's rows are that side (Zen 5, M = 2,048,
    # oneDNN's own copy included: 393 against 265 GFLOP/s for N = 1,024, K = 256; 381 against 323
    # for N = 256, K = 512).
    if n <= k:
        return _onednn_linear(_transposed(grad), x.t(), None)
    return _onednn_linear(_transposed(x), grad.t(), None).t()


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        return mm_nt(x, weight, bias, residual)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: through ATen's differentiable product
            grads = _extension.differentiable_grads(F.linear, [x, weight, bias], grad)
            return (*grads, grad if need_r else None)
        dx = mm_nt(grad, weight.t()) if need_x else None
        dw = grad_weight(grad, x) if need_w else None
        db = grad.sum(0) if need_b else None
        return dx, dw, db, grad if need_r else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``residual + F.linear(x, weight, bias)``, differentiable in every input.

    Args:
        x: ``(..., in)``.
        weight: ``(out, in)``; bias: ``(out,)`` or ``None``.
        residual: ``(..., out)`` with ``x``'s leading shape, or ``None``; accumulated inside the
            product (one pass over the output).

    Returns:
        ``(..., out)``: through oneDNN where :func:`cpu_backend` chose it and the product is large
        enough (float32 on CPU), else ATen's ``addmm``/``F.linear``.
    """
    lead, out_dim = x.shape[:-1], weight.shape[0]
    if residual is not None and (residual.shape[:-1] != lead or residual.dtype != x.dtype
                                 or weight.dtype != x.dtype or _extension.autocast_enabled(x.device.type)):
        # A broadcast residual, mixed dtypes, or autocast (which would round the residual to
        # half precision inside the product): the plain sum.
        return residual + linear(x, weight, bias)
    rows = math.prod(lead)
    x2 = x.reshape(rows, x.shape[-1])
    r2 = None if residual is None else residual.reshape(rows, out_dim)
    # ATen's products are differentiable as they are; oneDNN's go through _Linear for autograd.
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
            and _use_onednn(rows * x.shape[-1] * out_dim, x, weight, bias, residual)):
        out: Tensor = _Linear.apply(x2, weight, bias, r2)
    else:
        out = mm_nt(x2, weight, bias, r2)
    return out.view(*lead, out_dim)
