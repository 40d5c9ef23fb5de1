"""Where a run's metrics go besides ``metrics.jsonl`` / ``metrics.csv``: TensorBoard and Weights &
Biases, both optional extras, and the throughput figures every log line carries.

W&B honours its own environment: ``WANDB_MODE=offline`` logs into the run directory without a
network (``wandb sync`` uploads later).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

import torch

from ..models import RetNetConfig, count_parameters

TENSORBOARD_DIR = "tensorboard"


def model_flops_per_token(config: RetNetConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the usual estimate: ``6 N`` for the
    parameters' products plus the retention products, ``12 * layers * d * w`` with ``w`` the
    tokens each query meets in a chunk (``min(seq_len, chunk_size)``, the attention term of the
    PaLM formula with the chunk in place of the context)."""
    window = min(seq_len, config.chunk_size)
    return 6.0 * count_parameters(config) + 12.0 * config.num_layers * config.d_model * window


def memory_figures(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, the peak allocated."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    figures = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    if device.type == "cuda":
        figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


class Loggers:
    """The loggers named in ``--log-to`` (``tensorboard``, ``wandb``); rank 0 only."""

    def __init__(self, names: str, out: Path, run_config: dict[str, Any], resume: bool) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        chosen = [n for n in names.split(",") if n]
        if "tensorboard" in chosen:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--log-to tensorboard needs the `tensorboard` package: pip install tensorboard") from err
            self._tb = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))
        if "wandb" in chosen:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--log-to wandb needs the `wandb` package: pip install wandb") from err
            self._wandb = wandb.init(project="yet-another-retnet", dir=str(out), config=run_config,
                                     name=out.name, resume="allow" if resume else None)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record (``kind`` train or eval, ``step``, numbers)."""
        kind, step = record.get("kind", "train"), int(record["step"])
        values = {f"{kind}/{k}": float(v) for k, v in record.items()
                  if k not in ("kind", "step") and isinstance(v, int | float)}
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
