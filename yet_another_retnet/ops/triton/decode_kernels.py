"""Triton kernel of one recurrent retention step (launched from ``decode.py``; imported only
once a call is routed here, like ``chunkwise_kernels.py``).

Per head, one token: ``S' = g S + s k^T v`` and ``o = q S'``, the state block read once and
written once (the step is bound by reading the state).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _step(q, k, v, s0, s1, o, g_ptr, scale, H, DK, DV,
          BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    g = tl.load(g_ptr + bh % H)
    rk = tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    bq = tl.load(q + bh.to(tl.int64) * DK + rk, mask=mk, other=0.0).to(tl.float32)
    bk = tl.load(k + bh.to(tl.int64) * DK + rk, mask=mk, other=0.0).to(tl.float32)
    bv = tl.load(v + bh.to(tl.int64) * DV + rv, mask=mv, other=0.0).to(tl.float32)
    s_off = bh.to(tl.int64) * DK * DV + rk[:, None] * DV + rv[None, :]
    S = (bk * scale)[:, None] * bv[None, :]
    if HAS_S0:
        S += g * tl.load(s0 + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    tl.store(s1 + s_off, S, mask=mk[:, None] & mv[None, :])
    # tl.reduce with our own combine, not tl.sum: see chunkwise_kernels.py on library helpers.
    out = tl.reduce(bq[:, None] * S, 0, _add)
    tl.store(o + bh.to(tl.int64) * DV + rv, out.to(o.dtype.element_ty), mask=mv)
