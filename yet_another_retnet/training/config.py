"""The settings of a ``retnet train`` run: :class:`TrainConfig`, its checks, and the names of a
run directory's files.

``None`` in a field means "the preset's value" or "automatic". ``batch_size`` is the *global*
batch: sequences per optimizer step summed over processes and accumulation steps, so a run's
trajectory does not depend on how many processes share it.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models import PRESETS
from ..models.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from .checkpoint import CHECKPOINT_NAME
from .data import HF_TOKENIZER_FILE, TOKENIZER_CONFIG
from .loggers import TENSORBOARD_DIR, WANDB_DIR
from .progress import METRICS_CSV_NAME, METRICS_NAME, PLOT_NAME

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
#: Files a run writes; ``--overwrite`` removes exactly these and nothing else. The loggers'
#: directories (``--log-to``) are among them, so a replacing run's events never mix with the old's.
RUN_FILES = (TRAIN_CONFIG_NAME, CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_CONFIG, HF_TOKENIZER_FILE,
             CHECKPOINT_NAME, METRICS_NAME, PLOT_NAME, METRICS_CSV_NAME, TENSORBOARD_DIR, WANDB_DIR)
#: The modules each ``--log-to`` logger imports, and the package that provides it.
LOGGER_MODULES = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class TrainingError(ValueError):
    """A user mistake in a training request (bad data, a clash with an existing run, ...)."""


@dataclass
class TrainConfig:
    """Every setting of a training run. ``None`` means "the preset's value" or "automatic".

    The defaults are what ``retnet train`` with no arguments runs: the ``small`` preset (d 256,
    4 layers, 4 heads, FFN 512, ~3.2M parameters) on the embedded pydoc corpus with the byte
    tokenizer: 750 steps of 16 sequences of 256 tokens.
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
    # --resume of a finished run to a larger --max-steps: stretch the LR schedule (refused without).
    extend_schedule: bool = False

    #: Settings that define a run; --resume refuses to change them. (The data, the tokenizer and
    #: the model are compared by content when the checkpoint loads.) ``eval_max_windows`` picks
    #: the validation windows: a change would mix two evaluation sets in one loss curve.
    IDENTITY = ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1",
                "beta2", "grad_clip", "seed", "val_fraction", "doc_boundaries", "schedule", "decay_fraction",
                "eval_max_windows")

    #: Settings --resume may change that compute the same steps with other rounding: the run
    #: continues with a note that it is not bit for bit (a change to or from fp16, whose gradient
    #: scaler state does not carry over, is refused: resolve.py).
    ROUNDING = ("precision", "grad_accum", "chunk_size")

    #: Settings of one invocation, not inherited by --resume (a run started under torchrun
    #: with FSDP may continue in one process, on another device, ...).
    PER_CALL = ("device", "fsdp", "compile", "buffer_cache", "stop_after", "log_to", "sharded_checkpoint",
                "extend_schedule")

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
        chosen = [name for name in self.log_to.split(",") if name]
        unknown = [name for name in chosen if name not in LOGGERS]
        if unknown:
            raise TrainingError(f"--log-to: unknown logger {unknown[0]!r} (choose from {', '.join(LOGGERS)})")
        for name in chosen:  # now, not once the run directory is written
            module, package = LOGGER_MODULES[name]
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise TrainingError(f"--log-to {name} needs the `{package}` package: pip install {package} "
                                    f"({err})") from None
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
        from .distributed import default_device, fsdp2

        if self.fsdp:  # before anything is written: FSDP2 is torch >= 2.4
            try:
                fsdp2()
            except ValueError as err:
                raise TrainingError(str(err)) from None
        if self.precision == "fp16" and not hasattr(torch.amp, "GradScaler"):  # torch 2.2
            on = torch.device(default_device(self.device))
            if on.type != "cuda":
                raise TrainingError(f"--precision fp16 on {on.type} needs torch >= 2.3 (PyTorch 2.2's gradient scaler "
                                    "is CUDA's only); use bf16 or fp32, or upgrade torch")

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

