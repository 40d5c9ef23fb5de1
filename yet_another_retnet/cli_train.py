"""``retnet train``: its options and the command (the loop itself is training/trainer.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_common import _formatter


def add_parser(sub: Any) -> None:
    from .models import PRESETS, RetNetConfig
    from .training.trainer import PRECISIONS, PREPARED_EVAL_WINDOWS, TrainConfig

    d = TrainConfig()
    chunk = RetNetConfig.from_preset(d.preset).chunk_size
    p = sub.add_parser(
        "train", formatter_class=_formatter, argument_default=argparse.SUPPRESS,
        help="train a RetNet language model",
        description=(
            "Train a RetNet language model. With no arguments: the 'small' preset (3.2M parameters)\n"
            f"on the embedded pydoc corpus with the byte tokenizer: {d.max_steps} steps of {d.batch_size} x {d.seq_len}\n"
            "tokens. How long that takes depends on the machine and its load: the progress bar shows\n"
            "the time left. The first run on a machine also compiles the CPU kernels, once.\n"
            "The progress bar shows each step's own loss ('step loss'); metrics.jsonl logs the mean over the\n"
            "--log-interval steps since its previous line (loss_window_steps says how many).\n"
            "Distributed: torchrun --nproc_per_node=N -m yet_another_retnet train ... (DDP; --fsdp for\n"
            "FSDP2). --batch-size is the global batch, whatever the number of processes."
        ),
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--data", metavar="PATH", help="a text file or a directory of text files (default: the embedded pydoc corpus)")
    g.add_argument("--tokenizer", metavar="JSON", help="a Hugging Face `tokenizers` JSON file (default: UTF-8 bytes)")
    g.add_argument("--out", metavar="DIR", help=f"run directory: model, checkpoint, metrics, plot (default: {d.out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--extend-schedule", action="store_true",
                   help="with --resume on a run that finished: train on to a larger --max-steps, the LR schedule "
                        "stretched to the new horizon (the LR rises again); refused without this flag")
    g.add_argument("--overwrite", action="store_true", help="replace the run in --out instead of refusing")
    g.add_argument("--val-fraction", type=float, metavar="F", help=f"share of the corpus held out for validation (default: {d.val_fraction})")
    g.add_argument("--doc-boundaries", choices=("ignore", "reset"),
                   help="reset: the state and positions restart at each document inside a window (default: ignore)")
    g.add_argument("--data-encoding", metavar="NAME", help="encoding of a plain text --data path; bad bytes are an error (default: utf-8)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: {d.preset})")
    g.add_argument("--d-model", type=int, metavar="N", help="model width (default: the preset's)")
    g.add_argument("--num-layers", type=int, metavar="N", help="decoder layers (default: the preset's)")
    g.add_argument("--num-heads", type=int, metavar="N", help="retention heads (default: the preset's)")
    g.add_argument("--ffn-dim", type=int, metavar="N", help="feed-forward hidden width (default: the preset's)")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout (default: the preset's, 0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, metavar="N", help=f"optimizer steps (default: {d.max_steps})")
    g.add_argument("--seq-len", type=int, metavar="N", help=f"tokens per training sequence (default: {d.seq_len})")
    g.add_argument("--batch-size", type=int, metavar="N", help=f"global batch: sequences per optimizer step (default: {d.batch_size})")
    g.add_argument("--grad-accum", type=int, metavar="N", help=f"micro-batches per step, to save memory (default: {d.grad_accum})")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    g.add_argument("--min-lr-ratio", type=float, metavar="F", help=f"final LR over peak LR (default: {d.min_lr_ratio})")
    g.add_argument("--warmup-steps", type=int, metavar="N", help=f"linear warm-up steps (default: {d.warmup_steps})")
    g.add_argument("--schedule", choices=("linear", "cosine", "wsd"),
                   help="after warm-up: linear or cosine decay, or wsd (stable, then a linear decay over "
                        "--decay-fraction of the steps) (default: linear)")
    g.add_argument("--decay-fraction", type=float, metavar="F", help=f"wsd: share of the steps spent decaying (default: {d.decay_fraction})")
    g.add_argument("--weight-decay", type=float, metavar="F", help=f"AdamW weight decay (default: {d.weight_decay})")
    g.add_argument("--beta1", type=float, metavar="F", help=f"AdamW beta1 (default: {d.beta1})")
    g.add_argument("--beta2", type=float, metavar="F", help=f"AdamW beta2 (default: {d.beta2})")
    g.add_argument("--grad-clip", type=float, metavar="F", help=f"gradient-norm clipping, 0 for none (default: {d.grad_clip})")
    g.add_argument("--seed", type=int, help=f"seed of initialisation, data order and dropout (default: {d.seed})")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--precision", choices=PRECISIONS, help="autocast precision; fp16 adds a gradient scaler (default: fp32)")
    g.add_argument("--chunk-size", type=int, metavar="N", help=f"chunkwise retention with chunks of N tokens for sequences longer than N (default: the model's chunk_size, {chunk})")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each retention layer's chunkwise form (RetNet.compile_chunkwise(); on CPU "
                        "float32 with the C++ kernels built it stays on those kernels); with --fsdp the wrapped model")
    g.add_argument("--no-buffer-cache", dest="buffer_cache", action="store_false",
                   help="CPU: do not reuse large buffers between steps (the cache is faster at long sequences)")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) under torchrun")
    g.add_argument("--sharded-checkpoint", action="store_true",
                   help="save model and optimizer with torch.distributed.checkpoint, each rank its own shards "
                        "(resumable on any number of processes; model.safetensors is still exported)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, metavar="N", help=f"steps per progress line (default: {d.log_interval})")
    g.add_argument("--eval-interval", type=int, metavar="N", help=f"steps between validations and checkpoints (default: {d.eval_interval})")
    g.add_argument("--eval-max-windows", type=int, metavar="N", help="validate on N windows spread evenly over the validation split, the same ones at every "
                        f"evaluation (default: the whole split; prepared data: {PREPARED_EVAL_WINDOWS})")
    g.add_argument("--save-interval", type=int, metavar="N", help="steps between checkpoints (default: --eval-interval)")
    g.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N steps of this call; the schedule still follows --max-steps")
    g.add_argument("--log-to", metavar="NAMES", help="also log to tensorboard and/or wandb (comma-separated; "
                   "WANDB_MODE=offline works without a network); metrics.jsonl and metrics.csv always")
    g.add_argument("--peak-tflops", type=float, metavar="X", help="the device's peak TFLOP/s, to log model-FLOPs utilisation")
    g.add_argument("--sample-prompt", metavar="TEXT", help=f"prompt of the sample printed at the end (default: {d.sample_prompt!r})")
    g.add_argument("--sample-tokens", type=int, metavar="N", help=f"tokens of that sample, 0 for none (default: {d.sample_tokens})")


def cmd_train(args: argparse.Namespace) -> int:
    from .training import rundir
    from .training.trainer import TrainConfig, resolve_config, train

    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "overwrite")}
    resume = bool(getattr(args, "resume", False))
    with rundir.hold(Path(explicit.get("out", TrainConfig.out))):  # one run per directory, checks included
        config = resolve_config(explicit, resume=resume, overwrite=bool(getattr(args, "overwrite", False)))
        result = train(config, resume=resume)
    return 130 if result.interrupted else 0
