"""Build and load the CPU kernels (``csrc/*.cpp``) once per process; the switch that turns them off.

The extension holds every kernel family of this package (one ``csrc/<family>.cpp`` per module
``<family>.py``: :mod:`.gemv`, :mod:`.chunk_scan`, :mod:`.chunk_kernels`, :mod:`.norm_gate`,
:mod:`.split_heads`, :mod:`.retention_core`, :mod:`.mlp`, :mod:`.matmul`, :mod:`.memory`,
:mod:`.decode_step`) and the int8 weight products (``csrc/quantized.cpp``, wrapped by
:mod:`yet_another_retnet.ops.cpu.quantized`). ``torch.utils.cpp_extension`` compiles it the first
time a kernel is needed (a C++ compiler and ninja are required; a minute or two, announced on
stderr; cached under ``$TORCH_EXTENSIONS_DIR`` or torch's default directory), through
:mod:`._build`, whose builds a killed process cannot leave half done or locked. Once loaded, each
family's :func:`register` adds its ops' shape-only forms and autograd.

:func:`load` builds and loads; :func:`usable` is the pure question the families' ``supports``
ask (never a build). Where the extension cannot be built, or with ``YARETNET_FAST_PATH=0`` in the
environment (``YARETNET_CPU_KERNELS=0``: its deprecated alias), :func:`load` returns ``False``
and every caller takes its plain PyTorch path.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .machine import OFF_WORDS, ON_WORDS, decode_tuning, first_cpu

_log = logging.getLogger(__name__)

#: The environment variable that turns every CPU kernel off (``0``) for the whole process.
SWITCH = "YARETNET_FAST_PATH"
#: Its deprecated alias: ``0`` turns the kernels off too (with a warning).
DEPRECATED_SWITCH = "YARETNET_CPU_KERNELS"
#: The kernel families, one module and one ``csrc/<name>.cpp`` each, in link order.
FAMILIES = ("gemv", "chunk_scan", "chunk_kernels", "norm_gate", "split_heads", "mlp", "decode_step", "memory",
            "retention_core", "matmul", "quantized")
#: The families whose ops have shape-only forms or autograd (their module's ``register()``).
_REGISTERING = ("gemv", "chunk_scan", "chunk_kernels", "norm_gate", "mlp", "split_heads", "retention_core",
                "decode_step", "quantized")
CSRC = Path(__file__).with_name("csrc")
_SOURCES = [CSRC / f"{name}.cpp" for name in FAMILIES]
_HEADERS = sorted(CSRC.glob("*.h"))
#: The message printed before a build (a cached library loads without it).
COMPILE_NOTICE = "compiling the CPU kernels once (about 1-2 minutes)..."
#: Whether this torch registers Python autograd for C++ ops (torch >= 2.4); the kernels with a
#: backward need it, older torch takes the plain forms.
HAS_REGISTER_AUTOGRAD = hasattr(torch.library, "register_autograd")

_lock = threading.Lock()
#: ``None`` until the first use decides; then whether the extension is loaded.
_loaded: bool | None = None
#: ``None`` until read; then whether :data:`SWITCH` allows the kernels.
_switch: bool | None = None
#: Why the build failed (``None``: it did not, or has not been tried).
error: str | None = None


def switch_on() -> bool:
    """Whether the environment allows the CPU kernels in this process (read once, on first use).

    ``YARETNET_FAST_PATH``: ``1`` (the default) or ``0``; ``YARETNET_CPU_KERNELS=0`` (deprecated)
    also turns them off where ``YARETNET_FAST_PATH`` is unset.

    Raises:
        ValueError: ``YARETNET_FAST_PATH`` is neither of ``0``/``1`` (or off/on, false/true, no/yes).
    """
    global _switch
    if _switch is None:
        _switch = _read_switch()
    return _switch


def _read_switch() -> bool:
    old = os.environ.get(DEPRECATED_SWITCH)
    if old is not None:
        message = f"{DEPRECATED_SWITCH} is deprecated: use {SWITCH}=0 to turn the CPU kernels off"
        warnings.warn(message, DeprecationWarning, stacklevel=3)
        _log.warning(message)
    value = os.environ.get(SWITCH)
    if value is None:
        return old is None or old.strip() != "0"
    value = value.strip().lower()
    if value not in (*OFF_WORDS, *ON_WORDS):
        raise ValueError(f"{SWITCH} must be 1 (CPU kernels on, the default) or 0 (off), got {value!r}")
    return value in ON_WORDS


def usable() -> bool:
    """Whether the kernels may run in this process: loaded, or not yet tried and not switched off.
    Pure: it never builds (what every family's ``supports`` asks)."""
    return _loaded if _loaded is not None else switch_on()


def _cpu_digest(cpuinfo: str | None = None) -> str:
    """8 hex digits naming this CPU: the vendor, model name and feature flags of the first processor
    in ``cpuinfo`` (default: ``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
    fields = first_cpu(cpuinfo) or {}
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


def _library_name(arch: str) -> str:
    # -march=native: the build is for this machine. The name carries torch's version, the CPU's
    # capability and a digest of its model and feature flags, so a cache shared across machines
    # (an Intel build, with AMX, on an AMD CPU: an illegal instruction) or torch upgrades never
    # mixes builds; the file name adds a digest of the sources, headers and flags.
    tag = f"{torch.__version__}_{torch.backends.cpu.get_cpu_capability()}_{_cpu_digest()}"
    if arch != "native":
        tag += f"_{arch}"
    return "yaretnet_cpu_" + "".join(c if c.isalnum() else "_" for c in tag)


def _flags(arch: str) -> tuple[list[str], list[str]]:
    return ["-O3", f"-march={arch}", "-fopenmp"], ["-fopenmp"]


def built_library() -> Path:
    """Where this machine's build of the extension is (or would be) cached; pure (nothing is built)."""
    from ._build import library_path

    arch = march()
    cflags, ldflags = _flags(arch)
    return library_path(_library_name(arch), _SOURCES, cflags, ldflags, headers=_HEADERS)


def _build() -> bool:
    global library, error
    if not switch_on():
        return False
    arch = march()  # a malformed value is the user's mistake: raised, not a silent fallback
    tuning = decode_tuning()  # the same
    try:
        from ._build import build_and_load

        name = _library_name(arch)
        cflags, ldflags = _flags(arch)
        _log.info("loading the CPU extension %s (built once per machine)", name)
        library = build_and_load(name, _SOURCES, cflags=cflags, ldflags=ldflags, headers=_HEADERS,
                                 include_dirs=[CSRC], notice=COMPILE_NOTICE)
        torch.ops.yaretnet.set_decode_tuning(tuning.float_prefetch, tuning.int_prefetch, tuning.stream_state)
        for family in _REGISTERING:
            importlib.import_module(f"{__package__}.{family}").register()
        return True
    except Exception as exc:  # no compiler, no ninja, unsupported platform: fall back
        error = f"{type(exc).__name__}: {exc}"
        _log.warning("CPU extension unavailable, using plain PyTorch (%s)", error)
        return False


def is_compiling() -> bool:
    """Whether dynamo is tracing this call (``torch.compiler.is_compiling`` is torch >= 2.3)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    # torch 2.2: dynamo's own answer, where it is loaded at all (nothing compiles without it, and
    # importing it here would cost every process ~70 MiB).
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and bool(dynamo.is_compiling())


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


def register_fake(op: str) -> Callable[[Callable[..., Any]], Any]:
    """``torch.library.register_fake`` (``impl_abstract`` before torch 2.4): the decorator that
    gives ``op`` its shape-only form, so ``torch.compile`` can trace through it."""
    register = getattr(torch.library, "register_fake", None) or torch.library.impl_abstract
    return register(op)


def contiguous_like(t: Tensor) -> Tensor:
    """An empty tensor shaped like ``t``, contiguous: what the kernels' outputs and gradients are."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def load() -> bool:
    """Whether the extension is loaded (building it on the first call; see :func:`usable` for
    the question without a build)."""
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build()
    return _loaded
