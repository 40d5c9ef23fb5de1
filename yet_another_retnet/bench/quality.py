"""``retnet bench quality``: RetNet vs a same-size Transformer trained identically on the same bytes.

Both models see the same batches in the same order (the embedded corpus, byte tokens), for the
same number of steps, with the same optimiser and schedule (AdamW with the paper's betas and
weight decay, linear warm-up then linear decay, gradient clipping at 2.0). The Transformer is a
``LlamaForCausalLM`` (RoPE, RMSNorm, gated FFN, SDPA attention) of the RetNet's width, depth and
heads, with its FFN width chosen so that the parameter counts match. Validation loss is measured
on the held-out tail of the corpus at fixed intervals; bits per byte = loss / ln 2 (one token is
one byte).

The training loop here is deliberately small and self-contained (the full trainer lives in
``yet_another_retnet.training``); it is the same loop for both models.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..training.data import ByteTokenizer, default_corpus_text, encode_corpus, split_tokens
from . import common

MODELS = ("retnet", "transformer")
LABELS = {"retnet": "RetNet", "transformer": "Transformer (Llama)"}
COLORS = {"retnet": "tab:red", "transformer": "tab:blue"}


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser(
        "retnet bench quality",
        description="Validation loss of RetNet vs a same-size Transformer (Llama) trained with the "
                    "same data, steps and optimiser on the embedded corpus.",
    )
    common.add_common_args(parser, default_out="bench-results/quality", default_preset="small")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 250)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sequence (default: 256)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    parser.add_argument("--warmup", type=float, default=0.1,
                        help="warm-up steps as a fraction of --steps (default: 0.1)")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=2.0, help="gradient-norm clip (default: 2.0)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--eval-tokens", type=int, default=None,
                        help="validation tokens per evaluation (default: 16384)")
    parser.add_argument("--models", default="retnet,transformer")
    return parser


class _LM(nn.Module):
    """A common face for both models: ``loss(ids)`` = mean next-token cross entropy."""

    def __init__(self, kind: str, model: nn.Module) -> None:
        super().__init__()
        self.kind = kind
        self.model = model

    def loss(self, ids: Tensor) -> Tensor:
        if self.kind == "transformer":
            logits = self.model(ids, use_cache=False).logits
        else:
            logits = self.model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1))


def build_model(kind: str, preset: str, device: torch.device, dtype: torch.dtype, seed: int) -> _LM:
    config = common.retnet_config(preset)
    if kind == "transformer":
        return _LM(kind, common.build_llama(config, device, dtype, seed=seed))
    from ..models.retnet import RetNet

    torch.manual_seed(seed)
    return _LM(kind, RetNet(config, device=device, dtype=dtype))


def lr_at(step: int, steps: int, warmup: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then linear decay to 10% of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (1.0 - 0.9 * frac)


def batches(train: Tensor, steps: int, batch: int, length: int, seed: int) -> list[Tensor]:
    """The training batches, drawn once so that both models see exactly the same ones."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - length, (steps, batch), generator=gen)
    offsets = torch.arange(length)
    return [train[s[:, None] + offsets] for s in starts]


def eval_windows(val: Tensor, length: int, tokens: int) -> Tensor:
    """Non-overlapping validation windows ``(n, length)`` covering up to ``tokens`` tokens."""
    n = max(1, min(len(val) // length, tokens // length))
    return val[: n * length].view(n, length)


@torch.no_grad()
def evaluate(lm: _LM, windows: Tensor, device: torch.device, batch: int) -> float:
    lm.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch].to(device)
        total += float(lm.loss(chunk)) * len(chunk)
    lm.train()
    return total / len(windows)


def train_one(lm: _LM, data: list[Tensor], windows: Tensor, args: argparse.Namespace,
              device: torch.device, eval_every: int, log: Callable[[str], None]) -> dict[str, Any]:
    decay = [p for p in lm.parameters() if p.dim() >= 2]
    no_decay = [p for p in lm.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    steps = len(data)
    warmup = max(1, int(args.warmup * steps))
    curve: list[dict[str, float]] = []
    train_losses: list[float] = []
    start = time.perf_counter()
    lm.train()
    for step, ids in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, args.lr)
        loss = lm.loss(ids.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), args.clip)
        opt.step()
        train_losses.append(float(loss.detach()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = evaluate(lm, windows, device, args.batch)
            curve.append({"step": step + 1, "tokens": (step + 1) * ids.numel(), "val_loss": val,
                          "train_loss": sum(train_losses[-eval_every:]) / len(train_losses[-eval_every:])})
            log(f"[quality] {lm.kind:11s} step {step + 1:5d}/{steps}: train {curve[-1]['train_loss']:.3f}, "
                f"val {val:.3f} ({val / math.log(2):.3f} bits/byte), {time.perf_counter() - start:.0f} s")
    final = curve[-1]["val_loss"]
    return {"model": lm.kind, "parameters": sum(p.numel() for p in lm.parameters()),
            "curve": curve, "final_val_loss": final, "final_bits_per_byte": final / math.log(2),
            "train_seconds": time.perf_counter() - start}


def _plot(runs: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    plt = common.pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for run in runs:
        xs = [p["tokens"] / 1e6 for p in run["curve"]]
        ax.plot(xs, [p["val_loss"] / math.log(2) for p in run["curve"]], marker="o", markersize=3,
                color=COLORS[run["model"]],
                label=f"{LABELS[run['model']]} ({run['parameters'] / 1e6:.2f}M params): "
                      f"{run['final_bits_per_byte']:.3f} bits/byte")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    common.save_figure(fig, out / "quality.png")
    return ["quality.png"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype)
    common.configure_threads(args.threads)
    quick = args.quick
    preset = args.preset if not quick or args.preset != "small" else "tiny"
    args.steps = common.count(args.steps, 12 if quick else 250, "--steps")
    args.batch = common.count(args.batch, 4 if quick else 8, "--batch")
    args.length = common.count(args.length, 64 if quick else 256, "--length")
    eval_every = common.count(args.eval_every, max(1, args.steps // (3 if quick else 10)), "--eval-every")
    eval_tokens = common.count(args.eval_tokens, 2048 if quick else 16384, "--eval-tokens")
    if args.lr <= 0 or not 0 <= args.warmup < 1 or args.clip <= 0:
        raise ValueError("--lr and --clip must be > 0 and --warmup in [0, 1)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise ValueError(f"--models must be a comma-separated subset of {MODELS}, got {args.models!r}")

    tokens = encode_corpus(default_corpus_text(), ByteTokenizer())
    train, val = split_tokens(tokens, 0.05)
    if args.length > len(val):  # one validation window, and training windows, must fit the corpus
        raise common.UsageError(f"--length {args.length} is longer than the held-out corpus "
                                f"({len(val)} tokens); choose --length <= {len(val)}")
    out = common.prepare_out(args.out)
    models = common.without_missing_transformer(models, "training")
    machine = common.machine_info(device)  # before training: its load average is "at start"
    data = batches(train, args.steps, args.batch, args.length, args.seed)
    windows = eval_windows(val, args.length, eval_tokens)
    runs = []
    for kind in models:
        lm = build_model(kind, preset, device, dtype, args.seed)
        runs.append(train_one(lm, data, windows, args, device, eval_every, lambda m: print(m, flush=True)))

    claims: dict[str, Any] = {}
    by = {r["model"]: r for r in runs}
    if "retnet" in by and "transformer" in by:
        a, b = by["retnet"], by["transformer"]
        claims["final_val_loss_ratio"] = {
            "retnet": a["final_val_loss"], "transformer": b["final_val_loss"],
            "ratio": a["final_val_loss"] / b["final_val_loss"],
            "holds": a["final_val_loss"] <= 1.05 * b["final_val_loss"],
        }
        claims["parameter_ratio"] = a["parameters"] / b["parameters"]
    config = common.retnet_config(preset)
    data_out: dict[str, Any] = {
        "benchmark": "quality",
        "command": common.command_line("quality", argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "setup": {"preset": preset, "config": config.to_dict(),
                  "transformer_ffn": common.matched_llama_ffn(config), "dtype": args.dtype,
                  "steps": args.steps, "batch": args.batch, "length": args.length, "lr": args.lr,
                  "warmup_fraction": args.warmup, "weight_decay": args.weight_decay,
                  "clip": args.clip, "betas": [0.9, 0.98], "schedule": "linear warm-up, linear decay to 10%",
                  "train_tokens": len(train), "val_tokens_used": windows.numel(),
                  "tokens_seen": args.steps * args.batch * args.length,
                  "corpus": "pydoc_data.topics (default_corpus_text), byte tokens, last 5% held out"},
        "runs": runs,
        "claims": claims,
    }
    title = (f"preset {preset}, {args.steps} steps x {args.batch} x {args.length} tokens, "
             f"lr {args.lr}, same batches for both")
    data_out["plots"] = _plot(runs, out, title)
    common.write_json(out / "quality.json", data_out)
    rows = [{"model": LABELS[r["model"]], "parameters": r["parameters"],
             "final_val_loss": r["final_val_loss"], "bpb": r["final_bits_per_byte"],
             "seconds": r["train_seconds"]} for r in runs]
    cols = [("model", "model"), ("parameters", "parameters"), ("final_val_loss", "final val loss (nats)"),
            ("bpb", "bits per byte"), ("seconds", "train time (s)")]
    curve_rows = []
    for i, point in enumerate(runs[0]["curve"]):
        row: dict[str, Any] = {"step": point["step"], "tokens": point["tokens"]}
        for r in runs:
            row[r["model"]] = r["curve"][i]["val_loss"]
        curve_rows.append(row)
    curve_cols = [("step", "step"), ("tokens", "tokens")] + [(r["model"], f"{LABELS[r['model']]} val loss") for r in runs]
    common.write_markdown(out / "quality.md", "Quality benchmark", data_out["machine"], data_out["command"],
                          [("Setup", f"{title}; AdamW betas (0.9, 0.98), weight decay {args.weight_decay}, "
                                     f"clip {args.clip}.\n"),
                           ("Final", common.markdown_table(rows, cols)),
                           ("Validation curve", common.markdown_table(curve_rows, curve_cols)),
                           ("Claims", "```json\n" + json.dumps(claims, indent=2) + "\n```\n")])
    print(f"[quality] wrote {out / 'quality.json'}, {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
