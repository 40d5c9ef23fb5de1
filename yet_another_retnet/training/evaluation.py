"""The loss a run trains on and the validation it reports: :func:`lm_loss`, :func:`evaluate`,
:func:`bits_per_byte`."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist_utils


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lm_loss(model: nn.Module, window: Tensor, chunk_size: int | None, reset_mask: Tensor | None = None,
            loss_mask: Tensor | None = None) -> Tensor:
    """Mean next-token cross entropy (float32) of ``window`` ``(batch, seq_len + 1)``; with
    ``reset_mask`` ``(batch, seq_len)`` the state and positions restart where it is True; with
    ``loss_mask`` ``(batch, seq_len + 1)`` only targets where it is True are scored (label -100
    elsewhere; a batch with none scored has loss 0)."""
    extra = {} if reset_mask is None else {"reset_mask": reset_mask}
    logits = model(window[:, :-1], chunk_size=chunk_size, **extra).logits
    scores = logits.float().reshape(-1, logits.shape[-1])
    if loss_mask is None:
        return F.cross_entropy(scores, window[:, 1:].reshape(-1))
    targets = window[:, 1:].masked_fill(~loss_mask[:, 1:], -100)
    total = F.cross_entropy(scores, targets.reshape(-1), reduction="sum")
    return total / targets.ne(-100).sum().clamp(min=1)


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, batch_size: int, device: torch.device, precision: str,
             chunk_size: int | None = None, info: dist_utils.DistInfo | None = None,
             resets: Tensor | None = None, loss_masks: Tensor | None = None) -> float:
    """Mean cross entropy in nats per token over ``windows`` ``(n, seq_len + 1)`` (``resets``
    ``(n, seq_len)``: where documents start, for ``--doc-boundaries reset``).

    Under several processes each rank scores its share and the sums are combined; every rank
    runs the same number of forward calls (FSDP needs all of them in each).
    """
    info = info or dist_utils.DistInfo()
    was_training = model.training
    model.eval()
    share = windows[info.rank::info.world_size]
    reset_share = None if resets is None else resets[info.rank::info.world_size]
    mask_share = None if loss_masks is None else loss_masks[info.rank::info.world_size]
    per_rank = math.ceil(len(windows) / info.world_size)
    n_batches = math.ceil(per_rank / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for b in range(n_batches):
        batch = share[b * batch_size:(b + 1) * batch_size]
        mask = None if reset_share is None else reset_share[b * batch_size:(b + 1) * batch_size]
        scored = None if mask_share is None else mask_share[b * batch_size:(b + 1) * batch_size]
        weight = 1.0
        if len(batch) == 0:  # this rank ran out: a dummy call that counts for nothing
            batch, weight = windows[:1], 0.0
            mask = None if resets is None else resets[:1]
            scored = None if loss_masks is None else loss_masks[:1]
        batch = batch.to(device)
        extra = {} if mask is None else {"reset_mask": mask.to(device)}
        with autocast_context(device, precision):
            logits = model(batch[:, :-1], chunk_size=chunk_size, **extra).logits
        targets = batch[:, 1:]
        if scored is not None:  # supervised fine-tuning: only the completions' tokens count
            targets = targets.masked_fill(~scored[:, 1:].to(device), -100)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction="sum")
        count = targets.numel() if scored is None else int(targets.ne(-100).sum())
        total += torch.stack([loss.double() * weight, torch.tensor(count * weight,
                                                                    dtype=torch.float64, device=device)])
    total = dist_utils.all_reduce_sum(total, info)
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def eval_window_index(count: int, max_windows: int | None) -> Tensor:
    """Which of ``count`` consecutive validation windows to score: all of them, or, where
    ``max_windows`` is smaller, that many spread evenly over the split (window
    ``i * count // max_windows`` for ``i < max_windows``, the first one included). The choice
    depends on nothing else, so every evaluation of a run scores the same windows. Shape
    ``(min(count, max_windows),)``, int64."""
    if max_windows is None or max_windows >= count:
        return torch.arange(count)
    return torch.arange(max_windows) * count // max_windows


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    return loss / math.log(2) / bytes_per_token

