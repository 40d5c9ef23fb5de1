"""Data-parallel training with ``torch.distributed``: DDP by default, FSDP2 on request.

``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them, picks NCCL for CUDA devices and gloo otherwise, and binds
each process to its local GPU. Without those variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun``; return this rank's info and device.

    ``device`` is the user's choice (``"cpu"``, ``"cuda"``, ``None`` for CUDA when available).
    Under ``torchrun`` a CUDA device becomes ``cuda:LOCAL_RANK``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(default_device(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if world_size > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return DistInfo(rank, world_size, local_rank), dev


def in_process_group() -> bool:
    """Whether this process has joined a process group (``torchrun`` with several processes)."""
    return dist.is_available() and dist.is_initialized()


def default_device(device: str | None) -> str:
    """The user's ``--device``, or CUDA where it is available and the CPU otherwise."""
    return device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def shutdown_distributed() -> None:
    if in_process_group():
        dist.destroy_process_group()


def all_reduce_mean(value: Tensor, info: DistInfo) -> Tensor:
    """The mean of ``value`` over all ranks (the value itself in one process)."""
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / info.world_size


def all_reduce_sum(value: Tensor, info: DistInfo) -> Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (e.g. "stop now" after a signal reached rank 0 only)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def fsdp2() -> Any:
    """FSDP2's ``fully_shard``: ``torch.distributed.fsdp`` from torch 2.6, its ``_composable`` home in
    2.4 and 2.5. Raises ``ValueError`` naming ``--fsdp`` on older torch (FSDP2 did not exist)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ValueError(f"--fsdp needs torch >= 2.4 (FSDP2's fully_shard); this is torch {torch.__version__}: "
                             "upgrade torch, or train with DDP (drop --fsdp)") from None
    return fully_shard


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device, fsdp: bool) -> nn.Module:
    """The module to train: ``model`` itself, DDP around it, or ``model`` sharded with FSDP2.

    FSDP2 (``fully_shard``) shards every decoder layer and then the root (embedding, final norm,
    head), so parameters, gradients and optimizer state are split over ranks; it changes
    ``model`` in place (its parameters become ``DTensor`` shards).
    """
    if not info.enabled:
        if fsdp:
            raise ValueError("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        return model
    if fsdp:
        fully_shard = fsdp2()
        for layer in model.decoder.layers:  # type: ignore[union-attr]
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
