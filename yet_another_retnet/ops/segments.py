"""Documents packed into rows, laid out one document per row: the retention equivalent of
variable-length attention.

A packed training window holds the end of one document and the start of the next. With a
``reset_mask`` ``(batch, length)`` (True where a document starts) every document must see only
itself: its state starts empty and its positions start at 0. :func:`segment_layout` cuts the
rows at those points and :func:`pack` gathers the pieces ("segments") into rows of their own,
left-padded to the longest; whatever runs on the packed rows (any retention form, the fused CPU
kernels included) then runs each document alone, and :func:`unpack` puts the outputs back in
place. Left padding is what every form already supports on a sequence's first call (padded keys
and values are zeroed and take no position), so the state after each segment is exact too.

A window that continues a state from the previous window (``carry_state``) hands that state to
each row's first segment only, unless the row starts a document at position 0. Such a segment is
laid out *left-aligned*, its padding after it: padding after a token cannot reach it (retention is
causal), whereas padding before it would decay the carried state. Its own final state then holds
the padding's decay, but it is only ever read where the segment is its row's only one, which
spans the whole row and so has no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Segments:
    """Where each token of a packed ``(batch, length)`` input goes in the ``(segments, width)`` layout.

    Attributes:
        gather: ``(segments, width)`` long, flat index into ``batch * length`` of each slot
            (padding slots point at token 0; :attr:`valid` marks them).
        valid: ``(segments, width)`` bool, True for real tokens (right-aligned: left padding).
        scatter: ``(batch * length,)`` long, flat index into ``segments * width`` of each token.
        last: ``(batch,)`` long, each row's last segment.
        lengths: ``(segments,)`` long, tokens per segment.
        rows: ``(segments,)`` long, the row each segment comes from.
        carried: ``(segments,)`` bool, segments that continue their row's earlier state (only
            with ``carry_state``; they are left-aligned, see the module docstring).
    """

    gather: Tensor
    valid: Tensor
    scatter: Tensor
    last: Tensor
    lengths: Tensor
    rows: Tensor
    carried: Tensor

    @property
    def padded(self) -> bool:
        return not bool(self.valid.all())


def check_reset_mask(reset_mask: object, shape: tuple[int, ...]) -> Tensor:
    """``reset_mask`` as a bool tensor of ``shape`` ``(batch, length)``; a clear error otherwise."""
    if not isinstance(reset_mask, Tensor):
        raise TypeError(f"reset_mask must be a torch.Tensor, got {type(reset_mask).__name__}")
    if tuple(reset_mask.shape) != tuple(shape):
        raise ValueError(f"reset_mask must have shape (batch, length) = {tuple(shape)}, got {tuple(reset_mask.shape)}")
    if reset_mask.dtype != torch.bool:
        if reset_mask.is_floating_point() or bool(((reset_mask != 0) & (reset_mask != 1)).any()):
            raise ValueError("reset_mask must hold only True/False (or 0/1)")
        reset_mask = reset_mask.bool()
    return reset_mask


def segment_layout(reset_mask: Tensor, carry_state: bool = False) -> Segments:
    """The one-document-per-row layout of a ``(batch, length)`` bool ``reset_mask``.

    Every row starts a segment at position 0 whatever the mask says there; a True elsewhere
    starts a new one. With ``carry_state`` each row's first segment continues the row's earlier
    state unless the mask is True at position 0 (:attr:`Segments.carried`, left-aligned).
    """
    batch, length = reset_mask.shape
    device = reset_mask.device
    starts = reset_mask.clone()
    if length:
        starts[:, 0] = True
    flat = starts.reshape(-1)
    first = flat.nonzero().squeeze(1)  # (segments,) flat index of each segment's first token
    n = first.numel()
    ends = torch.cat([first[1:], torch.tensor([batch * length], device=device)])
    lengths = ends - first
    width = int(lengths.max()) if n else 0
    segment_of = torch.cumsum(flat.long(), 0) - 1  # (batch * length,)
    offset = torch.arange(batch * length, device=device) - first[segment_of]
    rows = first // max(length, 1)
    carried = torch.zeros(n, dtype=torch.bool, device=device)
    if carry_state and n:
        carried = (first % max(length, 1) == 0) & ~reset_mask.reshape(-1)[first]
    pad = torch.where(carried, torch.zeros_like(lengths), width - lengths)  # left padding of each segment
    scatter = segment_of * width + pad[segment_of] + offset
    slots = torch.arange(width, device=device)
    valid = (slots[None, :] >= pad[:, None]) & (slots[None, :] < (pad + lengths)[:, None])
    gather = torch.where(valid, first[:, None] + slots[None, :] - pad[:, None], torch.zeros((), dtype=torch.long,
                                                                                               device=device))
    last = torch.zeros(batch, dtype=torch.long, device=device)
    last.scatter_reduce_(0, rows, torch.arange(n, device=device), reduce="amax", include_self=False)
    return Segments(gather, valid, scatter, last, lengths, rows, carried)


def pack(x: Tensor, seg: Segments) -> Tensor:
    """``(batch, length, ...)`` -> ``(segments, width, ...)``; padding slots hold token 0's values."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat[seg.gather]


def unpack(y: Tensor, seg: Segments, batch: int, length: int) -> Tensor:
    """``(segments, width, ...)`` -> ``(batch, length, ...)``: each token's slot, padding dropped."""
    flat = y.reshape(-1, *y.shape[2:])
    return flat.index_select(0, seg.scatter).view(batch, length, *y.shape[2:])


def document_positions(reset_mask: Tensor) -> Tensor:
    """``(batch, length)`` long: each token's position inside its document (0 at each start)."""
    batch, length = reset_mask.shape
    starts = reset_mask.clone()
    if length:
        starts[:, 0] = True
    idx = torch.arange(length, device=reset_mask.device).expand(batch, length)
    last_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - last_start
