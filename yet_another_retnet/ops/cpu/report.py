"""``retnet info --kernels``: which CPU fast paths this process takes, and why not.

For every kernel family of :mod:`yet_another_retnet.ops.cpu`: whether this machine and process
take it (the switch, the build, the torch version) and, where it does, on which inputs (dtypes,
sizes, thread count); which kernel runs, which plain PyTorch reference it replaces, which test
checks the two against each other. :func:`kernel_report` returns it as data, :func:`format_report`
as text.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import _extension, machine

__all__ = ["FAST_PATHS", "FastPath", "cmd_kernels", "format_report", "kernel_report"]


@dataclass(frozen=True)
class FastPath:
    """One fast path: where it lives, what it takes, what it is checked against."""

    name: str
    #: The wrapper module (and its predicate).
    module: str
    #: The C++ source and the op(s) it registers.
    kernel: str
    #: The plain PyTorch form it replaces (and is tested against).
    reference: str
    test: str
    #: The inputs it takes, in words (what its ``supports`` checks).
    takes: str
    #: Its backward is registered through ``torch.library.register_autograd`` (torch >= 2.4).
    needs_autograd: bool = False
    #: It splits its work over (batch, head) walks only: taken when they spread over the threads.
    walks: bool = False


FAST_PATHS = (
    FastPath("decoding matrix-vector product", "ops/cpu/gemv.py: supports", "ops/cpu/csrc/gemv.cpp: yaretnet::gemv",
             "torch.mv / torch.addmv", "tests/cpu/test_gemv.py",
             "CPU float32/bfloat16 weight (rows, cols), a vector, no autograd"),
    FastPath("chunk-state scan", "ops/cpu/chunk_scan.py: supports", "ops/cpu/csrc/chunk_scan.cpp: yaretnet::chunk_scan",
             "the decay-matrix product in ops/retention.py", "tests/cpu/test_chunk_scan.py",
             "CPU float32, a constant decay", needs_autograd=True),
    FastPath("per-chunk products", "ops/cpu/chunk_kernels.py: supports",
             "ops/cpu/csrc/chunk_kernels.cpp: yaretnet::chunk_contributions, chunk_output",
             "chunk_contributions_reference, chunk_output_reference", "tests/cpu/test_chunk_kernels.py",
             "CPU float32, chunk, key and head width multiples of 32, constant decay tables",
             needs_autograd=True),
    FastPath("chunkwise retention in one op", "ops/cpu/chunk_kernels.py: supports_chunk_retention",
             "ops/cpu/csrc/chunk_kernels.cpp: yaretnet::chunk_retention", "chunk_retention_reference",
             "tests/cpu/test_chunk_kernels.py", "as the per-chunk products", needs_autograd=True, walks=True),
    FastPath("head norm and swish gate", "ops/cpu/norm_gate.py: supports", "ops/cpu/csrc/norm_gate.cpp: yaretnet::norm_gate",
             "norm_gate_reference", "tests/cpu/test_norm_gate.py",
             "CPU float32, head width a multiple of 16", needs_autograd=True),
    FastPath("projection split into rotated heads", "ops/cpu/split_heads.py: supports",
             "ops/cpu/csrc/split_heads.cpp: yaretnet::split_heads", "split_heads_reference", "tests/cpu/test_split_heads.py",
             "CPU float32 projection (batch, length, width), constant rotation tables", needs_autograd=True),
    FastPath("a retention layer's core in one op", "ops/cpu/retention_core.py: supports",
             "ops/cpu/csrc/retention_core.cpp: yaretnet::retention_core", "retention_core_reference",
             "tests/cpu/test_retention_core.py",
             "CPU float32, whole chunks, chunk, key and head width multiples of 32, constant tables",
             needs_autograd=True, walks=True),
    FastPath("GELU feed-forward autograd node", "ops/cpu/mlp.py: supports", "ops/cpu/csrc/mlp.cpp: yaretnet::gelu_slope",
             "gelu_mlp_reference", "tests/cpu/test_gelu_mlp.py",
             "CPU float32 with a gradient to come, outside autocast and torch.compile"),
    FastPath("transposed copy of a weight gradient", "ops/cpu/matmul.py: supports",
             "ops/cpu/csrc/matmul.cpp: yaretnet::transpose_copy", "x.t().contiguous()", "tests/cpu/test_matmul.py",
             "2-D CPU float32, on the oneDNN products backend"),
    FastPath("buffer cache across training steps", "ops/cpu/memory.py: supports",
             "ops/cpu/csrc/memory.cpp: yaretnet::cpu_memory_cache_enable", "the plain allocator", "tests/cpu/test_buffer_cache.py",
             "CPU tensors of at least 1 MiB inside cached_cpu_memory()"),
    FastPath("decoding step of a layer", "ops/cpu/decode_step.py: supports, layer_step_plan",
             "ops/cpu/csrc/decode_step.cpp: yaretnet::retention_step, decoder_layer_step (and their _inplace forms)",
             "retention_step_reference, the decoder layer's PyTorch step", "tests/cpu/test_decode_step.py",
             "CPU float32/bfloat16 (or int8/int4 products), float32 memory, no autograd, up to 32 rows (a whole "
             "layer); bfloat16 weights on VDPBF16PS with AVX512-BF16 (gemv.bf16_dot)"),
    FastPath("int8 and int4 weight products", "ops/cpu/quantized.py: qlinear, qlinear_int4",
             "ops/cpu/csrc/quantized.cpp: yaretnet::qlinear_int8, qlinear_int4 (int_dot.h: VPDPWSSD with AVX512-VNNI)",
             "qlinear_reference, qlinear_int4_reference", "tests/models/test_quantized.py",
             "CPU float32/bfloat16 input, int8/int4 weights, up to 32 rows, no autograd; with AVX512-VNNI the "
             "input rounded to 16 bits (quantized.integer_dot)"),
)


def _switch_text() -> str:
    for name in (_extension.SWITCH, _extension.DEPRECATED_SWITCH):
        if name in os.environ:
            return f"{name}={os.environ[name]}"
    return f"{_extension.SWITCH} unset (on)"


def _build_problem() -> str | None:
    """Why the extension is not loaded here (``None``: it is)."""
    if not _extension.switch_on():
        return f"switched off ({_switch_text()})"
    if _extension.load():
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found): the kernels cannot be built"
    if shutil.which("ninja") is None:
        return "no ninja (pip install ninja): the kernels cannot be built"
    return f"the build failed ({_extension.error})"


def _isa() -> str:
    arch = _extension.march()
    if arch == "native":
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
        wide = "avx512f" in flags.split()
    else:
        wide = False  # a named portable target (x86-64-v3) has no AVX-512
    branches = "AVX-512 branches" if wide else "portable branches (no AVX-512)"
    return f"-march={arch}: {branches}"


def _tuning_text(loaded: bool) -> str:
    """How the decoding kernels move memory in this process, and why."""
    try:
        tuning = machine.decode_tuning()
    except ValueError as err:
        return f"unusable: {err}"
    floats, ints, stream = tuning.float_prefetch, tuning.int_prefetch, tuning.stream_state
    if loaded:  # what the kernels were given
        floats, ints, stream = torch.ops.yaretnet.decode_tuning()
    prefetch = (f"prefetch float32/bfloat16 {floats} bytes, int8/int4 {ints} bytes ahead" if floats or ints
                else "no software prefetch")
    return f"{prefetch}, {'streaming' if stream else 'plain'} stores for the state ({tuning.why})"


def kernel_report() -> dict[str, Any]:
    """The state of every CPU fast path in this process, as JSON-ready data.

    Loads the extension (building it first if this machine has no build yet, as the first
    training step would) unless the switch is off. Keys: ``switch``, ``extension`` (``loaded`` and
    ``library`` or ``problem``), ``torch``, ``threads``, ``isa``, ``matmul_backend``,
    ``decode_tuning`` (how the decoding kernels move memory: :func:`.machine.decode_tuning`)
    and ``paths``: one entry per :data:`FAST_PATHS` with ``taken`` (bool) and ``why_not`` (``None``
    where taken)."""
    problem = _build_problem()
    threads = torch.get_num_threads()
    autograd = _extension.HAS_REGISTER_AUTOGRAD
    paths = []
    for path in FAST_PATHS:
        why_not = problem
        if why_not is None and path.needs_autograd and not autograd:
            why_not = f"torch {torch.__version__} has no torch.library.register_autograd (needs torch >= 2.4)"
        when = path.takes
        if path.walks:
            when += (f"; batch x heads a multiple of {threads} or at least {4 * threads} "
                     f"({threads} threads; else the separate ops)")
        paths.append({"name": path.name, "taken": why_not is None, "why_not": why_not, "when": when,
                      "module": path.module, "kernel": path.kernel, "reference": path.reference, "test": path.test})
    from .matmul import ENV, cpu_backend

    try:
        backend = f"{cpu_backend()} ({ENV}={os.environ.get(ENV, 'auto')})"
    except (ValueError, RuntimeError) as err:
        backend = f"unusable: {err}"
    library = _extension.library
    return {
        "switch": _switch_text(),
        "extension": {"loaded": problem is None, "library": None if library is None else str(library),
                      "problem": problem},
        "torch": torch.__version__, "threads": threads, "isa": _isa(), "matmul_backend": backend,
        "decode_tuning": _tuning_text(problem is None), "paths": paths,
    }


def format_report(report: dict[str, Any]) -> str:
    """:func:`kernel_report` as text, one block per fast path."""
    ext = report["extension"]
    lines = [f"CPU fast paths (switch: {report['switch']}; torch {report['torch']}, {report['threads']} threads, "
             f"{report['isa']})",
             f"extension: {ext['library'] if ext['loaded'] else 'not loaded: ' + ext['problem']}",
             f"large float32 products: {report['matmul_backend']}",
             f"decoding memory: {report['decode_tuning']}", ""]
    for path in report["paths"]:
        verdict = "yes" if path["taken"] else f"no: {path['why_not']}"
        lines += [f"{path['name']}: {verdict}",
                  f"    takes      {path['when']}",
                  f"    kernel     {path['kernel']}  ({path['module']})",
                  f"    reference  {path['reference']}",
                  f"    test       {path['test']}"]
    return "\n".join(lines)


def cmd_kernels(args: argparse.Namespace) -> int:
    """``retnet info --kernels [--json]`` (a model directory or preset, if given, is not needed)."""
    report = kernel_report()
    print(json.dumps(report) if args.json else format_report(report))
    return 0
