"""Triton kernels of chunkwise retention in two passes, forward and backward (launched from
``chunkwise.py`` when the schedule is ``"split"``).

The fused kernels (``chunkwise_kernels.py``) give each ``(batch, head)`` one program per value
block that walks every chunk in order: at one long sequence that is a few dozen programs on a GPU
of 132 multiprocessors. Here only the state's recurrence walks the chunks, and everything else runs
with one program per chunk:

1. ``_split_states`` walks the chunks and writes ``h[n]``, the state before chunk ``n``
   (``dk x dv`` per chunk; a ``BK x BV`` tile per program), and the final state.
2. ``_split_out`` (one program per chunk and value block) forms the chunk's output from its own
   rows and ``h[n]``.
3. ``_split_state_grads`` walks the chunks backward and writes ``dh[n]``, the gradient of the state
   after chunk ``n``, and the initial state's gradient.
4. ``_split_dqk`` (one program per chunk and key block) forms ``dq`` and ``dk``, and ``_split_dv``
   (one per chunk and value block) ``dv``, from the chunk's rows, ``h[n]`` and ``dh[n]``: each
   gradient complete in one program, so nothing is summed afterwards.

Per head (decay ``g = exp(lg)``, key scale ``s``), chunk ``n`` of ``c`` rows, ``i, j`` counted from
its start, ``M[i, j] = s g^(i-j)`` for ``i >= j`` (else 0), ``a_i = g^(i+1)``, ``b_j = s g^(c-1-j)``::

    O      = (Q K^T * M) V + diag(a) Q h[n]                     h[n+1] = g^c h[n] + K^T diag(b) V
    dQ     = (dO V^T * M) K + diag(a) dO h[n]^T                 dh[n-1] = g^c dh[n] + Q^T diag(a) dO
    dK     = (dO V^T * M)^T Q + diag(b) V dh[n]^T
    dV     = (Q K^T * M)^T dO + diag(b) K dh[n]

Products take their operands in the inputs' dtype (bf16 operands for bf16 inputs: the tensor
cores' full rate) and accumulate in float32; ``h`` and ``dh`` are stored in the inputs' dtype
(float32 for float32 inputs) and the running state in registers is float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Only Triton's builtins, as in chunkwise_kernels.py (this module may run interpreted in a process
# that imported Triton compiled), and the helpers below: they are decorated with the kernels, in
# the same mode.


@triton.jit
def _chunk_rows(n, CHUNK, L, ri):
    """Chunk ``n``'s length ``c``, which of the block's ``BC`` rows it has, and their indices."""
    t0 = n * CHUNK
    c = tl.minimum(CHUNK, L - t0)
    return c, ri < c, t0 + ri


@triton.jit
def _pair_decays(lg, ri, scale):
    """``M`` ``(BC, BC)``: ``s g^(i-j)`` for ``i >= j``, else 0 (the exponent clamped so that the
    unused upper triangle cannot overflow)."""
    dist = ri[:, None] - ri[None, :]
    return tl.where(dist >= 0, tl.exp(lg * tl.maximum(dist, 0).to(tl.float32)), 0.0) * scale


@triton.jit
def _query_decays(lg, ri):
    """``a`` ``(BC,)``: ``g^(i+1)``, the weight of the state before the chunk in row ``i``'s output."""
    return tl.exp(lg * (ri + 1).to(tl.float32))


@triton.jit
def _key_decays(lg, ri, c, mr, scale):
    """``b`` ``(BC,)``: ``s g^(c-1-j)``, row ``j``'s weight in the state after the chunk (0 past the
    chunk's end, never a negative power of g)."""
    return tl.where(mr, tl.exp(lg * tl.maximum(c - 1 - ri, 0).to(tl.float32)) * scale, 0.0)


@triton.jit
def _split_states(k, v, h, s0, sT, lg_ptr, scale, L, H, DK, DV, CHUNK, NT,
                  BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_S0: tl.constexpr, STORE_S: tl.constexpr):
    """``h[n]`` (the state before chunk ``n``) for one ``BK x BV`` tile, and the final state."""
    pk = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rk = pk * BK + tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    tile = rk[:, None] * DV + rv[None, :]
    mtile = mk[:, None] & mv[None, :]
    k_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    s_base = bh.to(tl.int64) * DK * DV
    if HAS_S0:
        S = tl.load(s0 + s_base + tile, mask=mtile, other=0.0).to(tl.float32)
    else:
        S = tl.full([BK, BV], 0.0, dtype=tl.float32)
    for n in range(0, NT):
        c, mr, rows = _chunk_rows(n, CHUNK, L, ri)
        tl.store(h + (bh.to(tl.int64) * NT + n) * DK * DV + tile, S.to(h.dtype.element_ty), mask=mtile)
        bk = tl.load(k + k_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bv = tl.load(v + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        b = _key_decays(lg, ri, c, mr, scale)
        kb = (bk.to(tl.float32) * b[:, None]).to(k.dtype.element_ty)
        S = S * tl.exp(lg * c.to(tl.float32)) + tl.dot(tl.trans(kb), bv)
    if STORE_S:
        tl.store(sT + s_base + tile, S, mask=mtile)


@triton.jit
def _split_out(q, k, v, h, o, lg_ptr, scale, L, H, DK, DV, CHUNK, NT,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The output of one chunk and one block of ``BV`` value columns; the key dim in ``BK`` steps."""
    pv = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rv = pv * BV + tl.arange(0, BV)
    mv = rv < DV
    _, mr, rows = _chunk_rows(n, CHUNK, L, ri)
    k_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    h_base = (bh.to(tl.int64) * NT + n) * DK * DV
    scores = tl.full([BC, BC], 0.0, dtype=tl.float32)
    past = tl.full([BC, BV], 0.0, dtype=tl.float32)
    for k0 in range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < DK
        bq = tl.load(q + k_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k + k_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bhn = tl.load(h + h_base + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        scores += tl.dot(bq, tl.trans(bk))
        past += tl.dot(bq, bhn.to(q.dtype.element_ty))
    M = _pair_decays(lg, ri, scale)
    a = _query_decays(lg, ri)
    bv = tl.load(v + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
    out = tl.dot((scores * M).to(v.dtype.element_ty), bv) + past * a[:, None]
    tl.store(o + v_base + rows[:, None] * DV + rv[None, :], out.to(o.dtype.element_ty), mask=mr[:, None] & mv[None, :])


@triton.jit
def _split_state_grads(q, do, dh, dsT, ds0, lg_ptr, L, H, DK, DV, CHUNK, NT,
                       BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_DST: tl.constexpr, STORE_DS0: tl.constexpr):
    """``dh[n]`` (the gradient of the state after chunk ``n``) for one tile, walking backward,
    and the initial state's gradient."""
    pk = tl.program_id(0)
    pv = tl.program_id(1)
    bh = tl.program_id(2)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rk = pk * BK + tl.arange(0, BK)
    rv = pv * BV + tl.arange(0, BV)
    mk = rk < DK
    mv = rv < DV
    tile = rk[:, None] * DV + rv[None, :]
    mtile = mk[:, None] & mv[None, :]
    q_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    s_base = bh.to(tl.int64) * DK * DV
    if HAS_DST:
        dS = tl.load(dsT + s_base + tile, mask=mtile, other=0.0).to(tl.float32)
    else:
        dS = tl.full([BK, BV], 0.0, dtype=tl.float32)
    a = _query_decays(lg, ri)
    for m in range(0, NT):
        n = NT - 1 - m
        c, mr, rows = _chunk_rows(n, CHUNK, L, ri)
        tl.store(dh + (bh.to(tl.int64) * NT + n) * DK * DV + tile, dS.to(dh.dtype.element_ty), mask=mtile)
        bq = tl.load(q + q_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bdo = tl.load(do + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        qa = (bq.to(tl.float32) * a[:, None]).to(q.dtype.element_ty)
        dS = dS * tl.exp(lg * c.to(tl.float32)) + tl.dot(tl.trans(qa), bdo)
    if STORE_DS0:
        tl.store(ds0 + s_base + tile, dS, mask=mtile)


@triton.jit
def _split_dqk(q, k, v, do, h, dh, dq, dk, lg_ptr, scale, L, H, DK, DV, CHUNK, NT,
               BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``dq`` and ``dk`` for one chunk and one block of ``BK`` key columns, the value dim summed
    in ``BV`` steps."""
    pk = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rk = pk * BK + tl.arange(0, BK)
    mk = rk < DK
    c, mr, rows = _chunk_rows(n, CHUNK, L, ri)
    mrk = mr[:, None] & mk[None, :]
    k_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    h_base = (bh.to(tl.int64) * NT + n) * DK * DV
    ds = tl.full([BC, BC], 0.0, dtype=tl.float32)
    bdq = tl.full([BC, BK], 0.0, dtype=tl.float32)
    bdk = tl.full([BC, BK], 0.0, dtype=tl.float32)
    for v0 in range(0, DV, BV):
        rv = v0 + tl.arange(0, BV)
        mv = rv < DV
        mtile = mk[:, None] & mv[None, :]
        bv = tl.load(v + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bdo = tl.load(do + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
        bhn = tl.load(h + h_base + rk[:, None] * DV + rv[None, :], mask=mtile, other=0.0).to(do.dtype.element_ty)
        bdh = tl.load(dh + h_base + rk[:, None] * DV + rv[None, :], mask=mtile, other=0.0).to(do.dtype.element_ty)
        ds += tl.dot(bdo, tl.trans(bv))
        bdq += tl.dot(bdo, tl.trans(bhn))
        bdk += tl.dot(bv, tl.trans(bdh))
    M = _pair_decays(lg, ri, scale)
    a = _query_decays(lg, ri)
    b = _key_decays(lg, ri, c, mr, scale)
    ds = (ds * M).to(k.dtype.element_ty)
    bq = tl.load(q + k_base + rows[:, None] * DK + rk[None, :], mask=mrk, other=0.0)
    bk = tl.load(k + k_base + rows[:, None] * DK + rk[None, :], mask=mrk, other=0.0)
    bdq = tl.dot(ds, bk) + bdq * a[:, None]
    bdk = tl.dot(tl.trans(ds), bq) + bdk * b[:, None]
    tl.store(dq + k_base + rows[:, None] * DK + rk[None, :], bdq.to(dq.dtype.element_ty), mask=mrk)
    tl.store(dk + k_base + rows[:, None] * DK + rk[None, :], bdk.to(dk.dtype.element_ty), mask=mrk)


@triton.jit
def _split_dv(q, k, do, dh, dv, lg_ptr, scale, L, H, DK, DV, CHUNK, NT,
              BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``dv`` for one chunk and one block of ``BV`` value columns, the key dim summed in ``BK`` steps."""
    pv = tl.program_id(0)
    n = tl.program_id(1)
    bh = tl.program_id(2)
    lg = tl.load(lg_ptr + bh % H)
    ri = tl.arange(0, BC)
    rv = pv * BV + tl.arange(0, BV)
    mv = rv < DV
    c, mr, rows = _chunk_rows(n, CHUNK, L, ri)
    k_base = bh.to(tl.int64) * L * DK
    v_base = bh.to(tl.int64) * L * DV
    h_base = (bh.to(tl.int64) * NT + n) * DK * DV
    # (Q K^T)^T: element [j, i] pairs key row j with query row i.
    sT = tl.full([BC, BC], 0.0, dtype=tl.float32)
    kdh = tl.full([BC, BV], 0.0, dtype=tl.float32)
    for k0 in range(0, DK, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < DK
        bq = tl.load(q + k_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bk = tl.load(k + k_base + rows[:, None] * DK + rk[None, :], mask=mr[:, None] & mk[None, :], other=0.0)
        bdh = tl.load(dh + h_base + rk[:, None] * DV + rv[None, :], mask=mk[:, None] & mv[None, :], other=0.0)
        sT += tl.dot(bk, tl.trans(bq))
        kdh += tl.dot(bk, bdh.to(k.dtype.element_ty))
    M = _pair_decays(lg, ri, scale)
    b = _key_decays(lg, ri, c, mr, scale)
    bdo = tl.load(do + v_base + rows[:, None] * DV + rv[None, :], mask=mr[:, None] & mv[None, :], other=0.0)
    bdv = tl.dot((sT * tl.trans(M)).to(do.dtype.element_ty), bdo) + kdh * b[:, None]
    tl.store(dv + v_base + rows[:, None] * DV + rv[None, :], bdv.to(dv.dtype.element_ty), mask=mr[:, None] & mv[None, :])
