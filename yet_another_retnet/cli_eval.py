"""``retnet eval``: loss, perplexity and bits per byte of a model on text (or lm-eval tasks)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from .cli_common import UsageError, _formatter, _load_model, _pick_device


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", formatter_class=_formatter, help="loss, perplexity and bits per byte of a model",
                       description="Evaluate a model directory on text: loss (nats/token), perplexity, bits per byte.\n"
                                   "Without --data: the validation split of the embedded corpus.")
    p.add_argument("model", metavar="DIR", help="model directory")
    p.add_argument("--data", metavar="PATH", default=None, help="a text file or directory to evaluate on (all of it), or prepared data (its validation split)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N", help="tokens per window (default: the training run's, else 512)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="windows per forward pass (default: 8)")
    p.add_argument("--max-windows", type=int, default=None, metavar="N", help="score N windows spread evenly over the data (default: all)")
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


def _check_prepared_tokenizer(data: str, prepared: dict[str, Any], model: dict[str, Any]) -> None:
    """Refuse prepared data tokenized otherwise than the model's tokenizer: its token ids would mean
    other text, and the loss and bits per byte nothing. Compared as training does
    (training/corpus.py, training/resolve.py): type and vocabulary size, and the tokenizer file's
    sha256 where both sides record one."""
    same = (prepared.get("type"), prepared.get("vocab_size")) == (model.get("type"), model.get("vocab_size"))
    if same and "sha256" in prepared and "sha256" in model:
        same = prepared["sha256"] == model["sha256"]
    if not same:
        raise UsageError(f"--data {data}: prepared with another tokenizer ({prepared.get('type')}, "
                         f"{prepared.get('vocab_size')} tokens) than the model's ({model.get('type')}, "
                         f"{model.get('vocab_size')} tokens); prepare the data with the model's tokenizer")


def cmd_eval(args: argparse.Namespace) -> int:

    from .training.data import (
        default_corpus_text,
        encode_corpus,
        eval_windows,
        read_text_files,
        split_tokens,
    )
    from .training.trainer import TRAIN_CONFIG_NAME, bits_per_byte, eval_window_index, evaluate

    for name in ("batch_size", "seq_len", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.tasks is None:
        # These options belong to the lm-eval path; without --tasks they would be silently ignored.
        given = [flag for flag, value in (("--include-path", args.include_path), ("--num-fewshot", args.num_fewshot),
                                          ("--limit", args.limit), ("--output", args.output)) if value is not None]
        if given:
            raise UsageError(f"eval: {', '.join(given)} only apply with --tasks")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and not (math.isfinite(args.limit) and args.limit > 0):
        raise UsageError(f"--limit must be a finite number > 0, got {args.limit}")
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
        _check_prepared_tokenizer(args.data, open_prepared(args.data).tokenizer_info, tokenizer.describe())
        val = open_prepared(args.data).val
        if len(val) < 2:
            raise UsageError(f"{args.data}: the validation split has fewer than 2 tokens")
        length = min(seq_len, len(val) - 1)
        starts = eval_window_index((len(val) - 1) // length, args.max_windows) * length
        windows = val.windows(starts, length + 1)
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
        windows = windows[eval_window_index(len(windows), args.max_windows)]
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
