"""What a training run shows and leaves behind: a progress bar, the metrics file, the loss plot."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from ..models.checkpoint import atomic_write

METRICS_NAME = "metrics.jsonl"
METRICS_CSV_NAME = "metrics.csv"
PLOT_NAME = "loss.png"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def format_rate(rate: float) -> str:
    return f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"


class ProgressBar:
    """A one-line progress bar (no tqdm needed).

    On a terminal the line is redrawn in place every update; elsewhere (a log file, a pipe)
    only every ``log_interval`` steps is written, one line each, so logs stay readable.
    """

    def __init__(self, total: int, log_interval: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.log_interval = max(1, log_interval)
        self.stream = stream if stream is not None else sys.stdout
        self.width = width
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open_line = False

    def line(self, step: int, loss: float, tokens_per_s: float, lr: float, eta_s: float) -> str:
        frac = step / self.total if self.total else 1.0
        filled = round(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        digits = len(str(self.total))
        return (f"step {step:>{digits}}/{self.total} [{bar}] {frac:4.0%} | step loss {loss:.4f} | "
                f"{format_rate(tokens_per_s)} tok/s | lr {lr:.2e} | ETA {format_duration(eta_s)}")

    def update(self, step: int, loss: float, tokens_per_s: float, lr: float, eta_s: float) -> None:
        text = self.line(step, loss, tokens_per_s, lr, eta_s)
        commit = step % self.log_interval == 0 or step == self.total
        if self.interactive:
            self.stream.write("\r\033[K" + text + ("\n" if commit else ""))
            self._open_line = not commit
        elif commit:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a full line without garbling the bar."""
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()


def write_metrics(directory: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` (one JSON object per line) and ``metrics.csv`` atomically.

    A value that is not finite (the gradient norm of an fp16 step the scaler skipped) is written
    as ``null``: JSON has no NaN or Infinity, and strict readers reject Python's spelling of them.
    """
    text = "".join(json.dumps(_json_safe(r), sort_keys=True, allow_nan=False) + "\n" for r in records)
    atomic_write(directory / METRICS_NAME, lambda tmp: tmp.write_text(text))
    # The same records as one CSV table (one column per key seen, empty where a record lacks it).
    columns = sorted({k for r in records for k in r}, key=lambda k: (k not in ("kind", "step"), k))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    csv_text = buffer.getvalue()
    atomic_write(directory / METRICS_CSV_NAME, lambda tmp: tmp.write_text(csv_text))


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = directory / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(directory: Path, records: list[dict[str, Any]]) -> str | None:
    """Draw train and validation loss against step into ``loss.png``.

    Returns ``None`` on success, or a note saying why there is no plot (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed; set before pyplot is imported
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss plot (pip install matplotlib)"
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats / token)")
    ax.set_title("RetNet training")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    atomic_write(directory / PLOT_NAME, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return None
