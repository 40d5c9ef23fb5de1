"""The ``retnet`` command line: train, prepare, generate, eval, info, bench, convert, quantize, chat
and serve.

``retnet train`` with no arguments trains a small RetNet on the embedded corpus (about 10
minutes on 2 CPU cores). Run ``retnet <command> --help`` for each command's options. A user
mistake prints one line, ``retnet: error: ...``, and exits with status 2; set
``RETNET_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

BENCHMARKS = ("ops", "inference", "training", "quality", "peers", "data", "cpu_inference", "quantization")


class UsageError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("retnet").strip()  # "train" for `retnet train`
        raise UsageError(f"{command}: {message}" if command else message)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _add_train(sub: Any) -> None:
    from .models import PRESETS
    from .training.trainer import PRECISIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", formatter_class=_formatter, argument_default=argparse.SUPPRESS,
        help="train a RetNet language model",
        description=(
            "Train a RetNet language model. With no arguments: the 'small' preset (3.2M parameters)\n"
            "on the embedded pydoc corpus with the byte tokenizer, ~10 minutes on 2 CPU cores.\n"
            "Distributed: torchrun --nproc_per_node=N -m yet_another_retnet train ... (DDP; --fsdp for\n"
            "FSDP2). --batch-size is the global batch, whatever the number of processes."
        ),
    )
    g = p.add_argument_group("data and output")
    g.add_argument("--data", metavar="PATH", help="a text file or a directory of text files (default: the embedded pydoc corpus)")
    g.add_argument("--tokenizer", metavar="JSON", help="a Hugging Face `tokenizers` JSON file (default: UTF-8 bytes)")
    g.add_argument("--out", metavar="DIR", help=f"run directory: model, checkpoint, metrics, plot (default: {d.out})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
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
    g.add_argument("--chunk-size", type=int, metavar="N", help="chunkwise retention with chunks of N tokens for sequences longer than N (default: the model's, 512)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute each layer in the backward pass")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--no-buffer-cache", dest="buffer_cache", action="store_false",
                   help="CPU: do not reuse large buffers between steps (the cache is faster at long sequences)")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) under torchrun")
    g.add_argument("--sharded-checkpoint", action="store_true",
                   help="save model and optimizer with torch.distributed.checkpoint, each rank its own shards "
                        "(resumable on any number of processes; model.safetensors is still exported)")
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, metavar="N", help=f"steps per progress line (default: {d.log_interval})")
    g.add_argument("--eval-interval", type=int, metavar="N", help=f"steps between validations and checkpoints (default: {d.eval_interval})")
    g.add_argument("--eval-max-windows", type=int, metavar="N", help="validate on at most N sequences (default: the whole split)")
    g.add_argument("--save-interval", type=int, metavar="N", help="steps between checkpoints (default: --eval-interval)")
    g.add_argument("--stop-after", type=int, metavar="N", help="stop (with a checkpoint) after N steps of this call; the schedule still follows --max-steps")
    g.add_argument("--log-to", metavar="NAMES", help="also log to tensorboard and/or wandb (comma-separated; "
                   "WANDB_MODE=offline works without a network); metrics.jsonl and metrics.csv always")
    g.add_argument("--peak-tflops", type=float, metavar="X", help="the device's peak TFLOP/s, to log model-FLOPs utilisation")
    g.add_argument("--sample-prompt", metavar="TEXT", help=f"prompt of the sample printed at the end (default: {d.sample_prompt!r})")
    g.add_argument("--sample-tokens", type=int, metavar="N", help=f"tokens of that sample, 0 for none (default: {d.sample_tokens})")


def _add_prepare(sub: Any) -> None:
    from .training.prepare import add_arguments

    p = sub.add_parser("prepare", formatter_class=_formatter, help="tokenize a corpus into memory-mapped shards",
                       description="Tokenize text files, directories, .jsonl, .parquet or a datasets directory into\n"
                                   "token shards that `retnet train --data DIR` reads through memory maps.")
    add_arguments(p)


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", formatter_class=_formatter, help="generate text from a trained model",
                       description="Stream text from a model directory (written by `retnet train` or save_pretrained).")
    p.add_argument("model", metavar="DIR", help="model directory")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a newline token)")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens to generate (default: 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 for greedy decoding (default: 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely tokens")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="cast the weights (default: as saved); bfloat16 decodes ~1.5x faster on CPUs with AVX512-BF16")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (first token waits for the compiler; faster after)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="int8 weights (per output channel) for the projections and head: ~4x fewer bytes a token; "
                        "int4: 4-bit weights with a scale per group of 128 inputs (int4-gN: groups of N), ~7x fewer")


#: ``--quantize`` methods: models/quantized.py's QUANTIZE_METHODS (kept here so --help needs no torch).
QUANTIZE_CHOICES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g256")


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", formatter_class=_formatter, help="loss, perplexity and bits per byte of a model",
                       description="Evaluate a model directory on text: loss (nats/token), perplexity, bits per byte.\n"
                                   "Without --data: the validation split of the embedded corpus.")
    p.add_argument("model", metavar="DIR", help="model directory")
    p.add_argument("--data", metavar="PATH", default=None, help="a text file or directory to evaluate on (all of it), or prepared data (its validation split)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per window (default: the training run's, else 512)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    p.add_argument("--max-windows", type=int, default=None, metavar="N", help="evaluate at most N windows")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision (default: fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    # lm-evaluation-harness instead (yet_another_retnet/harness.py; extra [eval]).
    g = p.add_argument_group("lm-evaluation-harness tasks instead (pip install 'yet-another-retnet[eval]')")
    g.add_argument("--tasks", metavar="LIST", default=None, help="comma-separated lm-eval tasks or groups")
    g.add_argument("--include-path", metavar="DIR", default=None, help="a directory of your own task YAML files")
    g.add_argument("--num-fewshot", type=int, default=None, metavar="N", help="few-shot examples per task")
    g.add_argument("--limit", type=float, default=None, metavar="N", help="at most N documents per task (a fraction if < 1)")
    g.add_argument("--output", metavar="FILE", default=None, help="also write the results to FILE as JSON")


def _add_info(sub: Any) -> None:
    from .models import PRESETS

    p = sub.add_parser("info", formatter_class=_formatter, help="configuration and parameter count",
                       description="Print a model's configuration and parameter count (big presets are counted\n"
                                   "on the meta device: nothing is allocated).")
    p.add_argument("model", metavar="DIR", nargs="?", default=None, help="model directory")
    p.add_argument("--preset", default=None, help=f"a preset instead of a directory: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", formatter_class=_formatter, help="run a benchmark", add_help=True,
                       description="Run a benchmark: retnet bench NAME [args...]; `retnet bench NAME --help` for its options.\n"
                                   f"NAME: {', '.join(BENCHMARKS)}.")
    p.add_argument("name", choices=BENCHMARKS, help="benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="retnet", formatter_class=_formatter,
                     description="RetNet (Retentive Networks): train, generate, evaluate, inspect, benchmark.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"yet-another-retnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_prepare(sub)
    _add_generate(sub)
    _add_eval(sub)
    _add_info(sub)
    _add_bench(sub)
    from .cli_convert import add_parser as _add_convert

    _add_convert(sub, _formatter)
    from .serve.commands import add_commands  # quantize, chat, serve

    add_commands(sub, _formatter)
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from .training import rundir
    from .training.trainer import TrainConfig, resolve_config, train

    explicit = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "overwrite")}
    resume = bool(getattr(args, "resume", False))
    with rundir.hold(Path(explicit.get("out", TrainConfig.out))):  # one run per directory, checks included
        config = resolve_config(explicit, resume=resume, overwrite=bool(getattr(args, "overwrite", False)))
        result = train(config, resume=resume)
    return 130 if result.interrupted else 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .training.prepare import run

    return run(args)


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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .training.data import StreamDecoder

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    device = _pick_device(args.device)
    model, tokenizer = _load_model(args.model, device, args.quantize)
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    if args.compile:
        import shutil

        compilers = [os.environ.get("CXX") or "", "c++", "g++", "clang++"]
        if device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
            raise UsageError("--compile on CPU needs a C++ compiler (c++, g++ or clang++; or $CXX), and none was "
                             "found; drop --compile")
        model.compile_decode()
    ids = tokenizer.encode(args.prompt)
    if getattr(tokenizer, "add_bos", False):  # a pretrained model's prompts start with <s>
        ids = [tokenizer.bos_token_id, *ids]
    ids = ids or tokenizer.encode("\n") or [0]
    eos = getattr(tokenizer, "eos_token_id", None)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    greedy = args.temperature == 0
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    decoder = StreamDecoder(tokenizer)
    stream = model.stream_generate(
        torch.tensor([ids], device=device), args.max_new_tokens, do_sample=not greedy,
        temperature=1.0 if greedy else args.temperature, top_k=args.top_k,
        top_p=None if greedy else args.top_p, generator=generator,
        eos_token_id=eos,
    )
    for token in stream:
        if eos is not None and int(token[0]) == eos:
            break
        piece = decoder.push(int(token[0]))
        if piece:
            out.write(piece)
            out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .training.data import (
        default_corpus_text,
        encode_corpus,
        eval_windows,
        read_text_files,
        split_tokens,
    )
    from .training.trainer import TRAIN_CONFIG_NAME, bits_per_byte, evaluate

    for name in ("batch_size", "seq_len", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    device = _pick_device(args.device)
    if args.tasks is not None:
        from .harness import cmd_tasks

        return cmd_tasks(args, *_load_model(args.model, device))
    model, tokenizer = _load_model(args.model, device)
    seq_len, val_fraction = args.seq_len, 0.05
    run_file = Path(args.model) / TRAIN_CONFIG_NAME
    if run_file.is_file():
        from .models.config import loads_strict

        record = loads_strict(run_file.read_bytes(), str(run_file))
        saved = record.get("train", {}) if isinstance(record, dict) else None
        if not isinstance(saved, dict):
            raise UsageError(f"{run_file} is not a training run's record (no 'train' object)")
        seq_len = seq_len or saved.get("seq_len")
        val_fraction = saved.get("val_fraction", val_fraction)
        if isinstance(seq_len, bool) or not isinstance(seq_len, int | None) or (seq_len is not None and seq_len < 1):
            raise UsageError(f"{run_file}: seq_len must be a positive integer, got {seq_len!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 < val_fraction < 1:
            raise UsageError(f"{run_file}: val_fraction must be a number in (0, 1), got {val_fraction!r}")
    seq_len = seq_len or 512
    from .training.shards import is_prepared, open_prepared

    if args.data is not None and is_prepared(args.data):
        # Prepared shards: their validation split, read through the memory map window by window.
        val = open_prepared(args.data).val
        if len(val) < 2:
            raise UsageError(f"{args.data}: the validation split has fewer than 2 tokens")
        length = min(seq_len, len(val) - 1)
        count = (len(val) - 1) // length
        if args.max_windows is not None:
            count = min(count, args.max_windows)
        windows = val.windows(torch.arange(count) * length, length + 1)
        bytes_per_token = open_prepared(args.data).split_bytes("val") / len(val)
        source = f"{args.data} (validation split)"
    else:
        if args.data is None:
            _, tokens = split_tokens(encode_corpus(default_corpus_text(), tokenizer), val_fraction)
            source = "the default corpus's validation split"
        else:
            tokens = encode_corpus(read_text_files(args.data), tokenizer)
            source = args.data
        if len(tokens) < 2:
            raise UsageError(f"{source} has fewer than 2 tokens: nothing to evaluate")
        windows = eval_windows(tokens, min(seq_len, len(tokens) - 1))
        if args.max_windows is not None:
            windows = windows[:args.max_windows]
        bytes_per_token = len(tokenizer.decode(tokens).encode("utf-8")) / len(tokens)
    loss = evaluate(model, windows, args.batch_size, device, args.precision)
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    bpb = bits_per_byte(loss, bytes_per_token)
    result = {"data": source, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1] - 1),
              "tokens": int(n_tokens), "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
              "bits_per_byte": bpb}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"data: {source} ({result['windows']} windows of {result['seq_len']} tokens, {n_tokens:,} tokens scored)")
        print(f"loss {loss:.4f} nats/token | perplexity {result['perplexity']:.3f} | bits per byte {bpb:.4f}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .models import PRESETS, RetNetConfig, count_parameters
    from .models.checkpoint import read_config

    if (args.model is None) == (args.preset is None):
        raise UsageError("info: give a model directory or --preset NAME (one of them)")
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UsageError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
        config = RetNetConfig.from_preset(args.preset)
        source = f"preset {args.preset}"
    else:
        path = Path(args.model)
        if not path.is_dir():
            raise UsageError(f"model directory {args.model} does not exist")
        config = read_config(path)
        source = str(path)
    n = count_parameters(config)
    state_bytes = config.num_layers * config.num_heads * config.key_head_dim * config.value_head_dim * 4
    info: dict[str, Any] = {"source": source, "parameters": n, "config": config.to_dict(),
                            "fp32_weights_bytes": n * 4, "bf16_weights_bytes": n * 2,
                            "recurrent_state_bytes_per_sequence": state_bytes}
    if args.model is not None:
        from .training.progress import read_metrics

        evals = [r for r in read_metrics(Path(args.model)) if r.get("kind") == "eval"]
        if evals:
            info["last_eval"] = evals[-1]
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{source}: {n:,} parameters ({n / 1e6:.2f}M; fp32 weights {n * 4 / 2**20:,.1f} MiB, "
          f"bf16 {n * 2 / 2**20:,.1f} MiB)")
    print(f"recurrent state per sequence (fp32): {state_bytes / 2**20:,.2f} MiB, whatever the context length")
    width = max(len(k) for k in info["config"])
    for key, value in info["config"].items():
        print(f"  {key:<{width}}  {value}")
    if "last_eval" in info:
        e = info["last_eval"]
        print(f"last evaluation: step {e['step']}, val loss {e['val_loss']:.4f}, val bits/byte {e['val_bpb']:.4f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    module_name = f"yet_another_retnet.bench.{args.name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(f"benchmark {args.name!r} is not available: no module {module_name}") from err
        raise UsageError(f"benchmark {args.name!r} needs a missing package: {err.name} "
                         f"(pip install 'yet-another-retnet[bench]')") from err
    entry = getattr(module, "main", None)
    if not callable(entry):
        raise UsageError(f"benchmark {args.name!r}: {module_name} has no main(argv)")
    return int(entry(list(args.args)) or 0)


def cmd_convert(args: argparse.Namespace) -> int:
    from .cli_convert import cmd_convert as run

    return run(args)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "info": cmd_info, "bench": cmd_bench,
            "convert": cmd_convert, "prepare": cmd_prepare}


def _serving_command(name: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        from .serve import commands

        return int(getattr(commands, f"cmd_{name}")(args))
    return run


COMMANDS.update({name: _serving_command(name) for name in ("quantize", "chat", "serve")})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 success, 2 user error, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(os.environ.get("RETNET_DEBUG"))
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:  # --help and --version
            return int(done.code or 0)
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("retnet: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, IndexError, OSError, ImportError, FloatingPointError) as err:
        if debug:
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"retnet: error: {message}", file=sys.stderr)
        return 2
