"""Chunkwise retention on CUDA through our own Triton kernels, in two schedules.

:func:`chunk_retention_triton` is the same function as
:func:`~yet_another_retnet.ops.retention.retention_chunkwise` on checked inputs, with its own
backward (an ``autograd.Function``): gradients for ``q``, ``k``, ``v`` and the initial state, and
the final state differentiable too (a state handed from one call to the next carries gradients).

- Schedules (:data:`SCHEDULES`, chosen by ``schedule=`` or :data:`SCHEDULE_ENV`): ``"split"`` (the
  default; ``chunkwise_split_kernels.py``) writes the state before every chunk, then forms all
  chunks' outputs at once; ``"fused"`` (``chunkwise_kernels.py``) walks the chunks in one program
  per head and value block, keeping the state in registers.
- Decay: one ``log(gamma)`` per head, from :mod:`yet_another_retnet.ops.decay` (any schedule or
  tensor of gammas), computed there in float64 and handed over in float32.
- Precision: inputs in float32, bfloat16 or float16; every product accumulates in float32 and
  the returned state is float32. The split schedule's products take operands in the inputs'
  dtype; the fused one's in float32. On a GPU float32 products use TF32 (Triton's default), which
  is why the tests' tolerances are set for TF32.
- Any length and chunk size: the last chunk may be shorter. A ``chunk_size`` over what a schedule
  holds at once (64 rows; the fused one 32 for key dims over 64, :func:`max_chunk`) runs in
  chunks of that size, which computes the same function (every chunking does, up to rounding).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor

from ._load import interpreter, kernel_module, outside_graphs

__all__ = [
    "KEY_BLOCK",
    "MAX_CHUNK",
    "MAX_KEY_DIM",
    "NUM_STAGES",
    "SCHEDULES",
    "SCHEDULE_ENV",
    "SPLIT_STATES_BUDGET",
    "chunk_retention_triton",
    "kernel_chunk",
    "key_block",
    "launch_config",
    "max_chunk",
    "schedule_from_env",
    "split_blocks",
]

#: The most rows per chunk the kernels hold at once.
MAX_CHUNK = 64
#: The largest key head dimension: the whole key dimension of a state block sits in registers.
MAX_KEY_DIM = 256


def _pow2(n: int, least: int = 16) -> int:
    """The smallest power of two >= ``max(n, least)`` (``tl.dot`` wants sides of 16 or more)."""
    p = least
    while p < n:
        p *= 2
    return p


def max_chunk(dtype: torch.dtype, dk: int) -> int:
    """The most rows per chunk for inputs of ``dtype`` and key dim ``dk``: :data:`MAX_CHUNK`, or
    half of it for key dims over 64. Compiled for sm_90 (``ops/triton/compile_check.py``), 64-row
    chunks at ``dk`` 128-256 spill registers in every kernel (bf16, dk 128: 504 bytes of stack in
    the forward, none at 32 rows) and, for float32 inputs at ``dk`` 256, would need more shared
    memory than an H100 block has (248 KiB against 227)."""
    del dtype  # (the same rule holds for every input dtype since the key dim was tiled in the backward)
    return MAX_CHUNK // 2 if dk > 64 else MAX_CHUNK


def kernel_chunk(chunk_size: int | None, length: int, limit: int = MAX_CHUNK) -> int:
    """The chunk the kernels run for a requested ``chunk_size`` over ``length`` tokens."""
    chunk = length if chunk_size is None else min(chunk_size, length)
    return max(1, min(chunk, limit))


#: Software-pipelining depth of the chunk loops: Triton's default (3) buffers a third copy of
#: every tile in shared memory, which the wide float32 configurations cannot hold.
NUM_STAGES = 2


#: Key columns per program in the backward's dk/dv kernel (the other kernels hold the whole key dim).
KEY_BLOCK = 64


#: Warps of the dk/dv kernel (its tiles are at most 64 key columns wide).
DKV_WARPS = 4


def key_block(bk: int) -> int:
    """The key block of the dk/dv kernel for a padded key dim ``bk``."""
    return min(bk, KEY_BLOCK)


def launch_config(dk: int, dv: int, chunk: int) -> tuple[int, int, int, int]:
    """``(BC, BK, BV, num_warps)``: value blocks narrower where the key dimension is wide, so
    that a state block (``BK x BV`` float32) stays in registers."""
    bk = _pow2(dk)
    bv = min(_pow2(dv), 64 if bk < 64 else 32)
    warps = 4 if bk <= 64 else 8
    return _pow2(chunk), bk, bv, warps


def on_device(t: Tensor) -> contextlib.AbstractContextManager[Any]:
    """Make ``t``'s GPU the current one for a launch: Triton launches on the current CUDA device,
    not the tensors', so tensors on ``cuda:1`` with ``cuda:0`` current would be read from the
    wrong device. Nothing to do for the interpreter (CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


class _ChunkRetention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, s0: Tensor | None, log_gamma: Tensor,
                scale: float, chunk: int) -> tuple[Tensor, Tensor]:
        interpret = q.device.type != "cuda"
        _chunk_fwd = kernel_module("chunkwise_kernels", interpret)._chunk_fwd
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, length, dk = q.shape
        dv = v.shape[-1]
        out = torch.empty_like(v)
        final = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=q.device)
        s0c = None if s0 is None else s0.to(torch.float32).contiguous()
        bc, bk, bv, warps = launch_config(dk, dv, chunk)
        grid = (triton_cdiv(dv, bv), batch * heads)
        with interpreter(interpret), on_device(q):
            _chunk_fwd[grid](q, k, v, out, s0c if s0c is not None else final, final, log_gamma, scale,
                             length, heads, dk, dv, chunk, BC=bc, BK=bk, BV=bv, HAS_S0=s0c is not None,
                             STORE_S=True, num_warps=warps, num_stages=NUM_STAGES)
        ctx.save_for_backward(q, k, v, s0c, log_gamma)
        ctx.scale, ctx.chunk, ctx.s0_dtype = scale, chunk, None if s0 is None else s0.dtype
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_out: Tensor | None, d_final: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, s0, log_gamma = ctx.saved_tensors
        interpret = q.device.type != "cuda"
        kernels = kernel_module("chunkwise_kernels", interpret)
        batch, heads, length, dk = q.shape
        dv = v.shape[-1]
        bc, bk, bv, warps = launch_config(dk, dv, ctx.chunk)
        nv = triton_cdiv(dv, bv)
        grid = (nv, batch * heads)
        do = torch.zeros_like(v) if d_out is None else d_out.contiguous()
        dst = None if d_final is None else d_final.to(torch.float32).contiguous()
        # dq and dk sum over the value dimension: one share per value block, summed here.
        dq = torch.empty(nv, batch, heads, length, dk, dtype=torch.float32, device=q.device)
        dk_ = torch.empty_like(dq)
        # ... and dv over the key dimension, tiled in blocks of bkd in its kernel.
        bkd = key_block(bk)
        nk = triton_cdiv(dk, bkd)
        dv_ = torch.empty(nk, batch, heads, length, dv, dtype=torch.float32, device=q.device)
        ds0 = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=q.device) if s0 is not None else None
        with interpreter(interpret), on_device(q):
            kernels._chunk_bwd_dq[grid](q, k, v, do, s0 if s0 is not None else dv_, dq, log_gamma, ctx.scale,
                                        length, heads, dk, dv, ctx.chunk, batch * heads, BC=bc, BK=bk, BV=bv,
                                        HAS_S0=s0 is not None, num_warps=warps,
                                        num_stages=NUM_STAGES)
            kernels._chunk_bwd_dkv[(nv, batch * heads, nk)](
                q, k, v, do, dst if dst is not None else dv_, dk_, dv_, ds0 if ds0 is not None else dv_, log_gamma,
                ctx.scale, length, heads, dk, dv, ctx.chunk, batch * heads, triton_cdiv(length, ctx.chunk),
                BC=bc, BK=bkd, BV=bv, HAS_DST=dst is not None, STORE_DS0=ds0 is not None, num_warps=DKV_WARPS,
                num_stages=NUM_STAGES)
        grad_s0 = None if ds0 is None else ds0.to(ctx.s0_dtype)
        return (dq.sum(0).to(q.dtype), dk_.sum(0).to(k.dtype), dv_.sum(0).to(v.dtype), grad_s0, None, None, None)


class _SplitChunkRetention(torch.autograd.Function):
    """The ``"split"`` schedule (``chunkwise_split_kernels.py``): the states per chunk first, then
    every chunk's output at once; the backward likewise. ``h`` is recomputed in the backward
    rather than kept (at fla's 1.3B sizes it is ~270 MB a layer for 8k tokens in bf16)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, s0: Tensor | None, log_gamma: Tensor,
                scale: float, chunk: int) -> tuple[Tensor, Tensor]:
        interpret = q.device.type != "cuda"
        kernels = kernel_module("chunkwise_split_kernels", interpret)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        s0c = None if s0 is None else s0.to(torch.float32).contiguous()
        out = torch.empty_like(v)
        h, final = _split_states(kernels, k, v, s0c, log_gamma, scale, chunk, want_final=True)
        batch, heads, length, dk = q.shape
        dv = v.shape[-1]
        bc, bk, bv = split_blocks(dk, dv, chunk)
        with interpreter(interpret), on_device(q):
            kernels._split_out[(triton_cdiv(dv, bv), h.shape[1], batch * heads)](
                q, k, v, h, out, log_gamma, scale, length, heads, dk, dv, chunk, h.shape[1],
                BC=bc, BK=bk, BV=bv, num_warps=SPLIT_WARPS, num_stages=NUM_STAGES)
        del h
        ctx.save_for_backward(q, k, v, s0c, log_gamma)
        ctx.scale, ctx.chunk, ctx.s0_dtype = scale, chunk, None if s0 is None else s0.dtype
        assert final is not None
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, d_out: Tensor | None, d_final: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, s0, log_gamma = ctx.saved_tensors
        interpret = q.device.type != "cuda"
        kernels = kernel_module("chunkwise_split_kernels", interpret)
        batch, heads, length, dk = q.shape
        dv = v.shape[-1]
        chunk = ctx.chunk
        bc, bk, bv = split_blocks(dk, dv, chunk)
        nk, nv, nt = triton_cdiv(dk, bk), triton_cdiv(dv, bv), triton_cdiv(length, chunk)
        do = torch.zeros_like(v) if d_out is None else d_out.to(v.dtype).contiguous()
        dst = None if d_final is None else d_final.to(torch.float32).contiguous()
        h, _ = _split_states(kernels, k, v, s0, log_gamma, ctx.scale, chunk, want_final=False)
        dh = torch.empty_like(h)
        ds0 = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=q.device) if s0 is not None else None
        dq, dk_, dv_ = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        sizes = (length, heads, dk, dv, chunk, nt)
        with interpreter(interpret), on_device(q):
            kernels._split_state_grads[(nk, nv, batch * heads)](
                q, do, dh, dst if dst is not None else dh, ds0 if ds0 is not None else dh, log_gamma, *sizes,
                BC=bc, BK=bk, BV=bv, HAS_DST=dst is not None, STORE_DS0=ds0 is not None,
                num_warps=SPLIT_WARPS, num_stages=NUM_STAGES)
            kernels._split_dqk[(nk, nt, batch * heads)](
                q, k, v, do, h, dh, dq, dk_, log_gamma, ctx.scale, *sizes, BC=bc, BK=bk, BV=bv,
                num_warps=SPLIT_WARPS, num_stages=NUM_STAGES)
            kernels._split_dv[(nv, nt, batch * heads)](
                q, k, do, dh, dv_, log_gamma, ctx.scale, *sizes, BC=bc, BK=bk, BV=bv,
                num_warps=SPLIT_WARPS, num_stages=NUM_STAGES)
        grad_s0 = None if ds0 is None else ds0.to(ctx.s0_dtype)
        return dq, dk_, dv_, grad_s0, None, None, None


#: Warps per program of the split schedule's kernels. Compiled for sm_90 (``compile_check.py``),
#: at 64 x 64 tiles no kernel spills with 4 warps or 8; 8 halves each thread's share of a tile
#: (71-128 registers), which most helps the two recurrences, whose chunks run one after another.
#: Not yet tuned on a GPU.
SPLIT_WARPS = 8


def split_blocks(dk: int, dv: int, chunk: int) -> tuple[int, int, int]:
    """``(BC, BK, BV)`` of the split schedule: tiles of at most 64 key and 64 value columns (every
    kernel there tiles both dims, so any ``dk <= MAX_KEY_DIM`` fits, in chunks of 64)."""
    return _pow2(chunk), min(_pow2(dk), 64), min(_pow2(dv), 64)


#: Bytes of ``h`` (the state before every chunk) a split call without gradients holds at once:
#: a longer prefill runs in pieces (at fla's 1.3B sizes ``h`` is 32 KiB a token in bf16, so a
#: million-token prompt would otherwise need 32 GiB for it).
SPLIT_STATES_BUDGET = 1 << 30


def _split_piece(q: Tensor, v: Tensor, chunk: int) -> int:
    """Tokens per piece of a split call without gradients: whole chunks whose ``h`` fits
    :data:`SPLIT_STATES_BUDGET` (at least one chunk)."""
    batch, heads, _, dk = q.shape
    per_chunk = batch * heads * dk * v.shape[-1] * q.element_size()
    return max(1, SPLIT_STATES_BUDGET // max(1, per_chunk)) * chunk


def _split_states(kernels: Any, k: Tensor, v: Tensor, s0: Tensor | None, log_gamma: Tensor, scale: float,
                  chunk: int, want_final: bool) -> tuple[Tensor, Tensor | None]:
    """``h`` ``(batch * heads, n_chunks, dk, dv)`` in the inputs' dtype: the state before each
    chunk; and the final state (float32) when ``want_final``."""
    batch, heads, length, dk = k.shape
    dv = v.shape[-1]
    bc, bk, bv = split_blocks(dk, dv, chunk)
    nt = triton_cdiv(length, chunk)
    h = torch.empty(batch * heads, nt, dk, dv, dtype=k.dtype, device=k.device)
    final = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=k.device) if want_final else None
    with interpreter(k.device.type != "cuda"), on_device(k):
        kernels._split_states[(triton_cdiv(dk, bk), triton_cdiv(dv, bv), batch * heads)](
            k, v, h, s0 if s0 is not None else h, final if final is not None else h, log_gamma, scale,
            length, heads, dk, dv, chunk, nt, BC=bc, BK=bk, BV=bv, HAS_S0=s0 is not None,
            STORE_S=want_final, num_warps=SPLIT_WARPS, num_stages=NUM_STAGES)
    return h, final


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


#: The environment variable that picks the chunkwise kernels' schedule (read on each call).
SCHEDULE_ENV = "YARETNET_TRITON_SCHEDULE"
#: ``"split"`` (the default): states first, then all chunks at once (``chunkwise_split_kernels.py``);
#: ``"fused"``: one program per head and value block walks every chunk (``chunkwise_kernels.py``).
SCHEDULES = ("split", "fused")


def schedule_from_env() -> str:
    """``YARETNET_TRITON_SCHEDULE`` (``split`` when unset or empty); anything else is a ``ValueError``."""
    wanted = os.environ.get(SCHEDULE_ENV, "").strip().lower() or "split"
    if wanted not in SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV} must be one of {SCHEDULES}, got {wanted!r}")
    return wanted


# torch.compile runs this eagerly, as a graph break (_load.outside_graphs); the rest of a compiled
# model (projections, norms, gate) still compiles around it.
@outside_graphs
def chunk_retention_triton(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None,
                           chunk_size: int | None, log_gamma: Tensor, scale: float,
                           schedule: str | None = None) -> tuple[Tensor, Tensor]:
    """Chunkwise retention through the Triton kernels, differentiable.

    Args:
        q, k: ``(batch, heads, length, dk)``; v: ``(batch, heads, length, dv)``; one dtype among
            float32, bfloat16 and float16, ``dk <= MAX_KEY_DIM``, length >= 1.
        prev_state: ``(batch, heads, dk, dv)`` or ``None``.
        chunk_size: requested chunk (``None``: the whole input), run as :func:`kernel_chunk`.
        log_gamma: ``(heads,)`` ``log(gamma)`` (float64 from ``ops/decay.py``; handed to the kernels
            in float32).
        scale: the key scale.
        schedule: ``"split"`` or ``"fused"`` (see :data:`SCHEDULES`); ``None`` reads
            :data:`SCHEDULE_ENV`.

    Returns ``(out (batch, heads, length, dv) in q's dtype, state (batch, heads, dk, dv) float32)``.
    """
    schedule = schedule_from_env() if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    lg = log_gamma.detach().to(device=q.device, dtype=torch.float32).contiguous()
    if schedule == "split":
        chunk = kernel_chunk(chunk_size, q.shape[2], MAX_CHUNK)
        wants_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, prev_state))
        piece = _split_piece(q, v, chunk)
        if wants_grad or piece >= q.shape[2]:
            return _SplitChunkRetention.apply(q, k, v, prev_state, lg, float(scale), chunk)
        # Without gradients (a prefill), pieces of whole chunks with the state handed on: the
        # same chunks, so the same function, with h held for one piece at a time.
        outs, state = [], prev_state
        for t0 in range(0, q.shape[2], piece):
            part = slice(t0, t0 + piece)
            out, state = _SplitChunkRetention.apply(q[:, :, part], k[:, :, part], v[:, :, part], state, lg,
                                                    float(scale), chunk)
            outs.append(out)
        assert state is not None
        return torch.cat(outs, dim=2), state
    chunk = kernel_chunk(chunk_size, q.shape[2], max_chunk(q.dtype, q.shape[-1]))
    out, final = _ChunkRetention.apply(q, k, v, prev_state, lg, float(scale), chunk)
    return out, final
