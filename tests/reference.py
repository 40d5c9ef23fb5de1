"""Independent float64 references for the tests: plain token-by-token loops.

Nothing here imports the code under test. Everything is written from the paper's equations
(Sun et al. 2023, arXiv 2307.08621), as docs/math.md states them:

- per head, ``S_n = gamma * S_{n-1} + (scale * k_n)^T v_n`` and ``o_n = q_n S_n``;
- decay schedules ``gamma_i = 1 - 2^(-5-i)`` ("eq8") and
  ``gamma = 1 - exp(linspace(log 1/32, log 1/512, h))`` ("log-spaced");
- rotation ``theta_i = 1 / 10000^(i / (dk/2 - 1))`` for each (even, odd) pair ``(a, b)``:
  ``(a cos - b sin, b cos + a sin)`` at the token's absolute position;
- the layer ``(swish(x W_G) * HeadNorm(retention)) W_O``.

The recurrence is stepped one token at a time in float64: slow, obviously right.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

F64 = torch.float64


def reference_gammas(num_heads: int, schedule: str = "eq8") -> Tensor:
    """Per-head gammas, ``(num_heads,)`` float64, computed with Python floats."""
    if schedule == "eq8":
        values = [1.0 - 2.0 ** (-5 - i) for i in range(num_heads)]
    elif schedule == "log-spaced":
        lo, hi = math.log(1 / 32), math.log(1 / 512)
        if num_heads == 1:
            values = [1.0 - math.exp(lo)]
        else:
            values = [1.0 - math.exp(lo + (hi - lo) * i / (num_heads - 1)) for i in range(num_heads)]
    else:
        raise ValueError(schedule)
    return torch.tensor(values, dtype=F64)


def reference_retention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gammas: Tensor,
    scale: float | None = None,
    prev_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Retention by the recurrence, one token at a time, in float64.

    q, k ``(batch, heads, length, dk)``, v ``(batch, heads, length, dv)``, gammas ``(heads,)``,
    prev_state ``(batch, heads, dk, dv)`` or None. Returns ``(out (b, h, L, dv), state)``.
    """
    # Not detached: the tests differentiate through this loop as an independent gradient reference.
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    batch, heads, length, dk = q.shape
    dv = v.shape[-1]
    s = dk**-0.5 if scale is None else scale
    g = gammas.detach().to(F64).view(1, heads, 1, 1)
    state = torch.zeros(batch, heads, dk, dv, dtype=F64) if prev_state is None else prev_state.to(F64)
    outs = []
    for t in range(length):
        state = g * state + (s * k[:, :, t]).unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    out = torch.stack(outs, dim=2) if outs else torch.zeros(batch, heads, 0, dv, dtype=F64)
    return out, state


def reference_rotate(x: Tensor, positions: Tensor, kind: str = "xpos") -> Tensor:
    """Rotate ``x`` ``(batch, heads, length, dk)`` by ``positions`` ``(batch, length)`` (float64).

    ``kind="rope"``: GPT-NeoX's frequencies ``10000^(-2i/dk)``, whose angles, cosines and sines
    are float32 values (as the models trained with them computed them), applied in float64.
    """
    dk = x.shape[-1]
    half = dk // 2
    if kind == "rope":
        f32 = torch.float32
        theta32 = 1.0 / (10000.0 ** (torch.tensor([2.0 * i for i in range(half)], dtype=f32) / dk))
        angle32 = positions.to(f32)[:, None, :, None] * theta32
        cos, sin = torch.cos(angle32).to(F64), torch.sin(angle32).to(F64)
    else:
        theta = torch.tensor(
            [1.0 / 10000 ** (i / (half - 1) if half > 1 else 0.0) for i in range(half)], dtype=F64
        )
        angle = positions.to(F64)[:, None, :, None] * theta  # (b, 1, L, dk/2)
        cos, sin = torch.cos(angle), torch.sin(angle)
    a, b = x[..., 0::2], x[..., 1::2]
    ra = a * cos - b * sin
    rb = b * cos + a * sin
    return torch.stack((ra, rb), dim=-1).flatten(-2)


def _linear(x: Tensor, layer: torch.nn.Linear) -> Tensor:
    w = layer.weight.detach().to(F64)
    out = x @ w.T
    if layer.bias is not None:
        out = out + layer.bias.detach().to(F64)
    return out


def reference_msr(
    layer: torch.nn.Module,
    x: Tensor,
    start: int = 0,
    prev_memory: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The whole multi-scale retention layer in float64, from its weights and settings.

    Reads only the layer's configuration attributes and parameters (projections, head norm
    weights, gammas, eps). x ``(batch, length, embed_dim)``; ``start`` is the absolute position
    of the first token. Returns ``(y (batch, length, embed_dim), memory (b, h, dk, dv))``.
    """
    x = x.detach().to(F64)
    batch, length, _ = x.shape
    h, dk, dv = layer.num_heads, layer.key_dim, layer.head_dim
    q = _linear(x, layer.q_proj).view(batch, length, h, dk).transpose(1, 2)
    k = _linear(x, layer.k_proj).view(batch, length, h, dk).transpose(1, 2)
    v = _linear(x, layer.v_proj).view(batch, length, h, dv).transpose(1, 2)
    if layer.relative_position:
        positions = (start + torch.arange(length)).expand(batch, length)
        kind = getattr(layer, "rotation_kind", "xpos")
        q, k = reference_rotate(q, positions, kind), reference_rotate(k, positions, kind)
    out, memory = reference_retention(q, k, v, layer.gammas, prev_state=prev_memory)
    y = out.transpose(1, 2)  # (b, L, h, dv)
    eps = layer.norm_eps
    if layer.head_norm == "groupnorm":
        mean = y.mean(-1, keepdim=True)
        var = ((y - mean) ** 2).mean(-1, keepdim=True)
        y = ((y - mean) / torch.sqrt(var + eps)).reshape(batch, length, h * dv)
        y = y * layer.norm_weight.detach().to(F64) + layer.norm_bias.detach().to(F64)
    else:
        y = y / torch.sqrt((y**2).mean(-1, keepdim=True) + eps)
        if getattr(layer, "head_weight", None) is not None:  # one (dv,) weight for every head
            y = y * layer.head_weight.detach().to(F64)
        y = y.reshape(batch, length, h * dv)
    gate = _linear(x, layer.g_proj)
    gate = gate * torch.sigmoid(gate)  # swish
    return _linear(gate * y, layer.out_proj), memory


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (Frobenius norms)."""
    a, e = actual.detach().to(F64), expected.detach().to(F64)
    denom = torch.linalg.vector_norm(e).item()
    return torch.linalg.vector_norm(a - e).item() / max(denom, 1e-300)


def second_derivatives(fn, xs: list[Tensor]) -> tuple[Tensor, ...]:
    """Gradients w.r.t. ``xs`` of the squared norm of the first gradients of ``sum(fn(*xs) ** 2)``:
    a double backward through ``fn`` (``create_graph=True``), for the ops whose kernels' backwards
    hand a double backward to their plain forms."""
    firsts = torch.autograd.grad(fn(*xs).square().sum(), xs, create_graph=True)
    return torch.autograd.grad(sum(g.square().sum() for g in firsts), xs)
