"""The training loop behind ``retnet train``: language modelling on a text corpus.

A run lives in one output directory::

    train_config.json      the run's settings (checked on --resume)
    config.json            the model, in save_pretrained format
    model.safetensors      (RetNet.from_pretrained(directory) loads it)
    tokenizer_config.json  which tokenizer the model reads (plus tokenizer.json for HF ones)
    checkpoint.pt          everything needed to resume bit for bit
    metrics.jsonl          one JSON object per log / evaluation line
    loss.png               train and validation loss curves (when matplotlib is installed)

Every file is replaced atomically, so a crash leaves the last complete version of each.

The optimisation follows the paper's recipe (AdamW, betas 0.9/0.98, weight decay 0.05, linear
warm-up then linear decay, gradient clipping at 2.0), scaled to the model at hand.
``batch_size`` is the *global* batch: sequences per optimizer step summed over processes and
accumulation steps, so a run's trajectory does not depend on how many processes share it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import PRESETS, RetNet, RetNetConfig, count_parameters
from ..models.checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_write
from ..models.config import loads_strict
from ..ops import matmul
from ..ops.memory import cached_cpu_memory
from . import distributed as dist_utils
from . import rundir
from .checkpoint import (
    CHECKPOINT_NAME,
    full_model_state,
    full_state_dicts,
    load_checkpoint,
    load_full_state_dicts,
    load_sharded,
    remove_stale_sharded,
    rng_state,
    save_checkpoint,
    save_sharded,
    set_rng_state,
)
from .data import (
    HF_TOKENIZER_FILE,
    TOKENIZER_CONFIG,
    ByteTokenizer,
    HFTokenizer,
    StreamDecoder,
    TokenSource,
    WindowSampler,
    default_corpus_text,
    encode_corpus,
    read_text_files,
    split_tokens,
)
from .loggers import Loggers, memory_figures, model_flops_per_token
from .progress import (
    METRICS_CSV_NAME,
    METRICS_NAME,
    PLOT_NAME,
    ProgressBar,
    plot_losses,
    write_metrics,
)
from .shards import PreparedData, TensorStream, is_prepared, open_prepared

TRAIN_CONFIG_NAME = "train_config.json"
PRECISIONS = ("fp32", "bf16", "fp16")
DOC_BOUNDARIES = ("ignore", "reset")
SCHEDULES = ("linear", "cosine", "wsd")
LOGGERS = ("tensorboard", "wandb")
#: Where a run keeps the shards it prepared from a plain text --data path.
PREPARED_DIR = "data"
#: Validation windows when the data is prepared and --eval-max-windows is not given (a big
#: corpus's held-out split would otherwise be scored whole at every evaluation).
PREPARED_EVAL_WINDOWS = 128
#: Files a run writes; ``--overwrite`` removes exactly these and nothing else.
RUN_FILES = (TRAIN_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_CONFIG, HF_TOKENIZER_FILE,
             CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, METRICS_CSV_NAME)


class TrainingError(ValueError):
    """A user mistake in a training request (bad data, a clash with an existing run, ...)."""


@dataclass
class TrainConfig:
    """Every setting of a training run. ``None`` means "the preset's value" or "automatic".

    The defaults are what ``retnet train`` with no arguments runs: the ``small`` preset (d 256,
    4 layers, 4 heads, FFN 512, ~3.2M parameters) on the embedded pydoc corpus with the byte
    tokenizer, sized to finish in about 10 minutes on 2 CPU cores.
    """

    out: str = "runs/default"
    data: str | None = None
    tokenizer: str | None = None
    preset: str = "small"
    d_model: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    ffn_dim: int | None = None
    dropout: float | None = None
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 750
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 75
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 2.0
    chunk_size: int | None = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    compile: bool = False
    buffer_cache: bool = True
    fsdp: bool = False
    seed: int = 0
    val_fraction: float = 0.05
    eval_interval: int = 150
    eval_max_windows: int | None = None
    log_interval: int = 10
    save_interval: int | None = None
    stop_after: int | None = None
    device: str | None = None
    sample_prompt: str = "The "
    sample_tokens: int = 400
    sample_temperature: float = 0.8
    # Real corpora (docs/training.md): document boundaries, LR schedule, text encoding, loggers.
    doc_boundaries: str = "ignore"
    schedule: str = "linear"
    decay_fraction: float = 0.2
    data_encoding: str = "utf-8"
    log_to: str = ""
    peak_tflops: float | None = None
    sharded_checkpoint: bool = False

    #: Settings that define a run; --resume refuses to change them.
    #: (The data, the tokenizer and the model are compared by content when the checkpoint loads.)
    IDENTITY = ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1",
                "beta2", "grad_clip", "seed", "val_fraction", "doc_boundaries", "schedule", "decay_fraction")

    #: Settings of one invocation, not inherited by --resume (a run started under torchrun
    #: with FSDP may continue in one process, on another device, ...).
    PER_CALL = ("device", "fsdp", "compile", "buffer_cache", "stop_after", "log_to", "sharded_checkpoint")

    def validate(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval", "log_interval")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        for name in ("d_model", "num_layers", "num_heads", "ffn_dim", "chunk_size", "save_interval",
                     "stop_after", "eval_max_windows"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise TrainingError(f"--{_flag(name)} must be a positive integer, got {value!r}")
        self._validate_types()
        if self.warmup_steps < 0:
            raise TrainingError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainingError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainingError("--weight-decay and --grad-clip must be >= 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise TrainingError("AdamW betas must lie in [0, 1)")
        if self.precision not in PRECISIONS:
            raise TrainingError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.preset not in PRESETS:
            raise TrainingError(f"unknown preset {self.preset!r}; choose from {', '.join(sorted(PRESETS))}")
        if not 0.0 < self.val_fraction < 1.0:
            raise TrainingError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.sample_tokens < 0:
            raise TrainingError(f"--sample-tokens must be >= 0, got {self.sample_tokens}")
        self._validate_corpus_options()

    def _validate_corpus_options(self) -> None:
        if self.doc_boundaries not in DOC_BOUNDARIES:
            raise TrainingError(f"--doc-boundaries must be one of {DOC_BOUNDARIES}, got {self.doc_boundaries!r}")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise TrainingError(f"--decay-fraction must be in (0, 1], got {self.decay_fraction}")
        unknown = [name for name in self.log_to.split(",") if name and name not in LOGGERS]
        if unknown:
            raise TrainingError(f"--log-to: unknown logger {unknown[0]!r} (choose from {', '.join(LOGGERS)})")
        if self.peak_tflops is not None and not (math.isfinite(self.peak_tflops) and self.peak_tflops > 0):
            raise TrainingError(f"--peak-tflops must be a positive number, got {self.peak_tflops}")

    def _validate_types(self) -> None:
        """Every field has its declared type and every number is finite (a hand-edited or damaged
        train_config.json, ``--grad-clip nan``), and the device is one torch knows and can run on."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind.startswith("float"):
                ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            elif kind.startswith("bool"):
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise TrainingError(f"--{_flag(f.name)} must be {'a finite number' if kind.startswith('float') else kind}"
                                    f", got {value!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError as err:
                raise TrainingError(f"--device {self.device!r} is not a device: {err}") from None
            if device.type == "meta":
                raise TrainingError("--device meta holds no data and cannot train; choose cpu or cuda")
            if device.type == "cuda" and not torch.cuda.is_available():
                raise TrainingError(f"--device {self.device}: no CUDA device is available")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class TrainResult:
    """What a run did: steps taken, last validation numbers, the per-step losses of this call."""

    step: int
    max_steps: int
    val_loss: float | None
    val_bpb: float | None
    wall_time_s: float
    losses: list[float] = field(default_factory=list)
    sample: str | None = None
    interrupted: bool = False


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    train: TokenSource
    val: TokenSource
    bytes_per_token: float  # of the validation text, to turn nats/token into bits/byte
    sha256: str
    description: str
    prepared: bool = False
    staged: Path | None = None  # prepared beside --out, moved into it when the run starts


def build_tokenizer(spec: str | None) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if spec is None else HFTokenizer(spec)


def load_corpus(data: str | None, tokenizer: ByteTokenizer | HFTokenizer, seq_len: int,
                val_fraction: float) -> Corpus:
    """Read, tokenize and split the corpus; ``TrainingError`` if it cannot make one sequence."""
    try:
        text = default_corpus_text() if data is None else read_text_files(data)
    except (FileNotFoundError, ValueError) as err:
        raise TrainingError(str(err)) from err
    tokens = encode_corpus(text, tokenizer)
    where = "the default corpus" if data is None else f"data path {data}"
    if len(tokens) < 2 * (seq_len + 1):
        raise TrainingError(
            f"{where} has {len(tokens)} tokens, too few for a training and a validation sequence of "
            f"seq_len {seq_len} (need at least {2 * (seq_len + 1)}); lower --seq-len or add text"
        )
    train, val = split_tokens(tokens, val_fraction)
    val_bytes = len(tokenizer.decode(val).encode("utf-8"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    description = f"{where}: {len(text.encode('utf-8')):,} bytes, {len(train):,} train / {len(val):,} val tokens"
    return _checked_corpus(Corpus(TensorStream(train), TensorStream(val), val_bytes / len(val), digest, description),
                           where, seq_len)


def _checked_corpus(corpus: Corpus, where: str, seq_len: int) -> Corpus:
    train, val = corpus.train, corpus.val
    if len(val) < 2:
        raise TrainingError(f"{where}: the validation split is empty; raise --val-fraction")
    if len(train) < seq_len + 1:
        raise TrainingError(
            f"{where}: the training split has {len(train)} tokens, fewer than one sequence of {seq_len + 1}"
        )
    return corpus


def load_data(config: TrainConfig, info: dist_utils.DistInfo | None = None) -> tuple[Corpus, ByteTokenizer | HFTokenizer]:
    """The run's corpus and tokenizer.

    No ``--data``: the embedded corpus as one in-memory byte stream (the default run, as ever).
    A directory written by ``retnet prepare``: its shards through memory maps, and the tokenizer
    it was prepared with. A text file or directory: prepared first (by rank 0 under torchrun) by
    the same code, into ``<out>/data`` when that already holds it (reused while the text is
    unchanged), else into a staging directory beside ``--out`` that the run moves into place once
    every check has passed (:func:`adopt_staged_data`); a failed check removes it.
    """
    info = info or dist_utils.DistInfo()
    if config.data is None:
        tokenizer = build_tokenizer(config.tokenizer)
        return load_corpus(None, tokenizer, config.seq_len, config.val_fraction), tokenizer
    source = Path(config.data)
    directory = source
    staged = None
    if not is_prepared(source):
        if not source.exists():
            raise TrainingError(f"data path {source} does not exist")
        out = Path(config.out)
        directory = out / PREPARED_DIR
        if not is_prepared(directory):
            directory = staged = out.parent / f".{out.name}.{PREPARED_DIR}-staged"
        if info.is_main:
            _prepare_on_the_fly(config, directory, staged is not None)
        dist_utils.barrier(info)
    try:
        try:
            data = open_prepared(directory)
        except ValueError as err:
            raise TrainingError(str(err)) from err
        tokenizer = _prepared_tokenizer(data, config.tokenizer if directory is source else None)
        if directory is not source and config.tokenizer is not None:
            # Prepared here from the user's file: keep reading that (the staged copy will move).
            tokenizer = HFTokenizer(config.tokenizer)
        where = f"data path {config.data}"
        index = data.index
        val_bytes = data.split_bytes("val")
        fingerprint = f"{index['source_fingerprint']}:{index['tokenizer'].get('sha256')}"
        description = (f"{where}: {index['text_bytes']:,} bytes in {index['documents']:,} documents, "
                       f"{len(data.train):,} train / {len(data.val):,} val tokens (memory-mapped {index['dtype']} shards)")
        corpus = Corpus(data.train, data.val, max(val_bytes, 1) / max(len(data.val), 1), fingerprint, description,
                        prepared=True, staged=staged)
        if len(data.train) + len(data.val) < 2 * (config.seq_len + 1):
            raise TrainingError(
                f"{where} has {len(data.train) + len(data.val)} tokens, too few for a training and a validation "
                f"sequence of seq_len {config.seq_len} (need at least {2 * (config.seq_len + 1)}); lower --seq-len or add text")
        return _checked_corpus(corpus, where, config.seq_len), tokenizer
    except BaseException:
        if staged is not None and info.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        raise


def discard_staged_data(corpus: Corpus, info: dist_utils.DistInfo) -> None:
    """Remove data prepared for a run that is not going to start."""
    if corpus.staged is not None and info.is_main:
        shutil.rmtree(corpus.staged, ignore_errors=True)


def adopt_staged_data(corpus: Corpus, out: Path) -> None:
    """Move data prepared beside the run directory into it (rank 0, once the run starts writing;
    the memory maps stay valid: a rename moves no data)."""
    if corpus.staged is None:
        return
    target = out / PREPARED_DIR
    if target.exists():
        shutil.rmtree(target)
    corpus.staged.replace(target)
    corpus.staged = None


def _prepare_on_the_fly(config: TrainConfig, directory: Path, fresh: bool) -> None:
    """``retnet prepare`` of a plain text --data path into ``directory`` (nothing left on failure)."""
    from .prepare import prepare

    try:
        prepare([str(config.data)], directory, tokenizer=config.tokenizer, val_fraction=config.val_fraction,
                encoding=config.data_encoding, overwrite=True)
    except BaseException as err:
        if fresh:
            shutil.rmtree(directory, ignore_errors=True)
        if isinstance(err, ValueError):
            raise TrainingError(str(err)) from err
        raise


def _prepared_tokenizer(data: PreparedData, requested: str | None) -> ByteTokenizer | HFTokenizer:
    """The tokenizer ``data`` was prepared with; a different ``--tokenizer`` is refused."""
    info = data.tokenizer_info
    if info.get("type") == "byte":
        tokenizer: ByteTokenizer | HFTokenizer = ByteTokenizer(end_of_document=info.get("eod_id") == 256)
        own = "the byte tokenizer"
    else:
        tokenizer = HFTokenizer(data.path / str(info.get("file", HF_TOKENIZER_FILE)))
        own = f"the tokenizer in {data.path}"
    if tokenizer.vocab_size != int(info.get("vocab_size", -1)):
        raise TrainingError(f"prepared data {data.path}: its tokenizer does not match its index")
    if requested is not None:
        digest = hashlib.sha256(Path(requested).read_bytes()).hexdigest() if Path(requested).is_file() else None
        if digest != info.get("sha256"):
            raise TrainingError(f"--tokenizer {requested} differs from {own}, which prepared {data.path}; "
                                f"drop --tokenizer or prepare the data again with it")
    return tokenizer


# --------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------


def resolve_config(explicit: dict[str, Any], resume: bool = False, overwrite: bool = False) -> TrainConfig:
    """The run's settings: defaults, then the saved run's (on resume), then what the user gave.

    Checks the output directory before anything is written: a directory that already holds a
    run needs ``resume`` or ``overwrite``; ``resume`` needs a checkpoint and must not change a
    setting in :attr:`TrainConfig.IDENTITY`.
    """
    defaults = TrainConfig()
    out = Path(explicit.get("out", defaults.out))
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} exists and is not a directory")
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite exclude each other")
    with rundir.hold(out):  # no other process may change the directory while it is checked
        note = rundir.recover(out, RUN_FILES) if rundir.is_main() else None
        if note:
            rundir.note(note)
        return _resolve_config(out, explicit, defaults, resume, overwrite)


def _resolve_config(out: Path, explicit: dict[str, Any], defaults: TrainConfig, resume: bool,
                    overwrite: bool) -> TrainConfig:
    saved_path = out / TRAIN_CONFIG_NAME
    found = rundir.state(out, RUN_FILES, TRAIN_CONFIG_NAME, CHECKPOINT_NAME, ignore=(PREPARED_DIR,))
    if resume:
        if found == "unfinished":
            raise TrainingError(f"--resume: the run in {out} stopped before its first checkpoint, so there is "
                                f"nothing to resume; run the same command without --resume to start it over")
        if not (out / CHECKPOINT_NAME).is_file() or not saved_path.is_file():
            raise TrainingError(f"--resume: nothing to resume in {out} (no {CHECKPOINT_NAME})")
        try:
            saved = loads_strict(saved_path.read_bytes(), str(saved_path))["train"]
            if not isinstance(saved, dict):
                raise TypeError(f"'train' is a {type(saved).__name__}, not an object")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TrainingError(f"--resume: {saved_path} is unreadable: {err}") from err
        for name in TrainConfig.IDENTITY:
            if name in explicit and explicit[name] != saved.get(name):
                raise TrainingError(
                    f"--{_flag(name)} {explicit[name]} differs from the run in {out} ({saved.get(name)}); "
                    f"a resumed run keeps its settings: drop the flag or choose another --out"
                )
        inherited = {k: v for k, v in saved.items() if k not in TrainConfig.PER_CALL}
        try:
            config = TrainConfig.from_dict({**defaults.to_dict(), **inherited, **explicit})
        except TypeError as err:
            raise TrainingError(f"--resume: {saved_path} is unreadable: {err}") from err
    else:
        if found == "foreign" and not overwrite:
            raise TrainingError(f"--out {out} is not empty and holds no training run; choose an empty or new directory")
        if found == "run" and not overwrite:
            raise TrainingError(
                f"--out {out} already holds a training run: pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --out"
            )
        config = TrainConfig.from_dict({**defaults.to_dict(), **explicit})
    config.out = str(out)
    config.validate()
    return config


def build_model_config(config: TrainConfig, vocab_size: int) -> RetNetConfig:
    overrides: dict[str, Any] = {"vocab_size": vocab_size}
    for name in ("d_model", "num_layers", "num_heads", "ffn_dim", "dropout"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    try:
        return RetNetConfig.from_preset(config.preset, **overrides)
    except ValueError as err:
        raise TrainingError(f"invalid model size: {err}") from err


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------


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


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    return loss / math.log(2) / bytes_per_token


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


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


def _check_run(config: TrainConfig, corpus: Corpus, tokenizer: ByteTokenizer | HFTokenizer,
               resume: bool, say: Callable[[str], None]) -> tuple[RetNetConfig, dict[str, Any] | None]:
    """The model configuration and, on ``resume``, the checkpoint, once it agrees with this call."""
    model_config = build_model_config(config, tokenizer.vocab_size)
    out = Path(config.out)
    checkpoint: dict[str, Any] | None = None
    if resume:
        checkpoint = load_checkpoint(out)
        saved = checkpoint.get("run", {})
        if saved.get("data_sha256") != corpus.sha256:
            raise TrainingError(f"--resume: the training data differs from the data of the run in {out}")
        if saved.get("model_config") != model_config.to_dict():
            raise TrainingError(f"--resume: the model configuration differs from the run in {out}")
        if _tokenizer_identity(saved.get("tokenizer", {})) != _tokenizer_identity(tokenizer.describe()):
            raise TrainingError(f"--resume: the tokenizer differs from the one of the run in {out}")
        if checkpoint["step"] >= config.max_steps:
            raise TrainingError(
                f"--resume: the run in {out} already reached step {checkpoint['step']} of --max-steps "
                f"{config.max_steps}; raise --max-steps to train further"
            )
        saved_backend = checkpoint.get("cpu_matmul")  # the products' rounding, as before the stop
        if saved_backend in matmul.BACKENDS and matmul.pin_cpu_backend(saved_backend) != saved_backend:
            say(f"note: the run used the {saved_backend} matmul backend, this call {matmul.cpu_backend()} "
                f"({matmul.ENV}): it continues, but not bit for bit")
    return model_config, checkpoint


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
        model_config, checkpoint = _check_run(config, corpus, tokenizer, resume, say)
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
        # The schedule follows this call's --max-steps (a resumed run may be extended).
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
    eval_starts = torch.arange(n_windows if cap is None else min(n_windows, cap)) * eval_len
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
    # (+10-25% per step at 16k tokens, ops/memory.py); the cache is freed when the loop ends.
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
                record = {"kind": "train", "step": step, "loss": sum(window_losses) / len(window_losses),
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


def _tokenizer_identity(described: dict[str, Any]) -> tuple[Any, Any]:
    return described.get("type"), described.get("vocab_size")


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
