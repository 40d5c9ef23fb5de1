"""A training run's state: what its steps change, built fresh or from a checkpoint
(:func:`build_state`) and saved as one (:func:`save_state`).

The two directions live side by side so that what a checkpoint saves and what ``--resume``
restores are read against each other in one place (the run's settings and CPU matmul backend
saved with them are checked earlier, by :func:`.resolve.check_run`). :class:`Run` holds what
stays fixed for the run; :mod:`.trainer` drives the steps.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import RetNet, RetNetConfig
from ..ops import matmul
from . import distributed as dist_utils
from . import rundir
from .checkpoint import (
    cuda_rng_states,
    full_model_state,
    full_state_dicts,
    load_full_state_dicts,
    load_sharded,
    remove_stale_sharded,
    rng_state,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from .config import TrainConfig
from .data import TokenSource, WindowSampler
from .optim import build_optimizer, lr_factor
from .progress import plot_losses, write_metrics


@dataclass(frozen=True)
class Run:
    """What a run fixes once its input is checked, which the pieces of the training loop
    (:mod:`.trainer`) share rather than each taking a dozen separate arguments."""

    config: TrainConfig
    model_config: RetNetConfig
    info: dist_utils.DistInfo
    device: torch.device
    out: Path
    micro_batch: int  # sequences per forward pass on this rank
    record: dict[str, Any]  # train_config.json's content, saved again in every checkpoint
    say: Callable[[str], None]  # a line for the user (the main process prints it, the others not)


@dataclass
class TrainState:
    """Everything a training step changes: what a checkpoint saves and ``--resume`` restores,
    plus what this call reports in its :class:`~.config.TrainResult`."""

    model: RetNet
    train_module: nn.Module  # the model as DDP / FSDP wraps it (the model itself in one process)
    forward_module: nn.Module  # what a step calls: ``train_module``, compiled under --compile --fsdp
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: Any  # torch.amp.GradScaler (torch.cuda.amp's on torch 2.2): grad_scaler()
    sampler: WindowSampler  # its generator is the data position
    started: float  # ``time.perf_counter()`` when this call began
    metrics: list[dict[str, Any]] = field(default_factory=list)  # every record, earlier calls' too
    step: int = 0
    elapsed_before: float = 0.0  # seconds the calls before a resume trained
    # The losses since the last log line: a resumed run logs the same means as a straight one.
    window_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each of this call's steps
    val_loss: float | None = None  # the latest evaluation's
    val_bpb: float | None = None
    wandb_id: str | None = None  # the W&B run (--log-to wandb) a resume continues

    def elapsed_s(self) -> float:
        """Training time so far, the calls before a resume included."""
        return self.elapsed_before + time.perf_counter() - self.started


def grad_scaler(device_type: str, enabled: bool) -> Any:
    """The fp16 gradient scaler (a pass-through unless ``enabled``). ``torch.amp.GradScaler`` is
    torch >= 2.3; torch 2.2 has CUDA's alone (fp16 off CUDA is refused there: TrainConfig)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")


def build_state(run: Run, train_data: TokenSource, checkpoint: dict[str, Any] | None,
                started: float) -> TrainState:
    """The model, optimizer, schedule, gradient scaler and data sampler, initialised from
    ``--seed``, then, on ``--resume``, loaded from ``checkpoint`` (``started``: when this call
    began, for the elapsed time). A resume overwrites the fresh initialisation, and restores the
    saved RNG states only after it, so the resumed run draws what the straight run would have."""
    config, device = run.config, run.device
    torch.manual_seed(config.seed)
    model = RetNet(run.model_config).to(device)
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable()
    train_module = dist_utils.wrap_model(model, run.info, device, config.fsdp)
    optimizer = build_optimizer(model, config, fused_ok=device.type == "cuda" and not config.fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    scaler = grad_scaler(device.type, enabled=config.precision == "fp16")
    sampler = WindowSampler(train_data, config.seq_len, config.seed)
    state = TrainState(model, train_module, train_module, optimizer, scheduler, scaler, sampler, started)
    if checkpoint is not None:
        if "sharded" in checkpoint:  # written with torch.distributed.checkpoint, by any number of ranks
            load_sharded(run.out, str(checkpoint["sharded"]), model, optimizer)
        else:
            load_full_state_dicts(model, optimizer, checkpoint["model"], checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        sampler.load_state_dict(checkpoint["sampler"])
        note = set_rng_state(checkpoint["rng"], device, run.info.rank, run.info.world_size)
        if note:
            run.say(note)
        state.metrics = list(checkpoint["metrics"])
        state.step = int(checkpoint["step"])
        state.elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        state.window_losses = [float(x) for x in checkpoint.get("window_losses", [])]
        state.wandb_id = checkpoint.get("wandb_id")
        # The schedule follows this call's --max-steps (a finished run only with --extend-schedule:
        # resolve.check_run).
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(state.step, config)
    if config.compile:
        if config.fsdp:  # sharded parameters: compile the wrapped module as a whole
            state.forward_module = torch.compile(train_module)  # type: ignore[assignment]
        else:
            # Each retention layer's chunkwise form (measured faster than compiling the whole
            # model, whose input checks break the graph); evaluation shares it.
            model.compile_chunkwise()
    return state


def save_state(run: Run, state: TrainState, plot_notes: set[str]) -> None:
    """Checkpoint ``state`` at its step, then export the model and rewrite the metrics and the
    loss plot. Every rank calls it: gathering full states under FSDP and writing sharded
    checkpoints are collectives, and the closing barrier keeps any rank from running ahead of a
    checkpoint that is not complete. ``plot_notes``: the notes already shown (said once)."""
    config, info, out = run.config, run.info, run.out
    check_finite(run, state)  # before anything is written: the last checkpoint stays the good one
    cuda_rng = cuda_rng_states(run.device, info.world_size)  # a collective: every rank's own state
    sharded = None
    if config.sharded_checkpoint:  # each rank writes its shards; only the model is gathered (export)
        sharded = save_sharded(out, state.step, state.model, state.optimizer, info.is_main)
        model_state = full_model_state(state.model)
        states: dict[str, Any] = {"sharded": sharded}
    else:
        model_state, optimizer_state = full_state_dicts(state.model, state.optimizer)
        states = {"model": model_state, "optimizer": optimizer_state}
    if info.is_main:
        save_checkpoint(out, {
            "step": state.step, **states,
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
            "sampler": state.sampler.state_dict(), "rng": rng_state(cuda_rng), "metrics": state.metrics,
            "elapsed_s": state.elapsed_s(), "run": run.record,
            "cpu_matmul": matmul.cpu_backend(), "window_losses": list(state.window_losses),
            "wandb_id": state.wandb_id,
        })
        remove_stale_sharded(out, sharded)  # only now is the new checkpoint the valid one
        _save_model(model_state, run.model_config, out)
        write_metrics(out, state.metrics)
        rundir.checkpointed(out)  # --overwrite: the replaced run can go now
        note = plot_losses(out, state.metrics)
        if note and note not in plot_notes:
            run.say(note)
            plot_notes.add(note)
    dist_utils.barrier(info)


def nonfinite_hint(precision: str) -> str:
    """What to try when training produced a value that is not finite, under ``--precision``
    (a resume keeps ``--lr``, but may leave a reduced precision: resolve.check_run)."""
    if precision == "fp32":
        return "lower --lr in a new run"
    better = "bf16 or fp32" if precision == "fp16" else "fp32"
    return f"--resume with --precision {better}, or lower --lr in a new run"


def check_finite(run: Run, state: TrainState) -> None:
    """Raise ``FloatingPointError`` if the weights or the latest validation loss are not finite:
    a checkpoint of them would replace the last good one. Every rank checks its own parameters
    (its shards under FSDP) and the verdict is summed over ranks, so all of them raise together."""
    local = [getattr(p, "to_local", lambda p=p: p)() for p in state.model.parameters()]
    bad = torch.stack([~torch.isfinite(t).all() for t in local]).any().to(torch.float32)
    weights_bad = float(dist_utils.all_reduce_sum(bad, run.info)) > 0
    loss_bad = state.val_loss is not None and not math.isfinite(state.val_loss)
    if weights_bad or loss_bad:
        what = "weights" if weights_bad else f"validation loss ({state.val_loss})"
        raise FloatingPointError(
            f"the model's {what} became non-finite at step {state.step}: not saved, the checkpoint in "
            f"{run.out} stays the last good one; {nonfinite_hint(run.config.precision)}")


def _save_model(state: dict[str, Tensor], model_config: RetNetConfig, out: Path) -> None:
    """``save_pretrained`` from a full CPU state dict (the FSDP-safe way: no live module needed)."""
    with torch.device("meta"):
        shell = RetNet(model_config, device="meta")
    shell.load_state_dict(state, assign=True, strict=False)
    shell.save_pretrained(out)
