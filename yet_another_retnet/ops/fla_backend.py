"""flash-linear-attention's ``chunk_retention`` behind our chunkwise API (CUDA only, Eq. 8 decay):
a fast peer to compare our kernels with. Selected by ``backend="fla"`` or
``YARETNET_CUDA_RETENTION=fla`` (:mod:`yet_another_retnet.ops.backends`).

Layout and state conventions differ from ours: fla takes ``(batch, length, heads, dim)`` and
keeps its state without the key scale (it scales the queries, ``o = scale q S``), while ours is
``sum gamma^(...) scale k^T v``; so a state is divided by ``scale`` on the way in and multiplied
on the way out.
"""

from __future__ import annotations

from torch import Tensor

from .triton._load import outside_graphs

__all__ = ["chunk_retention_fla"]


# A graph break under torch.compile, as our own launchers: fla's autotuned Triton functions are
# not ours to promise traceable, and its import must not happen inside a trace.
@outside_graphs
def chunk_retention_fla(q: Tensor, k: Tensor, v: Tensor, prev_state: Tensor | None,
                        scale: float) -> tuple[Tensor, Tensor]:
    """``(out (b, h, L, dv) in q's dtype, state (b, h, dk, dv) float32)`` through fla.

    ``q``, ``k`` ``(b, h, L, dk)``, ``v`` ``(b, h, L, dv)`` CUDA tensors; ``prev_state`` as ours.
    The decay is fla's Eq. 8 (checked by the caller)."""
    from fla.ops.retention import chunk_retention

    initial = None if prev_state is None else (prev_state / scale).float().contiguous()
    out, final = chunk_retention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                 v.transpose(1, 2).contiguous(), scale=scale, initial_state=initial,
                                 output_final_state=True)
    return out.transpose(1, 2), final.float() * scale
