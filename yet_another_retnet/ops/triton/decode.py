"""One recurrent retention step on CUDA in one Triton kernel (``decode_kernels.py``): the same
function as :func:`~yet_another_retnet.ops.retention.retention_recurrent` on checked inputs,
inference only (no autograd; a step that needs gradients stays on the PyTorch form)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._load import interpreter, kernel_module, outside_graphs
from .chunkwise import MAX_KEY_DIM, _pow2, on_device

__all__ = ["MAX_KEY_DIM", "retention_step_triton", "step_with_gamma"]


def retention_step_triton(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None, log_gamma: Tensor,
                          scale: float) -> tuple[Tensor, Tensor]:
    """``(out (batch, heads, dv) in q's dtype, state (batch, heads, dk, dv) float32)``.

    ``q``, ``k`` ``(batch, heads, dk)``, ``v`` ``(batch, heads, dv)`` in float32, bfloat16 or
    float16; ``prev_state`` ``(batch, heads, dk, dv)`` or ``None``; ``log_gamma`` ``(heads,)``
    (float64 from ``ops/decay.py``: gamma is taken from it in float64, then cast).
    """
    gamma = torch.exp(log_gamma.detach().to(device=q.device, dtype=torch.float64)).to(torch.float32)
    return step_with_gamma(q, k, v, prev_state, gamma, scale)


@outside_graphs  # a graph break under torch.compile, as chunk_retention_triton
def step_with_gamma(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None, gamma: Tensor,
                    scale: float, out_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`retention_step_triton` with the decays given as ``gamma`` ``(heads,)`` float32 (what a
    model's decoding step keeps at hand). ``out_state``: where the new state goes (a contiguous
    float32 ``(batch, heads, dk, dv)``; it may be ``prev_state`` itself: each program reads its
    tile before writing it, so the step updates a state in place), else a new tensor."""
    batch, heads, dk = q.shape
    dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    gamma = gamma.to(device=q.device, dtype=torch.float32).contiguous()
    s0 = None if prev_state is None else prev_state.to(torch.float32).contiguous()
    if out_state is None:
        state = torch.empty(batch, heads, dk, dv, dtype=torch.float32, device=q.device)
    else:
        if (out_state.dtype != torch.float32 or not out_state.is_contiguous()
                or tuple(out_state.shape) != (batch, heads, dk, dv) or out_state.device != q.device):
            raise ValueError(f"out_state must be a contiguous float32 {(batch, heads, dk, dv)} tensor on {q.device}")
        state = out_state
    out = torch.empty_like(v)
    bk = _pow2(dk)
    bv = min(_pow2(dv), 64 if bk <= 64 else 32)
    grid = (-(-dv // bv), batch * heads)
    interpret = q.device.type != "cuda"
    _step = kernel_module("decode_kernels", interpret)._step
    with interpreter(interpret), on_device(q):  # launch on q's GPU, not the current one
        _step[grid](q, k, v, s0 if s0 is not None else state, state, out, gamma, float(scale), heads, dk, dv,
                    BK=bk, BV=bv, HAS_S0=s0 is not None)
    return out, state
