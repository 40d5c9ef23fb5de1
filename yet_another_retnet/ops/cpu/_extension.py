"""Build and load the package's C++ extension (``csrc/*.cpp``) once per process.

The extension holds the decoding gemv kernel (:mod:`.gemv`), the scan over chunk states of
chunkwise retention (:mod:`.chunk_scan`), its per-chunk products (:mod:`.chunk_kernels`), the head
norm and gate that end a retention layer (:mod:`.norm_gate`), the split of its projection into
rotated heads (:mod:`.split_heads`), those three fused into a layer's core
(:mod:`.retention_core`), the GELU with its slope for the feed-forward network (:mod:`.mlp`), a
transposed copy for the weight gradients (:mod:`.matmul`), the fused decoding steps
(:mod:`.decode_step`), the int8 weight products (:mod:`.quantized`) and the CPU buffer cache
(:mod:`.memory`).
``torch.utils.cpp_extension`` compiles it the first time one of them is needed (a C++ compiler and
ninja are required; about 25 s on two cores, cached under ``~/.cache/torch_extensions``), through
:mod:`._build`, whose builds a killed process cannot leave half done or locked.
Where it cannot be built, or with ``YARETNET_CPU_KERNELS=0`` in the environment, :func:`load`
returns ``False`` and the callers use their plain PyTorch paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

_log = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("gemv.cpp", "chunk_scan.cpp", "chunk_kernels.cpp", "norm_gate.cpp", "split_heads.cpp",
                           "gelu_slope.cpp", "decode_step.cpp", "cpu_memory.cpp", "retention_core.cpp",
                           "transpose.cpp", "qgemv.cpp")]
_lock = threading.Lock()
#: ``None`` until the first use decides; then whether the extension is loaded.
_loaded: bool | None = None


def _cpu_digest(cpuinfo: str | None = None) -> str:
    """8 hex digits naming this CPU: the vendor, model name and feature flags of the first processor
    in ``cpuinfo`` (default: ``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    info = "|".join(fields.get(k, "") for k in ("vendor_id", "model name", "flags"))
    if not fields:
        info = platform.processor() or platform.machine()
    return hashlib.sha1(info.encode()).hexdigest()[:8]


def march() -> str:
    """The ``-march`` the extension is compiled for: ``YARETNET_CPU_MARCH`` or ``native``.

    A portable target (``x86-64-v3``: AVX2 without AVX-512, what most desktop CPUs run) compiles
    the kernels' non-AVX-512 branches on any machine; CI builds and tests that path too."""
    value = os.environ.get("YARETNET_CPU_MARCH", "native").strip() or "native"
    if not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError(f"YARETNET_CPU_MARCH must be a -march name such as native or x86-64-v3, got {value!r}")
    return value


#: The file the extension was loaded from (``None`` until loaded).
library: Path | None = None


def _build() -> bool:
    global library
    if os.environ.get("YARETNET_CPU_KERNELS", "1") == "0":
        return False
    arch = march()  # a malformed value is the user's mistake: raised, not a silent fallback
    try:
        from ._build import build_and_load

        # -march=native: the build is for this machine. The name carries torch's version, the
        # CPU's capability and a digest of its model and feature flags, so a cache shared across
        # machines (an Intel build, with AMX, on an AMD CPU: an illegal instruction) or torch
        # upgrades never mixes builds; the file name adds a digest of the sources and flags.
        tag = f"{torch.__version__}_{torch.backends.cpu.get_cpu_capability()}_{_cpu_digest()}"
        if arch != "native":
            tag += f"_{arch}"
        name = "yaretnet_cpu_" + "".join(c if c.isalnum() else "_" for c in tag)
        _log.info("loading the CPU extension %s (built once per machine)", name)
        library = build_and_load(name, _SOURCES, cflags=["-O3", f"-march={arch}", "-fopenmp"], ldflags=["-fopenmp"])
        _register_python_parts()
        return True
    except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back
        _log.warning("CPU extension unavailable, using plain PyTorch (%s: %s)", type(exc).__name__, exc)
        return False


def is_compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compiler.is_compiling`` is torch >= 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, which only torch >= 2.4 accepts."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch 2.2/2.3: one query per device kind
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return bool(torch.is_autocast_enabled())


def differentiable_grads(reference: Any, inputs: list[Tensor | None],
                         grad: Tensor | tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """The backward through the plain PyTorch form, recording a graph: what a double backward
    (``create_graph=True``) gets, since the kernels' backwards are not differentiable.
    ``grad``: the output's gradient, or one per output (``None`` for an unused output) when
    ``reference`` returns a tuple.

    Each input enters through an alias (a view), so the gradient is this op's own partial
    derivative: an input computed from another (the state from k and v) must not pass its
    share on here; autograd routes that share through the op that made it."""
    aliases = [t.view_as(t) if t is not None and t.requires_grad else t for t in inputs]
    wanted = [t for t in aliases if t is not None and t.requires_grad]
    outs = reference(*aliases)
    pairs = zip(outs, grad, strict=True) if isinstance(grad, tuple) else [(outs, grad)]
    used = [(o, g) for o, g in pairs if g is not None]
    grads = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used], create_graph=True,
                                     allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in aliases]


def _register_python_parts() -> None:
    """Shape-only implementations (so ``torch.compile`` can trace through the ops) and the
    backwards of the chunk scan, the per-chunk products, the norm-gate and the head split."""
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract

    @register("yaretnet::gemv")
    def _(weight: Tensor, x: Tensor, add: Tensor | None = None) -> Tensor:
        return weight.new_empty(weight.shape[0])

    @register("yaretnet::chunk_scan")
    def _(contributions: Tensor, decay: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
        batch, heads, _, size = contributions.shape
        return torch.empty_like(contributions, memory_format=torch.contiguous_format), \
            contributions.new_empty(batch, heads, size)

    @register("yaretnet::chunk_scan_backward")
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

    def like(t: Tensor) -> Tensor:  # the kernels' outputs and gradients are contiguous
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    @register("yaretnet::chunk_contributions")
    def _(k: Tensor, v: Tensor, key_decay: Tensor) -> Tensor:
        return k.new_empty(*k.shape[:3], k.shape[-1], v.shape[-1])

    @register("yaretnet::chunk_contributions_backward")
    def _(grad: Tensor, k: Tensor, v: Tensor, key_decay: Tensor) -> tuple[Tensor, Tensor]:
        return like(k), like(v)

    @register("yaretnet::chunk_output")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor, befores: Tensor | None) -> Tensor:
        return v.new_empty(v.shape)

    @register("yaretnet::chunk_output_backward")
    def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor,
          befores: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dbefores = q.new_empty(0) if befores is None else befores.new_empty(befores.shape)
        return like(q), like(k), like(v), dbefores

    @register("yaretnet::chunk_retention")
    def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
          chunk_decay: Tensor, prev: Tensor | None, keep_befores: bool) -> tuple[Tensor, Tensor, Tensor]:
        state = (*k.shape[:2], k.shape[-1], v.shape[-1])
        befores = k.new_empty(*k.shape[:3], *state[2:]) if keep_befores else k.new_empty(0)
        return v.new_empty(v.shape), k.new_empty(state), befores

    @register("yaretnet::chunk_retention_backward")
    def _(grad: Tensor, grad_final: Tensor | None, q: Tensor, k: Tensor, v: Tensor, befores: Tensor,
          mask: Tensor, query_decay: Tensor, key_decay: Tensor, chunk_decay: Tensor,
          has_prev: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        dprev = k.new_empty(*k.shape[:2], k.shape[-1], v.shape[-1]) if has_prev else k.new_empty(0)
        return like(q), like(k), like(v), dprev

    # The backwards keep the inputs and recompute each chunk's scores (no c x c tensor is saved).
    def contributions_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(*inputs)

    def contributions_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        k, v, key_decay = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            from .chunk_kernels import chunk_contributions_reference

            dk, dv, _ = differentiable_grads(chunk_contributions_reference, [k, v, key_decay], grad)
            return dk, dv, None
        dk, dv = torch.ops.yaretnet.chunk_contributions_backward(grad, k, v, key_decay)
        return dk, dv, None  # the decay table: a constant

    def output_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, mask, query_decay, befores = inputs
        ctx.has_befores = befores is not None
        ctx.save_for_backward(q, k, v, mask, query_decay, *([befores] if befores is not None else []))

    def output_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, mask, query_decay, *befores = ctx.saved_tensors
        before = befores[0] if befores else None
        if torch.is_grad_enabled():  # create_graph=True
            from .chunk_kernels import chunk_output_reference

            dq, dk, dv, _, _, dbefores = differentiable_grads(
                chunk_output_reference, [q, k, v, mask, query_decay, before], grad)
            return dq, dk, dv, None, None, dbefores
        dq, dk, dv, dbefores = torch.ops.yaretnet.chunk_output_backward(grad, q, k, v, mask, query_decay, before)
        return dq, dk, dv, None, None, (dbefores if ctx.has_befores else None)

    def retention_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, mask, query_decay, key_decay, chunk_decay, prev, keep_befores = inputs
        if not keep_befores:
            raise RuntimeError("chunk_retention: a backward needs keep_befores=True")
        # The saved states (an output only to be saved) and, in training, the final state get no
        # gradient: None instead of zero tensors autograd would fill (~1 MB a layer at 2 x 1,024).
        ctx.set_materialize_grads(False)
        ctx.has_prev = prev is not None
        ctx.save_for_backward(q, k, v, output[2], mask, query_decay, key_decay, chunk_decay,
                              *([prev] if prev is not None else []))

    def retention_backward(ctx: Any, grad: Tensor | None, grad_final: Tensor | None,
                           _: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, befores, mask, query_decay, key_decay, chunk_decay, *prev = ctx.saved_tensors
        tables = (mask, query_decay, key_decay, chunk_decay)
        if torch.is_grad_enabled():  # create_graph=True: through the plain form
            from .chunk_kernels import chunk_retention_reference

            def reference(q: Tensor, k: Tensor, v: Tensor, prev: Tensor | None) -> tuple[Tensor, Tensor]:
                return chunk_retention_reference(q, k, v, *tables, prev)

            dq, dk, dv, dprev = differentiable_grads(reference, [q, k, v, prev[0] if prev else None],
                                                     (grad, grad_final))
            return dq, dk, dv, None, None, None, None, dprev, None
        if grad is None:
            grad = torch.zeros_like(v)
        dq, dk, dv, dprev = torch.ops.yaretnet.chunk_retention_backward(
            grad, grad_final, q, k, v, befores, *tables, ctx.has_prev)
        return dq, dk, dv, None, None, None, None, (dprev if ctx.has_prev else None), None

    @register("yaretnet::norm_gate")
    def _(retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        return like(gate)

    @register("yaretnet::norm_gate_backward")
    def _(grad: Tensor, retained: Tensor, gate: Tensor, weight: Tensor, bias: Tensor,
          eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return like(retained), like(gate), like(weight), like(bias)

    def norm_gate_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        retained, gate, weight, bias, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(retained, gate, weight, bias)

    def norm_gate_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        retained, gate, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            from .norm_gate import norm_gate_reference

            def reference(x: Tensor, z: Tensor, w: Tensor, b: Tensor) -> Tensor:
                return norm_gate_reference(x, z, w, b, ctx.eps)

            return (*differentiable_grads(reference, [retained, gate, weight, bias], grad), None)
        return (*torch.ops.yaretnet.norm_gate_backward(grad, retained, gate, weight, bias, ctx.eps), None)

    @register("yaretnet::gelu_slope")
    def _(x: Tensor) -> tuple[Tensor, Tensor]:
        return like(x), like(x)

    @register("yaretnet::split_heads")
    def _(proj: Tensor, cos: Tensor | None, sin: Tensor | None, heads: int,
          key_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, length, width = proj.shape
        dv = (width - 2 * heads * key_dim) // (2 * heads)
        return (proj.new_empty(batch, heads, length, key_dim), proj.new_empty(batch, heads, length, key_dim),
                proj.new_empty(batch, heads, length, dv), proj.new_empty(batch, length, heads * dv))

    @register("yaretnet::split_heads_backward")
    def _(dq: Tensor | None, dk: Tensor | None, dv: Tensor | None, dgate: Tensor | None, cos: Tensor | None,
          sin: Tensor | None, batch: int, length: int, width: int, heads: int, key_dim: int) -> Tensor:
        like_any = next(t for t in (dq, dk, dv, dgate) if t is not None)
        return like_any.new_empty(batch, length, width)

    def split_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        proj, cos, sin, heads, key_dim = inputs
        ctx.args = (*proj.shape, heads, key_dim)
        ctx.set_materialize_grads(False)  # the kernel takes a missing gradient as zeros
        ctx.save_for_backward(cos, sin)

    def split_backward(ctx: Any, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None,
                       dgate: Tensor | None) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        if all(g is None for g in (dq, dk, dv, dgate)):
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: the plain form's backward (a linear map)
            from .split_heads import split_heads_reference

            batch, length, width, heads, key_dim = ctx.args
            proj = torch.zeros(batch, length, width, dtype=torch.float32, requires_grad=True)
            outs = split_heads_reference(proj, cos, sin, heads, key_dim)
            used = [(o, g) for o, g in zip(outs, (dq, dk, dv, dgate), strict=True) if g is not None]
            (dproj,) = torch.autograd.grad([o for o, _ in used], proj, [g for _, g in used], create_graph=True)
            return dproj, None, None, None, None
        return torch.ops.yaretnet.split_heads_backward(dq, dk, dv, dgate, cos, sin, *ctx.args), None, None, None, None

    @register("yaretnet::retention_core")
    def _(proj: Tensor, cos: Tensor | None, sin: Tensor | None, mask: Tensor, query_decay: Tensor,
          key_decay: Tensor, chunk_decay: Tensor, prev: Tensor | None, norm_weight: Tensor, norm_bias: Tensor,
          eps: float, heads: int, key_dim: int, chunk: int, keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, length, width = proj.shape
        dv = (width - 2 * heads * key_dim) // (2 * heads)
        retained = proj.new_empty(batch, heads, length, dv) if keep else proj.new_empty(0)
        befores = proj.new_empty(batch, heads, length // chunk, key_dim, dv) if keep else proj.new_empty(0)
        return proj.new_empty(batch, length, heads * dv), proj.new_empty(batch, heads, key_dim, dv), retained, befores

    @register("yaretnet::retention_core_backward")
    def _(grad: Tensor, grad_final: Tensor | None, proj: Tensor, cos: Tensor | None, sin: Tensor | None,
          retained: Tensor, befores: Tensor, mask: Tensor, query_decay: Tensor, key_decay: Tensor,
          chunk_decay: Tensor, norm_weight: Tensor, norm_bias: Tensor, eps: float, heads: int, key_dim: int,
          chunk: int, has_prev: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, _, _, dv = retained.shape
        dprev = proj.new_empty(batch, heads, key_dim, dv) if has_prev else proj.new_empty(0)
        return like(proj), dprev, like(norm_weight), like(norm_bias)

    def core_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
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

    def core_backward(ctx: Any, grad: Tensor | None, grad_final: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        proj, retained, befores, mask, query_decay, key_decay, chunk_decay, weight, bias, *rest = ctx.saved_tensors
        cos, sin = (rest[0], rest[1]) if ctx.has_rotation else (None, None)
        prev = rest[-1] if ctx.has_prev else None
        eps, heads, key_dim, chunk = ctx.args
        tables = (mask, query_decay, key_decay, chunk_decay)
        if torch.is_grad_enabled():  # create_graph=True: through the plain forms
            from .retention_core import retention_core_reference

            def reference(proj: Tensor, prev: Tensor | None, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
                return retention_core_reference(proj, cos, sin, *tables, prev, weight, bias, eps, heads, key_dim,
                                                chunk)

            dproj, dprev, dweight, dbias = differentiable_grads(reference, [proj, prev, weight, bias],
                                                                (grad, grad_final))
        else:
            if grad is None:
                grad = proj.new_zeros(proj.shape[0], proj.shape[1], weight.shape[0])
            dproj, dprev, dweight, dbias = torch.ops.yaretnet.retention_core_backward(
                grad, grad_final, proj, cos, sin, retained, befores, *tables, weight, bias, eps, heads, key_dim,
                chunk, ctx.has_prev)
        return (dproj, None, None, None, None, None, None, dprev if ctx.has_prev else None, dweight, dbias,
                None, None, None, None, None)

    if hasattr(torch.library, "register_autograd"):  # torch >= 2.4; older torch uses the plain forms
        torch.library.register_autograd("yaretnet::chunk_scan", backward, setup_context=setup_context)
        torch.library.register_autograd("yaretnet::chunk_scan_backward", scan_backward_backward,
                                        setup_context=scan_backward_setup)
        torch.library.register_autograd("yaretnet::chunk_contributions", contributions_backward,
                                        setup_context=contributions_setup)
        torch.library.register_autograd("yaretnet::chunk_output", output_backward, setup_context=output_setup)
        torch.library.register_autograd("yaretnet::chunk_retention", retention_backward,
                                        setup_context=retention_setup)
        torch.library.register_autograd("yaretnet::norm_gate", norm_gate_backward, setup_context=norm_gate_setup)
        torch.library.register_autograd("yaretnet::split_heads", split_backward, setup_context=split_setup)
        torch.library.register_autograd("yaretnet::retention_core", core_backward, setup_context=core_setup)


def load() -> bool:
    """Whether the extension is loaded (building it on the first call)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
    return _loaded
