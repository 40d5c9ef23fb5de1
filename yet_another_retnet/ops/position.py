"""Relative-position rotation ("xPos" in the paper, RoPE-like everywhere): one source of truth.

Queries and keys are rotated by their token's absolute (0-based) position; the dot product of
a rotated query and key then depends only on the distance between them. The decay
``gamma ** (n - m)`` replaces xPos's scale term, so only the rotation lives here.

Two rotations (``kind``):

- ``"xpos"`` (default): torchscale's, ``theta_i = 1 / 10000^(i / (dk/2 - 1))``. Angles are computed
  in float64 and cast afterwards: in float32, ``position * theta`` at position 2048 is already off
  by ~1e-4 rad, and bfloat16 cannot even count past 256.
- ``"rope"``: GPT-NeoX's RoPE as flash-linear-attention's RetNets were trained with,
  ``theta_i = 10000^(-2i / dk)``, with frequencies, angles, cosines and sines computed in float32
  as that code does (a model trained with them is only exact with the same rounding).

Both act on (even, odd) feature pairs, the layout every kernel here reads. GPT-NeoX pairs feature
``i`` with ``i + dk/2`` instead; that is the same rotation of the features permuted within each
head (:func:`halves_to_pairs`), which a converter applies once to the query and key weights.

One rotation, written in the layouts the callers hold their features in (each tested against
:func:`apply_rotation`, the reference):

=========================  =====================================  ==============================
function                   input layout                           used by
=========================  =====================================  ==============================
:func:`apply_rotation`     ``(..., dk)`` with ``(cos, sin)`` tables the reference forms
:func:`rotate_pairs`       ``(..., 2)`` pairs, real arithmetic     compiled graphs (inductor
                                                                   fuses reals, not complex ops)
:func:`rotate_heads`       ``(b, L, heads * dk)``, complex product eager fused projection, absorb
:func:`rotate_halves`      ``(..., 2, dk / 2)`` even/odd halves    compiled fused chunkwise (it
                                                                   vectorizes contiguous halves)
:func:`rotation_factors`   ``e^{i pos theta}`` per position, the   the decoding step (q and k in
                           key's factor times :func:`key_scale`    one complex product)
=========================  =====================================  ==============================
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .norms import key_scale

ROTATIONS = ("xpos", "rope")


def rotation_frequencies(key_dim: int, device: torch.device | str | None = None, kind: str = "xpos") -> Tensor:
    """``theta`` of shape ``(key_dim,)``, each frequency repeated for an (even, odd) pair: float64 for
    ``"xpos"``, float32 (as computed by GPT-NeoX/fla) for ``"rope"``."""
    if key_dim % 2 != 0:
        raise ValueError(f"the key head dim must be even to apply the rotation, got {key_dim}")
    if kind == "xpos":
        theta = 1.0 / 10000 ** torch.linspace(0, 1, key_dim // 2, dtype=torch.float64, device=device)
    elif kind == "rope":
        theta = 1.0 / (10000.0 ** (torch.arange(0, key_dim, 2, dtype=torch.float32, device=device) / key_dim))
    else:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {kind!r}")
    return theta.repeat_interleave(2)


def rotation_cos_sin(positions: Tensor, key_dim: int, kind: str = "xpos") -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of each pair's angle for integer ``positions`` ``P``: ``(*P, key_dim / 2)``,
    float64 (``"xpos"``) or float32 (``"rope"``), before any cast."""
    theta = rotation_frequencies(key_dim, device=positions.device, kind=kind)[::2]
    angles = positions.to(theta.dtype).unsqueeze(-1) * theta
    return torch.cos(angles), torch.sin(angles)


def rotation_tables(positions: Tensor, key_dim: int, dtype: torch.dtype,
                    kind: str = "xpos") -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` tables for integer ``positions`` of any shape ``P``: each ``(*P, key_dim)``."""
    if kind == "xpos":
        theta = rotation_frequencies(key_dim, device=positions.device)
        angles = positions.to(torch.float64).unsqueeze(-1) * theta
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)
    cos, sin = rotation_cos_sin(positions, key_dim, kind)
    return cos.repeat_interleave(2, dim=-1).to(dtype), sin.repeat_interleave(2, dim=-1).to(dtype)


def halves_to_pairs(weight: Tensor, num_heads: int) -> Tensor:
    """Rows of a query/key projection ``(num_heads * dk, ...)`` from GPT-NeoX's layout (feature ``i``
    rotated with ``i + dk/2``) to (even, odd) pairs: row ``i`` of a head goes to ``2i``, row
    ``i + dk/2`` to ``2i + 1``. Exact (a permutation); :func:`pairs_to_halves` undoes it."""
    rest = weight.shape[1:]
    return weight.reshape(num_heads, 2, -1, *rest).transpose(1, 2).reshape(weight.shape)


def pairs_to_halves(weight: Tensor, num_heads: int) -> Tensor:
    """The inverse of :func:`halves_to_pairs`."""
    rest = weight.shape[1:]
    return weight.reshape(num_heads, -1, 2, *rest).transpose(1, 2).reshape(weight.shape)


@functools.lru_cache(maxsize=4)
def rotation_tables_from_zero(length: int, key_dim: int, dtype: torch.dtype,
                              device: torch.device, kind: str = "xpos") -> tuple[Tensor, Tensor]:
    """Cached :func:`rotation_tables` of positions ``0 .. length - 1``: each ``(length, key_dim)``.

    Every training step and every prompt without a state counts from 0, so the same table serves
    them all (computing it took ~0.5 ms of a 2 x 1,024-token training step). A few entries: a run
    has one or two lengths (training, evaluation), and prompts of many lengths would otherwise
    keep a table each (4 MB at 8k tokens, key width 64). Plain tensors even when the first call
    comes under ``inference_mode``: a later backward may save them.
    """
    with torch.inference_mode(False), torch.no_grad():
        return rotation_tables(torch.arange(length, device=device), key_dim, dtype, kind)


def rotate_every_two(x: Tensor) -> Tensor:
    """Maps each (even, odd) pair ``(a, b)`` of the last dim to ``(-b, a)``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_every_two(x) * sin``; ``cos``/``sin`` broadcast against ``x``."""
    return x * cos + rotate_every_two(x) * sin


def rotate_pairs(pairs: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``(a, b)`` pairs ``(..., 2)`` rotated by the angles of ``cos``/``sin`` (broadcasting against
    ``(...)``): the complex product ``(a + ib) e^{i theta}`` in real arithmetic."""
    a, b = pairs.unbind(-1)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)


def rotate_heads(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every head of ``t`` ``(b, L, heads * dk)`` (heads side by side, as a projection gives
    them) by ``(cos, sin)`` ``(b or 1, 1, L, dk)`` (each angle repeated for its pair): each
    (even, odd) pair times its angle's ``e^{i theta}``, one complex product (float32 and float64),
    instead of the stack/neg/mul/add chain of :func:`apply_rotation`."""
    dk = cos.shape[-1]
    factor = torch.complex(cos[:, 0, :, 0::2], sin[:, 0, :, 0::2]).unsqueeze(2)  # (b, L, 1, dk/2)
    pairs = torch.view_as_complex(t.unflatten(-1, (-1, dk // 2, 2)))  # (b, L, n, dk/2)
    return torch.view_as_real(pairs * factor).flatten(-3)


def to_halves(t: Tensor, heads: int, dim: int = -1) -> Tensor:
    """Reorder axis ``dim`` of ``t`` (``heads * dk`` long) within each head: the even key
    dimensions, then the odd ones (``[0, 2, ..., dk-2, 1, 3, ..., dk-1]``)."""
    return t.movedim(dim, -1).unflatten(-1, (heads, -1, 2)).transpose(-1, -2).flatten(-3).movedim(-1, dim)


def from_halves(t: Tensor, heads: int, dim: int = -1) -> Tensor:
    """The inverse of :func:`to_halves`."""
    return t.movedim(dim, -1).unflatten(-1, (heads, 2, -1)).transpose(-1, -2).flatten(-3).movedim(-1, dim)


def half_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``(b, 1, L, dk)`` (each angle twice, for its pair) -> the tables of
    :func:`rotate_halves`, ``(b, L, 2, dk / 2)`` contiguous: ``(cos, cos)`` and ``(-sin, sin)``.
    (Strided tables would keep a compiled rotation from vectorizing.)"""
    cos, sin = cos[:, 0, :, 0::2], sin[:, 0, :, 0::2]
    return torch.stack((cos, cos), dim=-2), torch.stack((-sin, sin), dim=-2)


def rotate_halves(halves: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``(a, b)`` = the (even, odd) halves ``(..., 2, dk / 2)`` of each head (the
    :func:`to_halves` order) by :func:`half_tables`' ``(cos, sin)``: ``(a, b) c + (-b, a) s``.

    One pointwise expression (the halves swapped by a flip, a load index to a compiler), so it
    fuses with what follows; a cat would not."""
    return halves * cos + halves.flip(-2) * sin


def rotation_factors(positions: Tensor, key_dim: int, dtype: torch.dtype, kind: str = "xpos") -> Tensor:
    """Complex ``(len, 2, dk / 2)`` for ``positions`` ``(len,)``: the query's ``e^{i pos theta}`` and
    the key's, times :func:`key_scale`, in the complex type of ``dtype``. Computed in float64
    (``"rope"``: from the float32 cosines and sines its tables use)."""
    if kind == "xpos":
        theta = rotation_frequencies(key_dim, device=positions.device)[::2]
        angles = positions.to(torch.float64)[:, None] * theta
        rows = torch.polar(torch.ones_like(angles), angles)
    else:
        cos, sin = rotation_cos_sin(positions, key_dim, kind)
        rows = torch.complex(cos.double(), sin.double())
    scale = torch.tensor([1.0, key_scale(key_dim)], dtype=torch.float64, device=positions.device)
    return (rows[:, None, :] * scale[:, None]).to(complex_dtype(dtype))


@functools.lru_cache(maxsize=4)
def rotation_factor_table(size: int, key_dim: int, dtype: torch.dtype, device: torch.device,
                          kind: str = "xpos") -> Tensor:
    """:func:`rotation_factors` of positions ``0 .. size - 1``, cached: a decoding step reads its
    rows instead of computing trigonometry per token. A plain tensor even when the first call
    comes under ``inference_mode`` (it outlives that call)."""
    with torch.inference_mode(False):
        return rotation_factors(torch.arange(size, device=device), key_dim, dtype, kind)


def complex_dtype(dtype: torch.dtype) -> torch.dtype:
    """The complex type rotation factors take for features of ``dtype``."""
    return torch.complex128 if dtype == torch.float64 else torch.complex64
