"""The optimizer and the learning-rate schedule of a training run."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig, fused_ok: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases and the (tied) embedding are exempt."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "embed_tokens" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             fused=True if fused_ok else None)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then down to ``min_lr_ratio`` at ``max_steps``:
    linearly (``schedule="linear"``), along a half cosine (``"cosine"``), or held at the peak and
    then decayed linearly over the last ``decay_fraction`` of the steps (``"wsd"``,
    warm-up-stable-decay)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    start = config.warmup_steps
    if config.schedule == "wsd":
        start = max(start, config.max_steps - round(config.decay_fraction * config.max_steps))
        if step < start:
            return 1.0
    span = max(1, config.max_steps - start)
    progress = min(1.0, (step - start) / span)
    if config.schedule == "cosine":
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - config.min_lr_ratio) * progress

