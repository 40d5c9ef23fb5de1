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
from torch import nn

from ..models import RetNetConfig

TENSORBOARD_DIR = "tensorboard"
#: Where ``wandb.init(dir=out)`` keeps its files.
WANDB_DIR = "wandb"


def model_flops_per_token(model: nn.Module, config: RetNetConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), counted as ``retnet bench peers-training``
    counts them: ``6`` per weight of every linear layer, plus per layer and head ``3 (2 w dk +
    2 w dv + 4 dk dv)`` for the retention products, ``w`` the chunk a query meets
    (``min(seq_len, chunk_size)``)."""
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    span = min(seq_len, config.chunk_size)
    dk, dv = config.key_head_dim, config.value_head_dim
    chunkwise = seq_len > config.chunk_size
    per_head = 2 * span * dk + 2 * span * dv + (4 * dk * dv if chunkwise else 0)
    return 6.0 * matmul_params + config.num_layers * 3.0 * config.num_heads * per_head


def memory_figures(device: torch.device) -> dict[str, float]:
    """Peak resident memory of this process (MiB) and, on CUDA, the peak allocated."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    figures = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20}
    if device.type == "cuda":
        figures["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


class Loggers:
    """The loggers named in ``--log-to`` (``tensorboard``, ``wandb``); rank 0 only.

    A resumed run (``resumed_step``: the checkpoint's step) continues the same logs: TensorBoard
    purges the events a killed call wrote after that step (they are logged again), and W&B
    continues the run ``wandb_id`` names (saved in the checkpoint: :attr:`wandb_id`) instead of
    starting a new one.
    """

    def __init__(self, names: str, out: Path, run_config: dict[str, Any], resumed_step: int | None = None,
                 wandb_id: str | None = None) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        #: The W&B run's id, for the checkpoint (``None`` without W&B).
        self.wandb_id: str | None = None
        chosen = [n for n in names.split(",") if n]
        if "tensorboard" in chosen:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("--log-to tensorboard needs the `tensorboard` package: pip install tensorboard") from err
            # The checkpoint's step was logged before it was saved; what came after is logged again.
            purge = None if resumed_step is None else resumed_step + 1
            self._tb = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge)
        if "wandb" in chosen:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("--log-to wandb needs the `wandb` package: pip install wandb") from err
            resuming = resumed_step is not None
            self._wandb = wandb.init(project="yet-another-retnet", dir=str(out), config=run_config,
                                     name=out.name, id=wandb_id if resuming else None,
                                     resume="allow" if resuming else None)
            self.wandb_id = str(self._wandb.id)

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
