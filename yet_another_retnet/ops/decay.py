"""Decay schedules and decay masks: the one source of truth for every ``gamma`` in the package.

Retention weighs the contribution of token ``m`` to token ``n`` by ``gamma ** (n - m)``. The
parallel, chunkwise and recurrent forms all take their powers of gamma from this module, so
they cannot drift apart.

Everything here is computed in float64 from ``log(gamma)`` and only then cast to the compute
dtype: in bfloat16, ``1 - 2**-12`` rounds to exactly 1.0 (no decay at all), and
``gamma ** n`` for large ``n`` loses all precision when taken by repeated products.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

#: Names accepted for ``decay``: ``"eq8"`` is the paper's Eq. 8, ``gamma_i = 1 - 2^(-5-i)``
#: (torchscale and flash-linear-attention use it); ``"log-spaced"`` is the schedule of the
#: paper's experiments, ``gamma = 1 - exp(linspace(log 1/32, log 1/512, heads))``.
DECAY_SCHEDULES = ("eq8", "log-spaced")

DecaySpec = str | Tensor | None


def decay_gammas(
    num_heads: int, schedule: str = "eq8", device: torch.device | str | None = None
) -> Tensor:
    """Per-head decay rates ``gamma`` of shape ``(num_heads,)`` in float64."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if schedule == "eq8":
        exponent = -5.0 - torch.arange(num_heads, dtype=torch.float64, device=device)
        return 1.0 - torch.pow(2.0, exponent)
    if schedule == "log-spaced":
        rates = torch.linspace(
            math.log(1 / 32), math.log(1 / 512), num_heads, dtype=torch.float64, device=device
        )
        return 1.0 - torch.exp(rates)
    raise ValueError(f"decay must be one of {DECAY_SCHEDULES} or a tensor of gammas, got {schedule!r}")


def resolve_log_decay(decay: DecaySpec, num_heads: int, device: torch.device) -> Tensor:
    """``log(gamma)`` of shape ``(num_heads,)`` in float64 from a schedule name or a tensor.

    ``decay`` may be ``None`` (Eq. 8), a name from :data:`DECAY_SCHEDULES`, or a tensor of
    ``num_heads`` gammas in ``(0, 1]``.
    """
    if decay is None or isinstance(decay, str):
        gammas = decay_gammas(num_heads, decay or "eq8", device=device)
    elif isinstance(decay, Tensor):
        if decay.dim() != 1 or decay.shape[0] != num_heads:
            raise ValueError(
                f"decay must have shape ({num_heads},) (one gamma per head), got {tuple(decay.shape)}"
            )
        if not decay.is_floating_point():
            raise TypeError(f"decay must be a floating tensor, got {decay.dtype}")
        if decay.requires_grad:
            raise ValueError("decay must not require grad: the decay rates are fixed (a gradient would be dropped)")
        gammas = decay.detach().to(device=device, dtype=torch.float64)
        if not bool(((gammas > 0) & (gammas <= 1)).all()):  # NaN fails this too
            raise ValueError(f"decay values (gammas) must lie in (0, 1], got {gammas.tolist()}")
    else:
        raise TypeError(f"decay must be None, a schedule name or a tensor, got {type(decay).__name__}")
    return torch.log(gammas)


def decay_powers(log_gamma: Tensor, exponents: Tensor, dtype: torch.dtype) -> Tensor:
    """``gamma ** exponents`` for every head: shape ``(heads, *exponents.shape)``.

    Computed as ``exp(exponent * log(gamma))`` in float64, then cast to ``dtype``.
    """
    shape = (-1,) + (1,) * exponents.dim()
    powers = torch.exp(log_gamma.view(shape) * exponents.to(torch.float64))
    return powers.to(dtype)


def decay_mask(log_gamma: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """The causal decay matrix ``D[h, n, m] = gamma_h ** (n - m)`` for ``n >= m``, else 0.

    Shape ``(heads, length, length)``.
    """
    index = torch.arange(length, device=log_gamma.device, dtype=torch.float64)
    distance = index[:, None] - index[None, :]
    powers = torch.exp(log_gamma[:, None, None] * distance.clamp(min=0))
    return torch.where(distance >= 0, powers, torch.zeros((), dtype=torch.float64, device=log_gamma.device)).to(
        dtype
    )


# --------------------------------------------------------------------------------------------
# Cached tables for the fast chunkwise and parallel forms.
#
# The powers of gamma only depend on (gammas, chunk length, number of chunks, dtype, device,
# scale), never on the data, so they are computed once (float64 exp/log, then cast) and reused
# by every layer and every step. The cache key holds the gammas as Python floats, so two layers
# with equal gammas share one entry.
# --------------------------------------------------------------------------------------------


def _no_subnormals(table: Tensor, dtype: torch.dtype) -> Tensor:
    """``table`` cast to ``dtype`` with subnormal results set to exactly 0.

    Far powers of gamma (``gamma^(c i)`` across many chunks, or a long parallel mask) fall into
    float32's subnormal range, and x86 multiplies subnormals tens of times slower: the
    inter-chunk product at 16k tokens took 16x longer. Values below ``finfo.tiny`` (1e-38 in
    float32) change nothing measurable.
    """
    cast = table.to(dtype)
    if not cast.is_floating_point():
        return cast
    tiny = torch.finfo(dtype).tiny
    return torch.where(cast.abs() < tiny, torch.zeros((), dtype=dtype, device=cast.device), cast)


class ChunkTables(NamedTuple):
    """Decay factors for ``num_chunks`` chunks of ``chunk`` tokens (``h`` heads, ``n`` chunks).

    Attributes:
        inner: ``(h, 1, c, c)`` ``scale * D`` (the causal decay mask times the key scale).
        key_decay: ``(h, 1, c, 1)`` ``scale * gamma^(c-1-j)``: row ``j``'s weight in the chunk's state.
        query_decay: ``(h, 1, c, 1)`` ``gamma^(j+1)``: row ``j``'s weight on the state before the chunk.
        across: ``(h, n, n)`` ``gamma^(c (i-1-m))`` for ``m < i`` else 0: chunk ``m``'s share of
            the state before chunk ``i``.
        start: ``(h, n, 1)`` ``gamma^(c i)``: the share of a previous state before chunk ``i``.
        chunk_decay: ``(h, 1, 1)`` ``gamma^c``.
    """

    inner: Tensor
    key_decay: Tensor
    query_decay: Tensor
    across: Tensor
    start: Tensor
    chunk_decay: Tensor


def _gamma_key(log_gamma: Tensor) -> tuple[float, ...]:
    return tuple(float(x) for x in log_gamma.detach().cpu().tolist())


@functools.lru_cache(maxsize=64)
def _chunk_tables(
    key: tuple[float, ...], chunk: int, num_chunks: int, dtype: torch.dtype, device: torch.device, scale: float
) -> ChunkTables:
    # Plain tensors even when the first call happens under inference_mode or no_grad: a cached
    # inference tensor could not be saved for a later backward pass.
    with torch.inference_mode(False), torch.no_grad():
        log_gamma = torch.tensor(key, dtype=torch.float64, device=device)
        heads = log_gamma.shape[0]
        j = torch.arange(chunk, device=device, dtype=torch.float64)
        inner = decay_mask(log_gamma, chunk, torch.float64) * scale
        key_decay = torch.exp(log_gamma[:, None] * (chunk - 1 - j)) * scale
        query_decay = torch.exp(log_gamma[:, None] * (j + 1))
        i = torch.arange(num_chunks, device=device, dtype=torch.float64)
        gap = i[:, None] - 1 - i[None, :]
        across = torch.where(
            gap >= 0,
            torch.exp(log_gamma[:, None, None] * chunk * gap.clamp(min=0)),
            torch.zeros((), dtype=torch.float64, device=device),
        )
        start = torch.exp(log_gamma[:, None] * chunk * i)
        chunk_decay = torch.exp(log_gamma * chunk)
        return ChunkTables(
            _no_subnormals(inner.unsqueeze(1), dtype),
            _no_subnormals(key_decay.view(heads, 1, chunk, 1), dtype),
            _no_subnormals(query_decay.view(heads, 1, chunk, 1), dtype),
            _no_subnormals(across, dtype),
            _no_subnormals(start.view(heads, num_chunks, 1), dtype),
            _no_subnormals(chunk_decay.view(heads, 1, 1), dtype),
        )


def chunk_tables(
    log_gamma: Tensor, chunk: int, num_chunks: int, dtype: torch.dtype, scale: float = 1.0
) -> ChunkTables:
    """Cached :class:`ChunkTables` for ``log_gamma`` ``(heads,)`` (float64), on its device."""
    return _chunk_tables(_gamma_key(log_gamma), chunk, num_chunks, dtype, log_gamma.device, float(scale))


@functools.lru_cache(maxsize=8)
def _scaled_mask(
    key: tuple[float, ...], length: int, dtype: torch.dtype, device: torch.device, scale: float
) -> Tensor:
    with torch.inference_mode(False), torch.no_grad():
        log_gamma = torch.tensor(key, dtype=torch.float64, device=device)
        return _no_subnormals(decay_mask(log_gamma, length, torch.float64) * scale, dtype)


def scaled_decay_mask(log_gamma: Tensor, length: int, dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """Cached ``scale * decay_mask(log_gamma, length)``, ``(heads, length, length)`` in ``dtype``.

    Masks longer than 4,096 tokens are not cached (each is ``heads * length^2`` numbers).
    """
    if length > 4096:
        return _no_subnormals(decay_mask(log_gamma, length, torch.float64) * scale, dtype)
    return _scaled_mask(_gamma_key(log_gamma), length, dtype, log_gamma.device, float(scale))
