"""Quality of weight-only quantization on a trained model: validation loss and next-token top-1
agreement of int8 and int4 against the float model, on held-out text.

    retnet bench quantization --model runs/base        # the run's model, its corpus's validation split
    retnet bench quantization --model DIR --data FILE  # another text's last --val-fraction

The held-out text is the last ``--val-fraction`` of the corpus's tokens, the split ``retnet
train`` validates on (the embedded pydoc corpus unless ``--data`` names a text file or directory),
cut into ``--windows`` non-overlapping windows of ``--seq-len + 1`` tokens. Each method's model is
made from the float one (``quantize_model``) and scored on the same windows: mean next-token
cross-entropy, its ratio to the float model's, and the share of positions where its most likely
next token is the float model's. Targets (issue #28): int8 within 0.5% of the float loss and top-1
agreement >= 99%; int4 within 2% and >= 97%.

Writes ``quantization.json`` and ``quantization.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..models import RetNet
from ..models.quantized import QUANTIZE_METHODS, quantize_model
from . import common

DEFAULT_OUT = "docs/results/quantization"
#: Issue #28's targets: (largest loss ratio - 1, smallest top-1 agreement) by bits.
TARGETS = {8: (0.005, 0.99), 4: (0.02, 0.97)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.parser("retnet bench quantization", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR", help="a trained model directory (float weights)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text file or directory whose held-out split is scored (default: the embedded corpus)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="held-out share at the corpus's end (default: 0.05)")
    p.add_argument("--methods", default="int8,int4,int4-g64", help="comma-separated (default: int8,int4,int4-g64)")
    p.add_argument("--windows", type=int, default=16, help="held-out windows scored (default: 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass (default: 4)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in QUANTIZE_METHODS]
    if bad or not methods:
        p.error(f"--methods: unknown {bad or 'empty list'} (choose from {', '.join(QUANTIZE_METHODS)})")
    args.methods = methods
    for name in ("windows", "seq_len", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0.0 < args.val_fraction < 1.0:
        p.error("--val-fraction must be in (0, 1)")
    return args


def held_out_windows(model_dir: Path, data: str | None, val_fraction: float, windows: int, seq_len: int) -> torch.Tensor:
    """``(n, seq_len + 1)`` token windows from the end of the corpus (n <= ``windows``)."""
    from ..training.data import (
        default_corpus_text,
        encode_corpus,
        load_tokenizer,
        read_text_files,
        split_tokens,
    )

    text = default_corpus_text() if data is None else read_text_files(data)
    _, val = split_tokens(encode_corpus(text, load_tokenizer(model_dir)), val_fraction)
    n = min(windows, (len(val) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"the held-out split has {len(val)} tokens: too few for one window of {seq_len + 1}")
    starts = torch.arange(n) * seq_len
    return val[starts[:, None] + torch.arange(seq_len + 1)]


def score(model: RetNet, windows: torch.Tensor, batch: int) -> tuple[float, torch.Tensor, float]:
    """``(mean next-token loss, argmax predictions (n, seq_len), seconds)`` over ``windows``."""
    losses, preds = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            logits = model(w[:, :-1]).logits.float()
            losses.append(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum"))
            preds.append(logits.argmax(-1))
    total = float(torch.stack(losses).sum()) / (windows.shape[0] * (windows.shape[1] - 1))
    return total, torch.cat(preds), time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = Path(args.model)
    model = RetNet.from_pretrained(model_dir).eval()
    windows = held_out_windows(model_dir, args.data, args.val_fraction, args.windows, args.seq_len)
    result: dict[str, Any] = {
        "machine": common.machine_info(torch.device("cpu")), "model": str(model_dir),
        "config": {k: getattr(model.config, k) for k in ("d_model", "num_layers", "num_heads", "ffn_dim", "vocab_size")},
        "parameters": common.num_parameters(model), "windows": int(windows.shape[0]), "seq_len": args.seq_len,
        "scored_tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "rows": [],
    }
    float_loss, float_pred, seconds = score(model, windows, args.batch)
    result["rows"].append({"method": "float32", "loss": float_loss, "loss_ratio": 1.0, "top1_agreement": 1.0,
                           "seconds": seconds, "pass": True})
    print(json.dumps(result["rows"][-1]), flush=True)
    for method in args.methods:
        quantized = quantize_model(copy.deepcopy(model), method)
        loss, pred, seconds = score(quantized, windows, args.batch)
        agree = float((pred == float_pred).float().mean())
        max_excess, min_agree = TARGETS[8 if method == "int8" else 4]
        result["rows"].append({"method": method, "loss": loss, "loss_ratio": loss / float_loss,
                               "top1_agreement": agree, "seconds": seconds,
                               "target": {"loss_ratio_at_most": 1 + max_excess, "top1_at_least": min_agree},
                               "pass": loss / float_loss <= 1 + max_excess and agree >= min_agree})
        print(json.dumps(result["rows"][-1]), flush=True)
        del quantized
    return result


def markdown(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    c = result["config"]
    lines = ["# Quantization quality", "",
             f"Command: `{command}`", "",
             f"Machine: {common.machine_line(m)}", "",
             f"Model `{result['model']}`: d {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads, "
             f"ffn {c['ffn_dim']}, vocab {c['vocab_size']} ({result['parameters'] / 1e6:,.1f}M parameters). "
             f"Held out: {result['windows']} windows x {result['seq_len']} tokens "
             f"({result['scored_tokens']:,} scored positions).", "",
             "| weights | val loss (nats) | x float | top-1 agreement | target | meets it | seconds |",
             "|---|---:|---:|---:|---|---|---:|"]
    for r in result["rows"]:
        t = r.get("target")
        target = "" if t is None else f"<= {t['loss_ratio_at_most']:.3f}x, >= {t['top1_at_least']:.0%}"
        lines.append(f"| {r['method']} | {r['loss']:.4f} | {r['loss_ratio']:.4f} | {r['top1_agreement']:.2%} | "
                     f"{target} | {'yes' if r['pass'] else 'no'} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = common.prepare_out(args.out)  # an --out that is a file: found before measuring
    command = common.command_line("quantization", argv)
    result = {"command": command, **run(args)}
    text = markdown(result, command)
    common.write_text(out / "quantization.md", text)
    common.write_json(out / "quantization.json", result)
    print(text)
    return 0
