"""Triton kernels of chunkwise retention, forward and backward (launched from ``chunkwise.py``).

Kept apart from the launcher so that importing the launcher never imports Triton: this module is
only imported once a call has been routed to the kernels, which lets a test set
``TRITON_INTERPRET=1`` before Triton's decorators read it.

Per head (decay ``g = exp(lg)``, key scale ``s``), a chunk of ``c`` rows starting at ``t0``, rows
``i, j`` counted from the chunk's start, ``S`` the state before the chunk (``dk x dv``)::

    O_i   = sum_{j <= i} g^(i-j) s (q_i . k_j) v_j  +  g^(i+1) q_i S
    S'    = g^c S  +  sum_j g^(c-1-j) s k_j^T v_j

Each program owns one ``(batch, head)`` and one block of ``BV`` value columns and walks the chunks
in order, the state block held in registers in float32. In the forward and the ``dq`` kernel the
whole key dimension sits in one block (``BK`` >= ``dk``), so an output block is complete in one
program; the ``dk``/``dv`` kernel also tiles the key columns. Gradients that sum over a dimension
split across programs are written per block and summed by the launcher (``dq`` and ``dk`` over
value blocks, ``dv`` over key blocks).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Only Triton's builtins below (no ``@triton.jit`` helpers of ``triton.language`` such as ``tl.zeros``,
# ``tl.cdiv`` or ``tl.sum``): those are decorated once, when Triton is first imported, in whichever mode was on
# then, and this module may run interpreted in a process that imported Triton compiled (_load.py).


@triton.jit
def _chunk_fwd(q, k, v, o, s0, sT, lg_ptr, scale, L, H, DK, DV, CHUNK,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               HAS_S0: tl.constexpr, STORE_S: tl.constexpr):
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    qk_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    s_base = bh.to(tl.int64) * DK * DV
    if HAS_S0:
        S = tl.load(s0 + s_base + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        S = S.to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, dtype=tl.float32)
    # Decay inside a chunk: D[i, j] = g^(i-j) for i >= j (the exponent clamped so that the
    # unused upper triangle cannot overflow), and g^(i+1) on the state before it.
    dist = ri[:, None] - ri[None, :]
    D = tl.where(dist >= 0, tl.exp(lg * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    qdec = tl.exp(lg * (ri + 1).to(tl.float32))
    for t0 in range(0, L, CHUNK):
        c = tl.minimum(CHUNK, L - t0)
        mr = ri < c
        rows = t0 + ri
        bq = tl.load(q + qk_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k + qk_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bq = bq.to(tl.float32)
        bk = bk.to(tl.float32)
        bv = bv.to(tl.float32)
        scores = tl.dot(bq, tl.trans(bk)) * (D * scale)
        out = tl.dot(scores, bv) + tl.dot(bq * qdec[:, None], S)
        tl.store(o + v_base + rows[:, None] * DV + rv[None, :], out.to(o.dtype.element_ty),
                 mask=mr[:, None] & mv[None, :])
        # Row j's weight in the new state is g^(c-1-j) s; rows past the chunk's end (zeros) get 0,
        # never a negative power of g.
        kdec = tl.where(mr, tl.exp(lg * tl.maximum(c - 1 - ri, 0).to(tl.float32)) * scale, 0.0)
        S = S * tl.exp(lg * c.to(tl.float32)) + tl.dot(tl.trans(bk * kdec[:, None]), bv)
    if STORE_S:
        tl.store(sT + s_base + rk[:, None] * DV + rv[None, :], S, mask=mk[:, None] & mv[None, :])


@triton.jit
def _chunk_bwd_dq(q, k, v, do, s0, dq, lg_ptr, scale, L, H, DK, DV, CHUNK, BH,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
    """``dq`` (this value block's share) walking the chunks forward, the state recomputed:
    ``dq_i = sum_{j <= i} g^(i-j) s (do_i . v_j) k_j + g^(i+1) do_i S^T``."""
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    qk_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    s_base = bh.to(tl.int64) * DK * DV
    dq_base = (pv.to(tl.int64) * BH + bh) * L * DK
    if HAS_S0:
        S = tl.load(s0 + s_base + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        S = S.to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, dtype=tl.float32)
    dist = ri[:, None] - ri[None, :]
    D = tl.where(dist >= 0, tl.exp(lg * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    qdec = tl.exp(lg * (ri + 1).to(tl.float32))
    for t0 in range(0, L, CHUNK):
        c = tl.minimum(CHUNK, L - t0)
        mr = ri < c
        rows = t0 + ri
        bk = tl.load(k + qk_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bdo = tl.load(do + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bk = bk.to(tl.float32)
        bv = bv.to(tl.float32)
        bdo = bdo.to(tl.float32)
        ds = tl.dot(bdo, tl.trans(bv)) * (D * scale)
        bdq = tl.dot(ds, bk) + tl.dot(bdo, tl.trans(S)) * qdec[:, None]
        tl.store(dq + dq_base + rows[:, None] * DK + rk[None, :], bdq, mask=mr[:, None] & mk[None, :])
        kdec = tl.where(mr, tl.exp(lg * tl.maximum(c - 1 - ri, 0).to(tl.float32)) * scale, 0.0)
        S = S * tl.exp(lg * c.to(tl.float32)) + tl.dot(tl.trans(bk * kdec[:, None]), bv)


@triton.jit
def _chunk_bwd_dkv(q, k, v, do, dsT, dk, dv, ds0, lg_ptr, scale, L, H, DK, DV, CHUNK, BH, n_chunks,
                   BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr,
                   STORE_DS0: tl.constexpr):
    """``dk``, ``dv`` and the initial state's gradient for one block of ``BK`` key columns and one
    of ``BV`` value columns, walking the chunks backward with ``dS``, the gradient of the state
    after the chunk::

        dk_j = sum_{i >= j} g^(i-j) s (do_i . v_j) q_i + g^(c-1-j) s v_j dS^T
        dv_j = sum_{i >= j} g^(i-j) s (q_i . k_j) do_i + g^(c-1-j) s k_j dS
        dS  <- g^c dS + sum_i g^(i+1) q_i^T do_i           (the gradient of the state before it)

    ``dk`` sums over value columns and ``dv`` over key columns (``q_i . k_j`` is a sum over them):
    each program writes its share, ``dk`` per value block and ``dv`` per key block, and the
    launcher sums them. Tiling the keys too keeps this kernel's tiles in registers at wide heads.
    """
    pv = tl.program_id(0)
    bh = tl.program_id(1)
    pk = tl.program_id(2)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rk = pk * BK + tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    qk_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    s_base = bh.to(tl.int64) * DK * DV
    dk_base = (pv.to(tl.int64) * BH + bh) * L * DK
    dv_base = (pk.to(tl.int64) * BH + bh) * L * DV
    if HAS_DST:
        dS = tl.load(dsT + s_base + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        dS = dS.to(tl.float32)
    else:
        dS = tl.full([BK, BV], 0.0, dtype=tl.float32)
    dist = ri[:, None] - ri[None, :]
    D = tl.where(dist >= 0, tl.exp(lg * tl.maximum(dist, 0).to(tl.float32)), 0.0)
    qdec = tl.exp(lg * (ri + 1).to(tl.float32))
    for m in range(0, n_chunks):
        t0 = (n_chunks - 1 - m) * CHUNK
        c = tl.minimum(CHUNK, L - t0)
        mr = ri < c
        rows = t0 + ri
        bq = tl.load(q + qk_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k + qk_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bdo = tl.load(do + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bq = bq.to(tl.float32)
        bk = bk.to(tl.float32)
        bv = bv.to(tl.float32)
        bdo = bdo.to(tl.float32)
        kdec = tl.where(mr, tl.exp(lg * tl.maximum(c - 1 - ri, 0).to(tl.float32)) * scale, 0.0)
        # (c x c) transposed score matrices: element [j, i] pairs key row j with query row i.
        dsT_ = tl.dot(bv, tl.trans(bdo)) * tl.trans(D * scale)
        sT_ = tl.dot(bk, tl.trans(bq)) * tl.trans(D * scale)
        bdk = tl.dot(dsT_, bq) + tl.dot(bv, tl.trans(dS)) * kdec[:, None]
        bdv = tl.dot(sT_, bdo) + tl.dot(bk, dS) * kdec[:, None]
        tl.store(dk + dk_base + rows[:, None] * DK + rk[None, :], bdk, mask=mr[:, None] & mk[None, :])
        tl.store(dv + dv_base + rows[:, None] * DV + rv[None, :], bdv, mask=mr[:, None] & mv[None, :])
        dS = dS * tl.exp(lg * c.to(tl.float32)) + tl.dot(tl.trans(bq * qdec[:, None]), bdo)
    if STORE_DS0:
        tl.store(ds0 + s_base + rk[:, None] * DV + rv[None, :], dS, mask=mk[:, None] & mv[None, :])
