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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from ..models import RetNet, count_parameters
from ..models.checkpoint import atomic_write
from ..ops.cpu.memory import cached_cpu_memory
from . import distributed as dist_utils
from . import rundir
from .checkpoint import CHECKPOINT_NAME, remove_stale_sharded

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
from .data import ByteTokenizer, HFTokenizer, StreamDecoder, TokenSource
from .evaluation import autocast_context, bits_per_byte, eval_window_index, evaluate, lm_loss
from .loggers import Loggers, memory_figures, model_flops_per_token
from .optim import build_optimizer, lr_factor
from .progress import ProgressBar
from .resolve import build_model_config, check_run, resolve_config
from .state import Run, TrainState, build_state, nonfinite_hint, save_state

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
    """The run behind :func:`train`, as an outline: check everything, build (or resume) the
    training state, prepare the output directory, step until done, then report.

    Every check comes before the first write to ``out``, so bad input leaves the directory as
    it was. Under ``torchrun`` every rank runs all of it; only the main process writes files and
    talks to the user.
    """
    config.validate()
    stream = stream if stream is not None else sys.stdout
    started = time.perf_counter()
    info, device = dist_utils.init_distributed(config.device)

    def say(text: str) -> None:
        if info.is_main:
            stream.write(text + "\n")
            stream.flush()

    micro_batch = _micro_batch_size(config, info, device)
    corpus, tokenizer = load_data(config, info)
    try:
        model_config, checkpoint = check_run(config, corpus, tokenizer, resume, say)
    except BaseException:
        discard_staged_data(corpus, info)
        raise
    record = {"train": config.to_dict(), "model_config": model_config.to_dict(),
              "tokenizer": tokenizer.describe(), "data_sha256": corpus.sha256}
    run = Run(config, model_config, info, device, Path(config.out), micro_batch, record, say)

    # ---- everything is checked: from here on the run writes to ``out`` ----
    state = build_state(run, corpus.train, checkpoint, started)
    del checkpoint  # its tensors are in the model and optimizer now: do not hold a second copy
    dist_utils.barrier(info)  # every rank has mapped the data before rank 0 moves it
    if info.is_main:
        _prepare_run_dir(run, corpus, tokenizer, resume)
    _announce(run, corpus.description, state.step if resume else None)
    run_eval = _validation(run, corpus, state.train_module)
    interrupted = _train_loop(run, state, corpus.train, run_eval, stream, resume)

    step, val_loss, val_bpb = state.step, state.val_loss, state.val_bpb
    if step < config.max_steps and not interrupted:
        say(f"stopped after {step} of {config.max_steps} steps (--stop-after); continue with --resume")
    sample = None
    if step == config.max_steps and config.sample_tokens > 0 and not interrupted:
        sample = _sample(state.model, config, run.out, tokenizer, info, device, say)
    wall = time.perf_counter() - started
    say(f"done: step {step}/{config.max_steps} in {wall:.1f} s"
        + (f"; val loss {val_loss:.4f}, val bits/byte {val_bpb:.4f}" if val_loss is not None and val_bpb is not None else ""))
    dist_utils.barrier(info)
    return TrainResult(step, config.max_steps, val_loss, val_bpb, wall, state.losses, sample, interrupted)


def _micro_batch_size(config: TrainConfig, info: dist_utils.DistInfo, device: torch.device) -> int:
    """Sequences per forward pass on this rank: ``--batch-size`` is the global batch, so it is
    split over the processes and the accumulation steps, and must divide evenly (checked here,
    before any data is read, like bfloat16 support on the GPU)."""
    if config.batch_size % (info.world_size * config.grad_accum):
        raise TrainingError(
            f"--batch-size {config.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({info.world_size}) times --grad-accum ({config.grad_accum})"
        )
    micro_batch = config.batch_size // (info.world_size * config.grad_accum)
    if config.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("--precision bf16: this GPU does not support bfloat16")
    return micro_batch


def _prepare_run_dir(run: Run, corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer, resume: bool) -> None:
    """Make ``out`` hold this run and nothing stale (the main process, once every rank has read
    the data): finish what a killed run left half done, set a replaced run aside (``--overwrite``:
    it comes back if this run fails before its first checkpoint; half-written files deleted),
    move staged prepared data in, and write the run's settings and tokenizer."""
    out = run.out
    out.mkdir(parents=True, exist_ok=True)
    note = rundir.recover(out, RUN_FILES)
    if not resume:  # a fresh run must not inherit a stale file: --overwrite keeps them aside
        if rundir.state(out, RUN_FILES, TRAIN_CONFIG_NAME, CHECKPOINT_NAME, ignore=(PREPARED_DIR,)) in ("run", "foreign"):
            rundir.set_aside(out, RUN_FILES)
        for name in RUN_FILES:
            rundir.remove(out / name)  # a logger's directory too
    adopt_staged_data(corpus, out)
    if note:
        run.say(note)
    if not resume:
        remove_stale_sharded(out, None)
    text = json.dumps(run.record, indent=2, sort_keys=True) + "\n"
    atomic_write(out / TRAIN_CONFIG_NAME, lambda tmp: tmp.write_text(text))
    tokenizer.save(out)


def _announce(run: Run, data_description: str, resumed_at: int | None) -> None:
    """The banner: what the run trains on, the model, the schedule and where it writes."""
    config, model_config, say = run.config, run.model_config, run.say
    n_params = count_parameters(model_config)
    say(f"retnet train: {data_description}")
    say(f"model: preset {config.preset}, d_model {model_config.d_model}, {model_config.num_layers} layers, "
        f"{model_config.num_heads} heads, ffn {model_config.ffn_dim}, vocab {model_config.vocab_size}: "
        f"{n_params / 1e6:.2f}M parameters")
    say(f"training: {config.max_steps} steps x {config.batch_size} sequences x {config.seq_len} tokens, "
        f"lr {config.lr:g}, {config.precision}, device {run.device}, {run.info.world_size} process(es)"
        + (", FSDP" if config.fsdp else ", DDP" if run.info.enabled else "")
        + (f"; resuming at step {resumed_at}" if resumed_at is not None else ""))
    say(f"output: {run.out}")


def _validation(run: Run, corpus: Corpus, module: nn.Module) -> Callable[[], tuple[float, float]]:
    """The run's evaluation, fixed once: which windows of the validation split it scores (all,
    or ``--eval-max-windows`` of them spread evenly, so every evaluation scores the same ones),
    where documents restart in them and which of their targets count. Only those windows are
    read. Returns a function giving the mean loss (nats per token) and bits per byte."""
    config = run.config
    eval_len = min(config.seq_len, len(corpus.val) - 1)
    n_windows = (len(corpus.val) - 1) // eval_len
    cap = config.eval_max_windows or (PREPARED_EVAL_WINDOWS if corpus.prepared else None)
    eval_starts = eval_window_index(n_windows, cap) * eval_len  # spread evenly over the split
    val_windows = corpus.val.windows(eval_starts, eval_len + 1)  # only these are read
    val_resets = corpus.val.resets(eval_starts, eval_len) if config.doc_boundaries == "reset" else None
    val_scored = corpus.val.loss_masks(eval_starts, eval_len + 1) if corpus.val.has_loss_mask else None
    eval_batch = max(1, run.micro_batch)

    def run_eval() -> tuple[float, float]:
        loss = evaluate(module, val_windows, eval_batch, run.device, config.precision, config.chunk_size, run.info,
                        val_resets, val_scored)
        bpb = bits_per_byte(loss, corpus.bytes_per_token)
        return loss, bpb

    return run_eval


def _train_loop(run: Run, state: TrainState, train_data: TokenSource,
                run_eval: Callable[[], tuple[float, float]], stream: TextIO, resume: bool) -> bool:
    """Step until ``--max-steps`` (or ``--stop-after`` steps more): a log record every
    ``--log-interval`` steps and at the last, an evaluation every ``--eval-interval`` and at
    ``--max-steps``, a checkpoint every ``--save-interval`` and at the last step. SIGINT/SIGTERM
    stop the run after the step under way, with a checkpoint; returns whether that happened."""
    config, info, device = run.config, run.info, run.device
    plot_notes: set[str] = set()  # say "no matplotlib" once, not at every checkpoint
    bar = ProgressBar(config.max_steps, config.log_interval, stream) if info.is_main else None
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_token = model_flops_per_token(state.model, run.model_config, config.seq_len)
    loggers = None
    if info.is_main and config.log_to:  # a resume continues the logs from the checkpoint's step
        loggers = Loggers(config.log_to, run.out, run.record, state.step if resume else None, state.wandb_id)
        state.wandb_id = loggers.wandb_id or state.wandb_id  # saved with each checkpoint
    save_interval = config.save_interval or config.eval_interval
    stop_at = config.max_steps if config.stop_after is None else min(config.max_steps, state.step + config.stop_after)
    stopper = _StopRequest()
    step_times: list[float] = []
    interrupted = False
    state.forward_module.train()

    # On CPU, large buffers are reused from step to step instead of being page-faulted in afresh
    # (+10-25% per step at 16k tokens, ops/cpu/memory.py); the cache is freed when the loop ends.
    reuse = cached_cpu_memory() if device.type == "cpu" and config.buffer_cache else contextlib.nullcontext()
    # The loggers are closed however the loop ends: a failed --overwrite run's directory is put
    # back (rundir.abandon), and no writer of it may go on writing there.
    closing: contextlib.AbstractContextManager[Any] = (
        contextlib.closing(loggers) if loggers is not None else contextlib.nullcontext())
    with stopper.installed(), reuse, closing:
        while state.step < stop_at:
            t0 = time.perf_counter()
            mean_loss, grad_norm, lr = _optimizer_step(run, state, train_data)
            step = state.step
            state.losses.append(mean_loss)
            state.window_losses.append(mean_loss)
            step_times.append(time.perf_counter() - t0)
            recent = step_times[-20:]
            seconds_per_step = sum(recent) / len(recent)
            if bar is not None:
                bar.update(step, mean_loss, tokens_per_step / seconds_per_step, lr,
                           seconds_per_step * (stop_at - step))
            # Not at a --stop-after stop: the unlogged window is saved in the checkpoint, and the
            # resumed run logs it where an uninterrupted run would.
            if step % config.log_interval == 0 or step == config.max_steps:
                state.metrics.append(_train_record(run, state, lr, grad_norm, seconds_per_step, flops_per_token))
                if loggers is not None:
                    loggers.log(state.metrics[-1])
                state.window_losses = []
            if step % config.eval_interval == 0 or step == config.max_steps:
                val_loss, val_bpb = run_eval()
                if not math.isfinite(val_loss):  # neither logged nor saved: the last checkpoint stays good
                    raise FloatingPointError(f"the validation loss became {val_loss} at step {step}; "
                                             f"{nonfinite_hint(config.precision)}")
                state.val_loss, state.val_bpb = val_loss, val_bpb
                state.metrics.append({"kind": "eval", "step": step, "val_loss": val_loss, "val_bpb": val_bpb,
                                      "val_ppl": math.exp(min(val_loss, 50.0)), "elapsed_s": state.elapsed_s()})
                if loggers is not None:
                    loggers.log(state.metrics[-1])
                if bar is not None:
                    bar.message(f"eval step {step}: val loss {val_loss:.4f} | val ppl {math.exp(min(val_loss, 50)):.3f}"
                                f" | val bits/byte {val_bpb:.4f}")
            stop_now = dist_utils.broadcast_flag(stopper.requested, info, device)
            if step % save_interval == 0 or step == stop_at or stop_now:
                save_state(run, state, plot_notes)
            if stop_now:
                interrupted = True
                run.say(f"stopped by a signal at step {step}; checkpoint saved: continue with --resume")
                break
    return interrupted


def _optimizer_step(run: Run, state: TrainState, train_data: TokenSource) -> tuple[float, Tensor, float]:
    """One optimizer step on the next global batch, advancing ``state.step``. Returns the step's
    loss (the mean over every process's rows), the gradient norm before clipping and the
    learning rate the step used; raises ``FloatingPointError`` on a loss that is not finite, and
    (outside fp16, whose scaler skips such steps) on a gradient norm that is not, before the update.

    Every rank draws the same global batch and reads only its own rows, in ``--grad-accum``
    micro-batches whose scaled losses' gradients add up to the batch's.
    """
    config, info, device, micro_batch = run.config, run.info, run.device, run.micro_batch
    sampler, optimizer, scaler = state.sampler, state.optimizer, state.scaler
    starts = sampler.next_starts(config.batch_size)  # the global batch's offsets ...
    mine = starts[info.rank * config.batch_size // info.world_size:
                  (info.rank + 1) * config.batch_size // info.world_size]
    local = sampler.windows(mine)  # ... of which this rank reads only its own rows
    resets = train_data.resets(mine, config.seq_len).split(micro_batch) if config.doc_boundaries == "reset" else None
    scored = (train_data.loss_masks(mine, config.seq_len + 1).split(micro_batch)
              if train_data.has_loss_mask else None)
    step_loss = torch.zeros((), device=device)
    for i, micro in enumerate(local.split(micro_batch)):
        last = i == config.grad_accum - 1
        # DDP: all-reduce the gradients once, in the last micro-batch's backward pass.
        no_sync = getattr(state.train_module, "no_sync", None)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            with autocast_context(device, config.precision):
                loss = lm_loss(state.forward_module, micro.to(device, non_blocking=True), config.chunk_size,
                               None if resets is None else resets[i].to(device),
                               None if scored is None else scored[i].to(device))
                scaled = loss / config.grad_accum
            scaler.scale(scaled).backward()
        step_loss += scaled.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(),
                                               config.grad_clip if config.grad_clip > 0 else math.inf)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
        grad_norm = grad_norm.full_tensor()
    if not scaler.is_enabled() and not bool(torch.isfinite(grad_norm)):
        # Clipping turns an inf norm into NaN gradients and AdamW into NaN weights, while the loss
        # (computed before the update) still looks finite: stop before the update. (The norm is
        # the same on every rank, so all of them stop; fp16's scaler skips such a step instead.)
        raise FloatingPointError(f"the gradient norm became {float(grad_norm)} at step {state.step + 1} "
                                 f"(not applied); {nonfinite_hint(config.precision)}")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    lr = optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():
        # fp16: the scaler skips a step whose gradients overflowed, and the scheduler
        # warns that the optimizer did not step; the schedule advancing anyway is intended.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        state.scheduler.step()
    state.step += 1
    mean_loss = float(dist_utils.all_reduce_mean(step_loss, info))
    if not math.isfinite(mean_loss):
        raise FloatingPointError(f"the loss became {mean_loss} at step {state.step}; {nonfinite_hint(config.precision)}")
    return mean_loss, grad_norm, lr


def _train_record(run: Run, state: TrainState, lr: float, grad_norm: Tensor, seconds_per_step: float,
                  flops_per_token: float) -> dict[str, Any]:
    """The metrics record of a log step. Its "loss" is the mean over the steps since the previous
    record (the progress bar shows each step's own), which is what makes a resumed run's records
    equal those of a run that never stopped; the throughput is over the last 20 steps."""
    config = run.config
    tokens_per_step = config.batch_size * config.seq_len
    tokens_per_s = tokens_per_step / seconds_per_step
    window = state.window_losses
    record: dict[str, Any] = {
        "kind": "train", "step": state.step, "loss": sum(window) / len(window), "loss_window_steps": len(window),
        "lr": lr, "grad_norm": float(grad_norm), "tokens": state.step * tokens_per_step,
        "tokens_per_s": tokens_per_s, "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
        "elapsed_s": state.elapsed_s(), **memory_figures(run.device)}
    if config.peak_tflops:
        record["mfu"] = record["model_tflops_per_s"] / (config.peak_tflops * run.info.world_size)
    return record


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
