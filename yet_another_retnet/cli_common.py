"""What every ``retnet`` command shares: the one-line usage error, the parser that raises it,
the help layout, and picking a device and loading a model directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, NoReturn


class UsageError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("retnet").strip()  # "train" for `retnet train`
        raise UsageError(f"{command}: {message}" if command else message)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def _pick_device(name: str | None) -> Any:
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device: {err}") from None
    if device.type == "meta":
        raise UsageError("--device meta holds no data and cannot run a model; choose cpu or cuda")
    if device.type not in ("cpu", "cuda"):  # mps, xpu, ...: torch names them, but nothing here runs there
        raise UsageError(f"--device {name!r} is not supported; choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    return device


def _load_model(directory: str, device: Any, quantize: str | None = None) -> tuple[Any, Any]:
    from .models import RetNet
    from .training.data import load_tokenizer

    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"model directory {directory} does not exist")
    model = RetNet.from_pretrained(path, device=device, quantize=quantize)
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, the model only "
                         f"{model.config.vocab_size}")
    return model, tokenizer
