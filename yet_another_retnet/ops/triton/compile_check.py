"""Compile our kernels for a GPU architecture on a machine without a GPU, and report each
kernel's shared memory.

Triton's interpreter (how the tests run the kernels on CPU) is lax: it does not check layouts,
types the way the compiler does, or resources. This runs the real compiler down to machine code
(Triton's own front end, LLVM and the ``ptxas`` its wheel bundles; no driver needed) for the
configurations the launchers pick, so a kernel that would not compile, or would ask for more
shared memory than a block may have, shows up before a GPU session. Run::

    python -m yet_another_retnet.ops.triton.compile_check          # every dtype x head dim; exit 1 on a miss
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ._load import kernel_module
from .chunkwise import (
    DKV_WARPS,
    MAX_CHUNK,
    NUM_STAGES,
    SPLIT_WARPS,
    kernel_chunk,
    key_block,
    launch_config,
    max_chunk,
    split_blocks,
)
from .decode import _pow2

__all__ = ["SHARED_LIMIT", "Usage", "compile_chunkwise", "compile_split", "compile_step"]

#: Shared memory one block may use on an H100 (sm_90): 227 KiB.
SHARED_LIMIT = 227 * 1024
#: Integer arguments the report compiles as multiples of 16 (see ``_compile``).
_MULTIPLES_OF_16 = ("L", "DK", "DV", "CHUNK")
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _signature(fn: object, pointers: dict[str, str], constants: dict[str, object]) -> dict[str, str]:
    names: list[str] = fn.arg_names  # type: ignore[attr-defined]
    return {n: "constexpr" if n in constants else pointers.get(n, "i32") for n in names}


class Usage(NamedTuple):
    """A compiled kernel's resources: shared memory (bytes), registers per thread, and stack bytes
    per thread (registers spilled to local memory, 0 when none spill; ``None`` where cuobjdump is missing)."""

    shared: int
    registers: int | None
    stack: int | None


def _compile(fn: object, pointers: dict[str, str], constants: dict[str, object], arch: int,
             options: dict[str, int]) -> Usage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = _signature(fn, pointers, constants)
    # As Triton's JIT specializes a launch: pointers 16-byte aligned (as torch allocates) and the
    # sizes divisible by 16 (the lengths, head dims and chunks measured are). Without these hints
    # the compiler can prove no alignment and emits scalar, unpipelined loads.
    names: list[str] = fn.arg_names  # type: ignore[attr-defined]
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*") or n in _MULTIPLES_OF_16}
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    registers = stack = None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if tool.exists() and "cubin" in kernel.asm:  # the register and stack figures ptxas decided
        with tempfile.TemporaryDirectory() as folder:
            cubin = Path(folder) / "kernel.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            report = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True,
                                    text=True, check=False).stdout
        found = re.search(r"REG:(\d+) STACK:(\d+)", report)
        if found:
            registers, stack = int(found.group(1)), int(found.group(2))
    return Usage(int(kernel.metadata.shared), registers, stack)


def compile_chunkwise(dtype: torch.dtype, dk: int, dv: int, chunk_size: int = 64, arch: int = 90) -> dict[str, Usage]:
    """The resources of the three chunkwise kernels as the launcher would configure them."""
    chunk = kernel_chunk(chunk_size, 1 << 30, max_chunk(dtype, dk))
    bc, bk, bv, warps = launch_config(dk, dv, chunk)
    io = _TYPES[dtype]
    pointers = {n: f"*{io}" for n in ("q", "k", "v", "o", "do")}
    pointers.update({n: "*fp32" for n in ("s0", "sT", "lg_ptr", "dq", "dk", "dv", "dsT", "ds0")})
    pointers["scale"] = "fp32"
    kernels = kernel_module("chunkwise_kernels", interpret=False)
    options = {"num_warps": warps, "num_stages": NUM_STAGES}
    blocks = {"BC": bc, "BK": bk, "BV": bv}
    return {
        "forward": _compile(kernels._chunk_fwd, pointers, {**blocks, "HAS_S0": True, "STORE_S": True}, arch, options),
        "backward dq": _compile(kernels._chunk_bwd_dq, pointers, {**blocks, "HAS_S0": True}, arch, options),
        "backward dk dv": _compile(kernels._chunk_bwd_dkv, pointers,
                                   {**blocks, "BK": key_block(bk), "HAS_DST": True, "STORE_DS0": True}, arch,
                                   {"num_warps": DKV_WARPS, "num_stages": NUM_STAGES}),
    }


def compile_split(dtype: torch.dtype, dk: int, dv: int, chunk_size: int = 64, arch: int = 90) -> dict[str, Usage]:
    """The resources of the split schedule's five kernels as its launcher would configure them."""
    bc, bk, bv = split_blocks(dk, dv, kernel_chunk(chunk_size, 1 << 30, MAX_CHUNK))
    io = _TYPES[dtype]
    pointers = {n: f"*{io}" for n in ("q", "k", "v", "o", "do", "h", "dh", "dq", "dk", "dv")}
    pointers.update({n: "*fp32" for n in ("s0", "sT", "lg_ptr", "dsT", "ds0")})
    pointers["scale"] = "fp32"
    kernels = kernel_module("chunkwise_split_kernels", interpret=False)
    blocks: dict[str, object] = {"BC": bc, "BK": bk, "BV": bv}
    options = {"num_warps": SPLIT_WARPS, "num_stages": NUM_STAGES}
    return {
        "split states": _compile(kernels._split_states, pointers, {**blocks, "HAS_S0": True, "STORE_S": True},
                                 arch, options),
        "split out": _compile(kernels._split_out, pointers, blocks, arch, options),
        "split state grads": _compile(kernels._split_state_grads, pointers,
                                      {**blocks, "HAS_DST": True, "STORE_DS0": True}, arch, options),
        "split dq dk": _compile(kernels._split_dqk, pointers, blocks, arch, options),
        "split dv": _compile(kernels._split_dv, pointers, blocks, arch, options),
    }


def compile_step(dtype: torch.dtype, dk: int, dv: int, arch: int = 90) -> Usage:
    """The resources of the decoding step kernel as its launcher configures it."""
    bk = _pow2(dk)
    bv = min(_pow2(dv), 64 if bk <= 64 else 32)
    io = _TYPES[dtype]
    pointers = {n: f"*{io}" for n in ("q", "k", "v", "o")}
    pointers.update({"s0": "*fp32", "s1": "*fp32", "g_ptr": "*fp32", "scale": "fp32"})
    kernels = kernel_module("decode_kernels", interpret=False)
    return _compile(kernels._step, pointers, {"BK": bk, "BV": bv, "HAS_S0": True}, arch, {"num_warps": 4})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yet_another_retnet.ops.triton.compile_check",
                                     description="Compile our Triton kernels for sm_<arch> without a GPU.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100)")
    parser.add_argument("--head-dims", default="16,64,128,256", help="key head dims to compile (value dim = 2x)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    misses = 0
    for dtype in _TYPES:
        for dk in (int(x) for x in args.head_dims.split(",")):
            shared = compile_chunkwise(dtype, dk, 2 * dk, arch=args.arch)
            shared.update(compile_split(dtype, dk, 2 * dk, arch=args.arch))
            shared["step"] = compile_step(dtype, dk, 2 * dk, arch=args.arch)
            worst = max(u.shared for u in shared.values())
            misses += worst > SHARED_LIMIT
            cells = ", ".join(f"{name} {u.shared // 1024} KiB shared, {u.registers} registers, {u.stack} B stack"
                              for name, u in shared.items())
            print(f"{_TYPES[dtype]} dk {dk} dv {2 * dk}: {cells}{'  OVER THE LIMIT' if worst > SHARED_LIMIT else ''}",
                  flush=True)
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
