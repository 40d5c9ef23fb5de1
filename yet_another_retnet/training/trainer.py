"""The training loop behind ``retnet train``: language modelling on a text corpus.

A run lives in one output directory::

    train_config.json      the run's settings (checked on --resume)
    config.json            the model, in save_pretrained format
    model.safetensors      (RetNet.from_pretrained(directory) loads it)
    tokenizer_config.json  which tokenizer the model reads (plus tokenizer.json for HF ones)
    checkpoint.pt          everything needed to resume bit for bit
    metrics.jsonl          one JSON object per log / evaluation line; a log line's "loss" is the
                           mean over the "loss_window_steps" steps since the previous one (the
                           progress bar shows each step's own loss, as "step loss")
    loss.png               train and validation loss curves (when matplotlib is installed)

Every file is replaced atomically, so a crash leaves the last complete version of each.

The optimisation follows the paper's recipe (AdamW, betas 0.9/0.98, weight decay 0.05, linear
warm-up then linear decay, gradient clipping at 2.0), scaled to the model at hand.
``batch_size`` is the *global* batch: sequences per optimizer step summed over processes and
accumulation steps, so a run's trajectory does not depend on how many processes share it.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from ..models import RetNet, RetNetConfig, count_parameters
from ..models.checkpoint import atomic_write
from ..ops import matmul
from ..ops.cpu.memory import cached_cpu_memory
from . import distributed as dist_utils
from . import rundir
from .checkpoint import (
    CHECKPOINT_NAME,
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

# The pieces of a run, each in its own module; imported here by name so that every name keeps
# working from this module, where it used to live.
from .config import (
    DOC_BOUNDARIES,
    LOGGERS,
    PRECISIONS,
    PREPARED_DIR,
    PREPARED_EVAL_WINDOWS,
    RUN_FILES,
    SCHEDULES,
    TRAIN_CONFIG_NAME,
    TrainConfig,
    TrainingError,
    TrainResult,
)
from .corpus import (
    Corpus,
    adopt_staged_data,
    build_tokenizer,
    discard_staged_data,
    load_corpus,
    load_data,
)
from .data import ByteTokenizer, HFTokenizer, StreamDecoder, WindowSampler
from .evaluation import autocast_context, bits_per_byte, eval_window_index, evaluate, lm_loss
from .loggers import Loggers, memory_figures, model_flops_per_token
from .optim import build_optimizer, lr_factor
from .progress import ProgressBar, plot_losses, write_metrics
from .resolve import build_model_config, check_run, resolve_config

__all__ = [
    "DOC_BOUNDARIES", "LOGGERS", "PRECISIONS", "PREPARED_DIR", "PREPARED_EVAL_WINDOWS", "RUN_FILES",
    "SCHEDULES", "TRAIN_CONFIG_NAME", "Corpus", "TrainConfig", "TrainResult", "TrainingError",
    "adopt_staged_data", "autocast_context", "bits_per_byte", "build_model_config", "build_optimizer",
    "build_tokenizer", "discard_staged_data", "eval_window_index", "evaluate", "lm_loss", "load_corpus", "load_data",
    "lr_factor", "resolve_config", "train",
]


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handler)
        try:
            yield
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)



def train(config: TrainConfig, resume: bool = False, stream: TextIO | None = None) -> TrainResult:
    """Run (or continue) the training described by ``config``; see the module docstring.

    ``config`` should come from :func:`resolve_config`, which has checked the output directory.
    Raises :class:`TrainingError` for bad input, before anything is written. The directory is
    locked for the run's life, and a run replacing another (``--overwrite``) that fails before its
    first checkpoint puts the old run back (:mod:`.rundir`).
    """
    out = Path(config.out)
    with rundir.hold(out):
        try:
            return _train(config, resume, stream)
        except BaseException:
            if rundir.is_main():
                rundir.abandon(out, RUN_FILES)
            raise


def _train(config: TrainConfig, resume: bool, stream: TextIO | None) -> TrainResult:
    config.validate()
    stream = stream if stream is not None else sys.stdout
    started = time.perf_counter()
    info, device = dist_utils.init_distributed(config.device)

    def say(text: str) -> None:
        if info.is_main:
            stream.write(text + "\n")
            stream.flush()

    if config.batch_size % (info.world_size * config.grad_accum):
        raise TrainingError(
            f"--batch-size {config.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({info.world_size}) times --grad-accum ({config.grad_accum})"
        )
    micro_batch = config.batch_size // (info.world_size * config.grad_accum)
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("--precision bf16: this GPU does not support bfloat16")

    corpus, tokenizer = load_data(config, info)
    try:
        model_config, checkpoint = check_run(config, corpus, tokenizer, resume, say)
    except BaseException:
        discard_staged_data(corpus, info)
        raise
    out = Path(config.out)

    # ---- everything is checked: from here on the run writes to ``out`` ----
    torch.manual_seed(config.seed)
    model = RetNet(model_config).to(device)
    if config.grad_checkpointing:
        model.gradient_checkpointing_enable()
    train_module = dist_utils.wrap_model(model, info, device, config.fsdp)
    optimizer = build_optimizer(model, config, fused_ok=device.type == "cuda" and not config.fsdp)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    sampler = WindowSampler(corpus.train, config.seq_len, config.seed)
    metrics: list[dict[str, Any]] = []
    step = 0
    elapsed_before = 0.0
    window_before: list[float] = []
    if checkpoint is not None:
        if "sharded" in checkpoint:  # written with torch.distributed.checkpoint, by any number of ranks
            load_sharded(out, str(checkpoint["sharded"]), model, optimizer)
        else:
            load_full_state_dicts(model, optimizer, checkpoint["model"], checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        sampler.load_state_dict(checkpoint["sampler"])
        set_rng_state(checkpoint["rng"])
        metrics = list(checkpoint["metrics"])
        step = int(checkpoint["step"])
        elapsed_before = float(checkpoint.get("elapsed_s", 0.0))
        window_before = [float(x) for x in checkpoint.get("window_losses", [])]
        # The schedule follows this call's --max-steps (a finished run only with --extend-schedule:
        # resolve.check_run).
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(step, config)
        del checkpoint
    forward_module: nn.Module = train_module
    if config.compile:
        if config.fsdp:  # sharded parameters: compile the wrapped module as a whole
            forward_module = torch.compile(train_module)  # type: ignore[assignment]
        else:
            # Each retention layer's chunkwise form (measured faster than compiling the whole
            # model, whose input checks break the graph); evaluation shares it.
            model.compile_chunkwise()

    run_record = {"train": config.to_dict(), "model_config": model_config.to_dict(),
                  "tokenizer": tokenizer.describe(), "data_sha256": corpus.sha256}
    dist_utils.barrier(info)  # every rank has mapped the data before rank 0 moves it
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        note = rundir.recover(out, RUN_FILES)
        if not resume:  # a fresh run must not inherit a stale file: --overwrite keeps them aside
            if rundir.state(out, RUN_FILES, TRAIN_CONFIG_NAME, CHECKPOINT_NAME, ignore=(PREPARED_DIR,)) in ("run", "foreign"):
                rundir.set_aside(out, RUN_FILES)
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        adopt_staged_data(corpus, out)
        for name in RUN_FILES:
            for leftover in out.glob(f".{name}.*.tmp"):  # half-written by a killed run
                leftover.unlink(missing_ok=True)
        if note:
            say(note)
        if not resume:
            remove_stale_sharded(out, None)
        text = json.dumps(run_record, indent=2, sort_keys=True) + "\n"
        atomic_write(out / TRAIN_CONFIG_NAME, lambda tmp: tmp.write_text(text))
        tokenizer.save(out)

    n_params = count_parameters(model_config)
    say(f"retnet train: {corpus.description}")
    say(f"model: preset {config.preset}, d_model {model_config.d_model}, {model_config.num_layers} layers, "
        f"{model_config.num_heads} heads, ffn {model_config.ffn_dim}, vocab {model_config.vocab_size}: "
        f"{n_params / 1e6:.2f}M parameters")
    say(f"training: {config.max_steps} steps x {config.batch_size} sequences x {config.seq_len} tokens, "
        f"lr {config.lr:g}, {config.precision}, device {device}, {info.world_size} process(es)"
        + (", FSDP" if config.fsdp else ", DDP" if info.enabled else "")
        + (f"; resuming at step {step}" if resume else ""))
    say(f"output: {out}")

    reset = config.doc_boundaries == "reset"
    eval_len = min(config.seq_len, len(corpus.val) - 1)
    n_windows = (len(corpus.val) - 1) // eval_len
    cap = config.eval_max_windows or (PREPARED_EVAL_WINDOWS if corpus.prepared else None)
    eval_starts = eval_window_index(n_windows, cap) * eval_len  # spread evenly over the split
    val_windows = corpus.val.windows(eval_starts, eval_len + 1)  # only these are read
    val_resets = corpus.val.resets(eval_starts, eval_len) if reset else None
    val_scored = corpus.val.loss_masks(eval_starts, eval_len + 1) if corpus.val.has_loss_mask else None
    eval_batch = max(1, micro_batch)

    def run_eval() -> tuple[float, float]:
        loss = evaluate(train_module, val_windows, eval_batch, device, config.precision, config.chunk_size, info,
                        val_resets, val_scored)
        bpb = bits_per_byte(loss, corpus.bytes_per_token)
        return loss, bpb

    plot_notes: set[str] = set()  # say "no matplotlib" once, not at every checkpoint

    def save(at_step: int) -> None:
        sharded = None
        if config.sharded_checkpoint:  # each rank writes its shards; only the model is gathered (export)
            sharded = save_sharded(out, at_step, model, optimizer, info.is_main)
            model_state = full_model_state(model)
            states: dict[str, Any] = {"sharded": sharded}
        else:
            model_state, optimizer_state = full_state_dicts(model, optimizer)
            states = {"model": model_state, "optimizer": optimizer_state}
        if info.is_main:
            save_checkpoint(out, {
                "step": at_step, **states,
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(), "rng": rng_state(), "metrics": metrics,
                "elapsed_s": elapsed_before + time.perf_counter() - started, "run": run_record,
                "cpu_matmul": matmul.cpu_backend(), "window_losses": list(window_losses),
            })
            remove_stale_sharded(out, sharded)  # only now is the new checkpoint the valid one
            _save_model(model_state, model_config, out)
            write_metrics(out, metrics)
            rundir.checkpointed(out)  # --overwrite: the replaced run can go now
            note = plot_losses(out, metrics)
            if note and note not in plot_notes:
                say(note)
                plot_notes.add(note)
        dist_utils.barrier(info)

    bar = ProgressBar(config.max_steps, config.log_interval, stream) if info.is_main else None
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_token = model_flops_per_token(model, model_config, config.seq_len)
    loggers = Loggers(config.log_to, out, run_record, resume) if info.is_main and config.log_to else None
    save_interval = config.save_interval or config.eval_interval
    stop_at = config.max_steps if config.stop_after is None else min(config.max_steps, step + config.stop_after)
    losses: list[float] = []
    # The losses since the last log line: a resumed run logs the same means as a straight one.
    window_losses: list[float] = list(window_before)
    stopper = _StopRequest()
    val_loss: float | None = None
    val_bpb: float | None = None
    step_times: list[float] = []
    interrupted = False
    forward_module.train()

    # On CPU, large buffers are reused from step to step instead of being page-faulted in afresh
    # (+10-25% per step at 16k tokens, ops/cpu/memory.py); the cache is freed when the loop ends.
    reuse = cached_cpu_memory() if device.type == "cpu" and config.buffer_cache else contextlib.nullcontext()
    with stopper.installed(), reuse:
        while step < stop_at:
            t0 = time.perf_counter()
            starts = sampler.next_starts(config.batch_size)  # the global batch's offsets ...
            mine = starts[info.rank * config.batch_size // info.world_size:
                          (info.rank + 1) * config.batch_size // info.world_size]
            local = sampler.windows(mine)  # ... of which this rank reads only its own rows
            resets = corpus.train.resets(mine, config.seq_len).split(micro_batch) if reset else None
            scored = (corpus.train.loss_masks(mine, config.seq_len + 1).split(micro_batch)
                      if corpus.train.has_loss_mask else None)
            step_loss = torch.zeros((), device=device)
            for i, micro in enumerate(local.split(micro_batch)):
                last = i == config.grad_accum - 1
                # DDP: all-reduce the gradients once, in the last micro-batch's backward pass.
                no_sync = getattr(train_module, "no_sync", None)
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    with autocast_context(device, config.precision):
                        loss = lm_loss(forward_module, micro.to(device, non_blocking=True), config.chunk_size,
                                       None if resets is None else resets[i].to(device),
                                       None if scored is None else scored[i].to(device))
                        scaled = loss / config.grad_accum
                    scaler.scale(scaled).backward()
                step_loss += scaled.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       config.grad_clip if config.grad_clip > 0 else math.inf)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            with warnings.catch_warnings():
                # fp16: the scaler skips a step whose gradients overflowed, and the scheduler
                # warns that the optimizer did not step; the schedule advancing anyway is intended.
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
                scheduler.step()
            step += 1
            mean_loss = float(dist_utils.all_reduce_mean(step_loss, info))
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the loss became {mean_loss} at step {step}; lower --lr or use fp32")
            losses.append(mean_loss)
            window_losses.append(mean_loss)
            step_times.append(time.perf_counter() - t0)
            recent = step_times[-20:]
            seconds_per_step = sum(recent) / len(recent)
            if bar is not None:
                bar.update(step, mean_loss, tokens_per_step / seconds_per_step, lr,
                           seconds_per_step * (stop_at - step))
            if step % config.log_interval == 0 or step == stop_at:
                tokens_per_s = tokens_per_step / seconds_per_step
                # "loss": the mean over the steps since the previous record (the bar shows each step's).
                record = {"kind": "train", "step": step, "loss": sum(window_losses) / len(window_losses),
                          "loss_window_steps": len(window_losses),
                          "lr": lr, "grad_norm": float(grad_norm), "tokens": step * tokens_per_step,
                          "tokens_per_s": tokens_per_s, "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
                          "elapsed_s": elapsed_before + time.perf_counter() - started, **memory_figures(device)}
                if config.peak_tflops:
                    record["mfu"] = record["model_tflops_per_s"] / (config.peak_tflops * info.world_size)
                metrics.append(record)
                if loggers is not None:
                    loggers.log(record)
                window_losses = []
            if step % config.eval_interval == 0 or step == config.max_steps:
                val_loss, val_bpb = run_eval()
                metrics.append({"kind": "eval", "step": step, "val_loss": val_loss, "val_bpb": val_bpb,
                                "val_ppl": math.exp(min(val_loss, 50.0)),
                                "elapsed_s": elapsed_before + time.perf_counter() - started})
                if loggers is not None:
                    loggers.log(metrics[-1])
                if bar is not None:
                    bar.message(f"eval step {step}: val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.3f}"
                                f" | val bits/byte {val_bpb:.4f}")
            stop_now = dist_utils.broadcast_flag(stopper.requested, info, device)
            if step % save_interval == 0 or step == stop_at or stop_now:
                save(step)
            if stop_now:
                interrupted = True
                say(f"stopped by a signal at step {step}; checkpoint saved: continue with --resume")
                break

    if loggers is not None:
        loggers.close()
    if step < config.max_steps and not interrupted:
        say(f"stopped after {step} of {config.max_steps} steps (--stop-after); continue with --resume")
    sample = None
    if step == config.max_steps and config.sample_tokens > 0 and not interrupted:
        sample = _sample(model, config, out, tokenizer, info, device, say)
    wall = time.perf_counter() - started
    say(f"done: step {step}/{config.max_steps} in {wall:.1f} s"
        + (f"; val loss {val_loss:.4f}, val bits/byte {val_bpb:.4f}" if val_loss is not None and val_bpb is not None else ""))
    dist_utils.barrier(info)
    return TrainResult(step, config.max_steps, val_loss, val_bpb, wall, losses, sample, interrupted)



def _save_model(state: dict[str, Tensor], model_config: RetNetConfig, out: Path) -> None:
    """``save_pretrained`` from a full CPU state dict (the FSDP-safe way: no live module needed)."""
    with torch.device("meta"):
        shell = RetNet(model_config, device="meta")
    shell.load_state_dict(state, assign=True, strict=False)
    shell.save_pretrained(out)


def _sample(model: RetNet, config: TrainConfig, out: Path, tokenizer: ByteTokenizer | HFTokenizer,
            info: dist_utils.DistInfo, device: torch.device, say: Any) -> str | None:
    """Generate a sample from the trained model (rank 0; under FSDP from the saved weights)."""
    if not info.is_main:
        return None
    source = RetNet.from_pretrained(out) if config.fsdp else model
    source.eval()
    prompt_ids = tokenizer.encode(config.sample_prompt) or [0]
    dev = source.device
    generator = torch.Generator(device=dev).manual_seed(config.seed)
    ids = torch.tensor([prompt_ids], device=dev)
    decoder = StreamDecoder(tokenizer)
    pieces = [config.sample_prompt]
    for token in source.stream_generate(ids, config.sample_tokens, do_sample=True,
                                        temperature=config.sample_temperature, top_k=None, top_p=0.95,
                                        generator=generator):
        pieces.append(decoder.push(int(token[0])))
    pieces.append(decoder.flush())
    text = "".join(pieces)
    say(f"--- sample (temperature {config.sample_temperature}, top-p 0.95, prompt {config.sample_prompt!r}) ---")
    say(text)
    say("--- end of sample ---")
    return text
