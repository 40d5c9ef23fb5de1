"""Retention, the function at the heart of RetNet, in its three equivalent forms.

For one head, with decay ``gamma``, keys scaled by ``scale`` (default ``dk ** -0.5``)::

    state_n = gamma * state_{n-1} + k_n^T v_n          (dk x dv)
    out_n   = q_n @ state_n

- :func:`retention_parallel` computes all outputs at once, ``(Q K^T * D) V`` with the decay
  mask ``D``: quadratic in length, like attention.
- :func:`retention_recurrent` takes one step of the recurrence above: constant cost per token.
- :func:`retention_chunkwise` splits the sequence into chunks, runs the parallel form inside a
  chunk and the recurrence between chunks: linear in length.

Shapes: ``q``, ``k`` are ``(batch, heads, length, dk)``, ``v`` is ``(batch, heads, length, dv)``,
a state is ``(batch, heads, dk, dv)``. ``dk`` and ``dv`` may differ.

Precision: float64 inputs are computed in float64; everything else (float32, bfloat16, float16)
is computed in float32 and the output cast back to the input dtype. States are returned in the
compute dtype, so a long half-precision run accumulates its state in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

from .backends import chunkwise_backend, recurrent_backend
from .cpu import _extension as cpu_extension
from .cpu import chunk_kernels as chunk_kernel_ops
from .cpu import chunk_scan as chunk_scan_ops
from .cpu.chunk_kernels import chunk_contributions, chunk_output, chunk_retention
from .cpu.chunk_scan import chunk_scan
from .decay import (
    ChunkTables,
    DecaySpec,
    _no_subnormals,
    chunk_tables,
    decay_mask,
    decay_powers,
    resolve_log_decay,
    scaled_decay_mask,
)
from .fla_backend import chunk_retention_fla
from .norms import key_scale
from .segments import check_reset_mask, pack, segment_layout, unpack
from .triton import chunk_retention_triton, retention_step_triton

__all__ = ["retention_chunkwise", "retention_parallel", "retention_recurrent"]


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _outside_autocast(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with autocast off: retention picks its own precision (float32 or float64).

    Under ``torch.autocast`` the matmuls inside would otherwise run in half precision again, and
    a state accumulated over thousands of tokens would come back in bfloat16.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        first = args[0] if args else None
        device_type = first.device.type if isinstance(first, Tensor) else "cpu"
        if device_type not in ("cpu", "cuda"):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype retention runs in for inputs of ``dtype``: float64 stays, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Argument checks: a wrong shape must fail loudly, never broadcast into a silent wrong answer.
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, x: object, rank: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, rank: int) -> None:
    layout = "(batch, heads, length, dim)" if rank == 4 else "(batch, heads, dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, rank)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {layout}: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"v must match q in every dim but the last {layout}: q {tuple(q.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"q, k and v need a head dim >= 1 (their last dim), got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if q.device.type == "meta":
        raise ValueError("q, k and v are meta tensors (shapes without data): nothing to compute")


def _check_state(prev_state: Tensor | None, q: Tensor, v: Tensor) -> Tensor | None:
    if prev_state is None:
        return None
    _check_tensor("prev_state", prev_state, 4)
    expected = (q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    if tuple(prev_state.shape) != expected:
        raise ValueError(
            f"prev_state must have shape (batch, heads, dk, dv) = {expected}, got {tuple(prev_state.shape)}"
        )
    if prev_state.device != q.device:
        raise ValueError(f"prev_state is on {prev_state.device} but q is on {q.device}")
    return prev_state.to(compute_dtype(q.dtype))


def _resolve_scale(scale: float | None, key_dim: int) -> float:
    if scale is None:
        return key_scale(key_dim)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


# --------------------------------------------------------------------------------------------
# The three forms.
# --------------------------------------------------------------------------------------------


@_outside_autocast
def retention_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    decay: DecaySpec = None,
    scale: float | None = None,
    prev_state: Tensor | None = None,
    need_weights: bool = False,
    reset_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Parallel retention ``(Q K^T * D) V``.

    Args:
        q, k: ``(batch, heads, length, dk)``. v: ``(batch, heads, length, dv)``.
        decay: ``None`` (paper Eq. 8), a schedule name or a ``(heads,)`` tensor of gammas.
        scale: factor on the keys, default ``dk ** -0.5``.
        prev_state: optional ``(batch, heads, dk, dv)`` state of the tokens before ``q``.
        need_weights: also return the decayed retention scores ``(batch, heads, length, length)``.
        reset_mask: optional ``(batch, length)`` bool, True where a new document starts: a token
            then sees only its own document's tokens (and ``prev_state`` only before the row's
            first reset). Positions are the caller's (rotate by position inside the document).

    Returns:
        ``(out, weights)``: out is ``(batch, heads, length, dv)`` in the input dtype; weights is
        ``None`` unless ``need_weights``.
    """
    _check_qkv(q, k, v, rank=4)
    state = _check_state(prev_state, q, v)
    ct = compute_dtype(q.dtype)
    log_gamma = resolve_log_decay(decay, q.shape[1], q.device)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    length = q.shape[2]
    # The key scale rides on the cached decay mask: one elementwise pass fewer.
    mask = scaled_decay_mask(log_gamma, length, ct, _resolve_scale(scale, q.shape[-1]))
    weights = (qc @ kc.transpose(-1, -2)) * mask
    documents = None
    if reset_mask is not None:
        documents = torch.cumsum(check_reset_mask(reset_mask, (q.shape[0], length)).long(), dim=1)  # (b, L)
        weights = weights * (documents[:, :, None] == documents[:, None, :]).unsqueeze(1).to(ct)
    out = weights @ vc
    if state is not None:
        cross = _cross_term(qc, state, log_gamma, ct)
        if documents is not None:  # the earlier state reaches only the tokens before the first reset
            cross = cross * (documents == 0)[:, None, :, None].to(ct)
        out = out + cross
    return out.to(q.dtype), (weights.to(q.dtype) if need_weights else None)


@_outside_autocast
def retention_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prev_state: Tensor | None = None,
    *,
    decay: DecaySpec = None,
    scale: float | None = None,
    backend: str | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of recurrent retention.

    Args:
        q, k: ``(batch, heads, dk)`` for the current token. v: ``(batch, heads, dv)``.
        prev_state: ``(batch, heads, dk, dv)`` or ``None`` for the first token.
        backend: ``None`` (CUDA inference steps take the Triton step kernel where it applies),
            ``"torch"`` or ``"triton"``; see :mod:`yet_another_retnet.ops.backends`.
        reset: optional ``(batch,)`` bool: rows where this token starts a new document forget
            ``prev_state``.

    Returns:
        ``(out, state)``: out is ``(batch, heads, dv)`` in the input dtype; state is the new
        ``(batch, heads, dk, dv)`` state in the compute dtype.
    """
    _check_qkv(q, k, v, rank=3)
    state = _check_state(prev_state, q, v)
    ct = compute_dtype(q.dtype)
    log_gamma = resolve_log_decay(decay, q.shape[1], q.device)
    if state is not None and reset is not None:  # rows starting a new document forget the past
        keep = ~check_reset_mask(reset.reshape(-1, 1), (q.shape[0], 1))[:, 0]
        state = state * keep[:, None, None, None].to(state.dtype)
    if recurrent_backend(backend, q, k, v, state) == "triton":  # CUDA: one fused kernel
        return retention_step_triton(q, k, v, state, log_gamma, _resolve_scale(scale, q.shape[-1]))
    kc = k.to(ct) * _resolve_scale(scale, q.shape[-1])
    new_state = kc.unsqueeze(-1) * v.to(ct).unsqueeze(-2)
    if state is not None:
        gamma = torch.exp(log_gamma).to(ct)
        new_state = new_state + gamma[:, None, None] * state
    out = (q.to(ct).unsqueeze(-2) @ new_state).squeeze(-2)
    return out.to(q.dtype), new_state


@_outside_autocast
def retention_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prev_state: Tensor | None = None,
    chunk_size: int | None = None,
    *,
    decay: DecaySpec = None,
    scale: float | None = None,
    backend: str | None = None,
    reset_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunkwise retention: parallel inside chunks of ``chunk_size``, recurrent between them.

    Any length works, whether or not ``chunk_size`` divides it (the last chunk is shorter), and
    calling this chunk by chunk, handing the returned state on, equals one call.

    Args:
        q, k: ``(batch, heads, length, dk)``. v: ``(batch, heads, length, dv)``.
        prev_state: ``(batch, heads, dk, dv)`` state of earlier tokens, or ``None``.
        chunk_size: tokens per chunk, ``>= 1``; ``None`` processes the input as one chunk.
        backend: ``None`` (CUDA tensors take our Triton kernels where they apply, everything else
            the PyTorch form), ``"torch"``, ``"triton"`` or ``"fla"``; see
            :mod:`yet_another_retnet.ops.backends`.
        reset_mask: optional ``(batch, length)`` bool, True where a new document starts: each
            document runs alone, through the same fast path, laid out one per row
            (:mod:`.segments`); ``prev_state`` reaches only the tokens before a row's first
            reset; the state is the last document's.

    Returns:
        ``(out, state)``: out ``(batch, heads, length, dv)`` in the input dtype and the state after
        the last token, ``(batch, heads, dk, dv)`` in the compute dtype.
    """
    if reset_mask is not None:
        return _chunkwise_documents(q, k, v, prev_state, chunk_size, decay, scale, reset_mask, backend)
    return _chunkwise(q, k, v, prev_state, chunk_size, decay, scale, fast=True, backend=backend)


def _chunkwise_documents(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None, chunk_size: int | None,
                         decay: DecaySpec, scale: float | None, reset_mask: Tensor,
                         backend: str | None = None) -> tuple[Tensor, Tensor]:
    _check_qkv(q, k, v, rank=4)
    state = _check_state(prev_state, q, v)
    batch, length = q.shape[0], q.shape[2]
    seg = segment_layout(check_reset_mask(reset_mask, (batch, length)), carry_state=state is not None)
    carried = None
    if state is not None:  # each row's state goes to its first segment, unless that starts a document
        keep = seg.carried[:, None, None, None].to(state.dtype)
        carried = state.index_select(0, seg.rows) * keep

    def packed(t: Tensor) -> Tensor:  # (b, h, L, d) -> (segments, h, width, d), padding zeroed
        p = pack(t.transpose(1, 2), seg)
        return torch.where(seg.valid[:, :, None, None], p, torch.zeros((), dtype=p.dtype)).transpose(1, 2)

    out, new_state = _chunkwise(packed(q), packed(k), packed(v), carried, chunk_size, decay, scale, fast=True,
                                backend=backend)
    out = unpack(out.transpose(1, 2), seg, batch, length).transpose(1, 2)
    return out, new_state[seg.last]


@_outside_autocast
def retention_chunkwise_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prev_state: Tensor | None = None,
    chunk_size: int | None = None,
    *,
    decay: DecaySpec = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`retention_chunkwise` the plain way: decay powers computed per call and a Python
    loop over chunks for the state. Same arguments and results; kept to test the fast path."""
    return _chunkwise(q, k, v, prev_state, chunk_size, decay, scale, fast=False)


def _chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prev_state: Tensor | None,
    chunk_size: int | None,
    decay: DecaySpec,
    scale: float | None,
    fast: bool,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    _check_qkv(q, k, v, rank=4)
    state = _check_state(prev_state, q, v)
    length = q.shape[2]
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = length if chunk_size is None else min(chunk_size, length)
    ct = compute_dtype(q.dtype)
    log_gamma = resolve_log_decay(decay, q.shape[1], q.device)
    key_scale = _resolve_scale(scale, q.shape[-1])
    if fast and length > 0:  # CUDA: our Triton kernels, or fla's on demand (ops/backends.py)
        chosen = chunkwise_backend(backend, q, k, v, state, log_gamma)
        if chosen == "triton":
            return chunk_retention_triton(q, k, v, state, chunk_size, log_gamma, key_scale)
        if chosen == "fla":
            return chunk_retention_fla(q, k, v, state, key_scale)
    if fast:  # the scale is folded into the cached decay tables
        qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    else:
        qc, kc, vc = q.to(ct), k.to(ct) * key_scale, v.to(ct)
    if length == 0:
        batch, heads, _, dk = q.shape
        empty_state = torch.zeros(batch, heads, dk, v.shape[-1], dtype=ct, device=q.device)
        # A copy: the caller may step the returned state in place and still hold the one it gave.
        return v.new_zeros(v.shape), (empty_state if state is None else state.clone())

    if fast:
        def lookup(c: int, n: int) -> ChunkTables:
            return chunk_tables(log_gamma, c, n, ct, key_scale)

        out, state = chunkwise_with_tables(qc, kc, vc, state, chunk, lookup)
        return out.to(q.dtype), state
    out, state = _walk_chunks(qc, kc, vc, state, chunk,
                              lambda q_, k_, v_, s_, c_: _chunks(q_, k_, v_, s_, c_, log_gamma))
    return out.to(q.dtype), state


#: One run of whole chunks: ``(q, k, v, state, chunk) -> (out, state)``.
_Block = Callable[[Tensor, Tensor, Tensor, "Tensor | None", int], tuple[Tensor, Tensor]]


def _walk_chunks(q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, chunk: int,
                 block: _Block) -> tuple[Tensor, Tensor]:
    """The whole chunks through ``block``, then the shorter last chunk (its own length in place
    of ``chunk``), the state handed on. ``q``, ``k``, ``v`` ``(b, h, L, d)``, ``L >= 1``."""
    length = q.shape[2]
    full = (length // chunk) * chunk
    outs = []
    if full:
        out, state = block(q[:, :, :full], k[:, :, :full], v[:, :, :full], state, chunk)
        outs.append(out)
    if full < length:
        out, state = block(q[:, :, full:], k[:, :, full:], v[:, :, full:], state, length - full)
        outs.append(out)
    assert state is not None
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)), state


#: ``(chunk, num_chunks) -> ChunkTables``: where the fast chunkwise path gets its decay tables.
TableLookup = Callable[[int, int], ChunkTables]


def chunkwise_with_tables(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, chunk: int, tables: TableLookup
) -> tuple[Tensor, Tensor]:
    """The fast chunkwise form on checked inputs, its decay tables taken from ``tables``.

    ``q``, ``k``, ``v`` ``(b, h, L, d)`` in the compute dtype with ``L >= 1``, keys unscaled (the
    scale lives in the tables), ``1 <= chunk <= L``. Returns ``(out, state)`` in the compute dtype.
    A compiled caller (``torch.compile`` cannot trace the table cache) passes a dict's
    ``__getitem__`` holding the :func:`chunkwise_table_shapes` of its call.
    """
    return _walk_chunks(q, k, v, state, chunk,
                        lambda q_, k_, v_, s_, c_: _chunks_fast(q_, k_, v_, s_, c_, tables))


def chunkwise_table_shapes(length: int, chunk: int) -> list[tuple[int, int]]:
    """The ``(chunk, num_chunks)`` tables :func:`chunkwise_with_tables` asks for over ``length``
    tokens: whole chunks in segments of at most ``_MAX_CHUNKS``, then the shorter last chunk."""
    shapes = []
    n = length // chunk
    if n:
        shapes += [(chunk, min(_MAX_CHUNKS, n - i)) for i in range(0, n, _MAX_CHUNKS)]
    if n * chunk < length:
        shapes.append((length - n * chunk, 1))
    return list(dict.fromkeys(shapes))


# --------------------------------------------------------------------------------------------
# Shared pieces. Keys arrive already scaled, everything in the compute dtype.
# --------------------------------------------------------------------------------------------


def _along_length(powers: Tensor, like: Tensor) -> Tensor:
    """Reshape per-head, per-position factors ``(heads, c)`` to scale rows of ``like``.

    ``like`` is ``(batch, heads, [chunks,] c, d)``; the result broadcasts against it.
    """
    extra = (1,) * (like.dim() - 4)
    return powers.view(powers.shape[0], *extra, powers.shape[1], 1)


def _cross_term(q: Tensor, state: Tensor, log_gamma: Tensor, ct: torch.dtype) -> Tensor:
    """Contribution of an earlier state to the tokens of one chunk: ``gamma^(j+1) q_j @ state``.

    ``q`` ``(batch, heads, [chunks,] c, dk)``, ``state`` ``(batch, heads, [chunks,] dk, dv)``.
    """
    j = torch.arange(q.shape[-2], device=q.device)
    return (q @ state) * _along_length(decay_powers(log_gamma, j + 1, ct), q)


@_outside_autocast
def state_update(k: Tensor, v: Tensor, prev_state: Tensor | None, log_gamma: Tensor,
                 scale: float = 1.0) -> Tensor:
    """The state after one chunk of ``c`` tokens: ``scale K^T (V * gamma^(c-1-j)) + gamma^c prev``.

    ``k`` ``(batch, heads, [chunks,] c, dk)`` (already scaled, or scaled here by ``scale``) and
    ``v`` likewise with ``dv``, in the compute dtype; returns ``(batch, heads, [chunks,] dk, dv)``.
    ``prev_state`` only without chunks.
    """
    ct = k.dtype
    c = k.shape[-2]
    j = torch.arange(c, device=k.device)
    # Over a long input (a whole prompt in one call) the far powers fall into the subnormal
    # range, which x86 multiplies many times slower: zeroed, they change nothing measurable.
    weights = _no_subnormals(decay_powers(log_gamma, c - 1 - j, torch.float64) * scale, ct)
    new = k.transpose(-1, -2) @ (v * _along_length(weights, v))
    if prev_state is not None:
        new = new + decay_powers(log_gamma, torch.tensor(c, device=k.device), ct).view(-1, 1, 1) * prev_state
    return new


def _chunks(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, chunk: int, log_gamma: Tensor
) -> tuple[Tensor, Tensor]:
    """Equal-length chunks at once: inputs ``(batch, heads, n * chunk, d)``; returns out, state.

    The reference: decay powers computed on the spot, a Python loop over chunks for the state.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    n = length // chunk
    ct = q.dtype
    qs = q.view(batch, heads, n, chunk, dk)
    ks = k.view(batch, heads, n, chunk, dk)
    vs = v.view(batch, heads, n, chunk, dv)
    # Inside each chunk: the parallel form.
    mask = decay_mask(log_gamma, chunk, ct).unsqueeze(1)  # (heads, 1, chunk, chunk)
    out = ((qs @ ks.transpose(-1, -2)) * mask) @ vs
    # Between chunks: what each chunk adds to the state, then the recurrence over chunks.
    contributions = state_update(ks, vs, None, log_gamma)  # (batch, heads, n, dk, dv)
    chunk_decay = decay_powers(log_gamma, torch.tensor(chunk, device=q.device), ct).view(heads, 1, 1)
    befores = []
    running = state
    for i in range(n):
        befores.append(running)
        added = contributions[:, :, i]
        running = added if running is None else chunk_decay * running + added
    assert running is not None
    if state is not None or n > 1:
        zero = torch.zeros(batch, heads, dk, dv, dtype=ct, device=q.device)
        stacked = torch.stack([zero if s is None else s for s in befores], dim=2)
        out = out + _cross_term(qs, stacked, log_gamma, ct)
    return out.view(batch, heads, length, dv), running


#: Most chunks handled by one (chunks x chunks) decay product in :func:`_chunks_fast`.
_MAX_CHUNKS = 256


def _chunks_fast(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor | None, chunk: int, lookup: TableLookup
) -> tuple[Tensor, Tensor]:
    """:func:`_chunks` with cached decay tables and no Python loop over chunks.

    Keys arrive unscaled (``scale`` lives in the tables). The states before every chunk come from
    one matrix product over the chunk index: ``before_i = sum_{m<i} gamma^(c (i-1-m)) R_m
    + gamma^(c i) prev``, where ``R_m`` is what chunk ``m`` alone adds.
    """
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    n = length // chunk
    if n > _MAX_CHUNKS:
        # The (n x n) chunk-decay matrix grows quadratically: go through long inputs in segments
        # of _MAX_CHUNKS chunks, handing the state on (split, not slicing: one cat backward).
        size = _MAX_CHUNKS * chunk
        outs = []
        for qp, kp, vp in zip(q.split(size, dim=2), k.split(size, dim=2), v.split(size, dim=2), strict=True):
            out_part, state = _chunks_fast(qp, kp, vp, state, chunk, lookup)
            outs.append(out_part)
        assert state is not None
        return torch.cat(outs, dim=2), state
    tables = lookup(chunk, n)
    # One copy each into (batch, heads, length, d) order up front (the layer hands over transposed
    # views): otherwise every product below would make its own copy, forward and backward. (The
    # CPU kernels could read the views in place, but rows 2-4 KiB apart made them ~40% slower.)
    qs, ks, vs = (t.contiguous().view(batch, heads, n, chunk, t.shape[-1]) for t in (q, k, v))
    decay = tables.chunk_decay.view(heads)
    if (chunk_kernel_ops.supports_chunk_retention(qs, vs, tables.inner, tables.query_decay, tables.key_decay, decay)
            and cpu_extension.load()):
        # CPU: the products below and the scan between them in one op, chunk after chunk.
        out, final = chunk_retention(qs, ks, vs, tables.inner, tables.query_decay, tables.key_decay, decay, state)
        return out.view(batch, heads, length, dv), final
    # What each chunk adds to the state: (batch, heads, n, dk, dv).
    contributions = chunk_contributions(ks, vs, tables.key_decay)
    if n == 1 and state is None:  # one chunk, no earlier state: the state is this chunk's contribution
        out = chunk_output(qs, ks, vs, tables.inner, tables.query_decay, None)
        return out.view(batch, heads, length, dv), contributions[:, :, 0]
    flat = contributions.view(batch, heads, n, dk * dv)
    prev = None if state is None else state.reshape(batch, heads, dk * dv)
    if chunk_scan_ops.supports(flat, decay) and cpu_extension.load():  # CPU: a scan over the chunks
        befores, final_flat = chunk_scan(flat, decay, prev)
        final = final_flat.view(batch, heads, dk, dv)
    else:  # one decay-matrix product over the chunk index
        from_prev = None if prev is None else tables.start * prev.unsqueeze(2)
        if n == 1:  # then there is a previous state (the other case returned above)
            assert from_prev is not None
            befores = from_prev
        else:
            befores = tables.across @ flat  # (h, n, n) @ (b, h, n, dk*dv)
            if from_prev is not None:
                befores = befores + from_prev
        final = tables.chunk_decay * befores.view(batch, heads, n, dk, dv)[:, :, -1] + contributions[:, :, -1]
    # Inside each chunk (scale and decay in one mask) plus (gamma^(j+1) q) @ the state before it.
    out = chunk_output(qs, ks, vs, tables.inner, tables.query_decay, befores.view(batch, heads, n, dk, dv))
    return out.view(batch, heads, length, dv), final
