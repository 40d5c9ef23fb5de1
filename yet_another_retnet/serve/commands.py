"""``retnet quantize``, ``retnet chat`` and ``retnet serve``: parsers and commands (registered by
``cli.py``)."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..cli import UsageError, _load_model, _pick_device
from ..cli_generate import QUANTIZE_CHOICES
from ..models.checkpoint import current_umask, fsync_path

#: Files of a model directory that travel with its weights (the tokenizer).
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def add_commands(sub: Any, formatter: Any) -> None:
    p = sub.add_parser("quantize", formatter_class=formatter, help="save a model with int8 or int4 weights",
                       description="Quantize a model directory's projections to int8 (one scale per output\n"
                                   "channel) or int4 (a scale and low value per group of input columns), its LM head\n"
                                   "to int8, and save it, with its tokenizer, to OUT (safetensors).")
    p.add_argument("model", metavar="SRC", help="model directory (float weights)")
    p.add_argument("out", metavar="OUT", help="directory to write")
    p.add_argument("--method", choices=QUANTIZE_CHOICES, default="int8",
                   help="quantization: int8, or int4 with groups of 128 (int4-gN: of N) (default: int8)")

    for name, help_text in (("chat", "talk to a model in the terminal"),
                            ("serve", "serve a model over HTTP (OpenAI-style completions API)")):
        p = sub.add_parser(name, formatter_class=formatter, help=help_text, description=_DESCRIPTIONS[name])
        p.add_argument("model", metavar="DIR", help="model directory")
        p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                       help="int8 or int4 weights for the projections and head")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="cast the weights (default: as saved)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        if name == "chat":
            p.add_argument("--max-new-tokens", type=int, default=200, metavar="N", help="tokens per reply at most (default: 200)")
            p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 for greedy (default: 0.8)")
            p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling mass (default: 0.95)")
            p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
        else:
            p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
            p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
            p.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together at most (default: 16)")
            p.add_argument("--max-tokens-limit", type=int, default=4096, metavar="N", help="largest max_tokens a request may ask (default: 4096)")
            p.add_argument("--max-waiting", type=int, default=256, metavar="N",
                           help="requests queued for a slot at most; more get a 503 (default: 256)")
            p.add_argument("--max-prompt-tokens", type=int, default=32768, metavar="N",
                           help="longest prompt a request may send, in tokens (default: 32768)")


_DESCRIPTIONS = {
    "chat": "A conversation in the terminal: each line you type is a turn, the reply streams back.\n"
            "The model's state is kept between turns, so a turn only reads what is new. Empty line or EOF ends it.",
    "serve": "An HTTP server with the OpenAI API's shape: POST /v1/completions and /v1/chat/completions\n"
             "(\"stream\": true for server-sent events), GET /v1/models. Concurrent requests are decoded together.\n"
             "Needs the [serve] extra (fastapi, uvicorn).",
}


def _model_for(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    device = _pick_device(args.device)
    model, tokenizer = _load_model(args.model, device, args.quantize)
    if args.dtype is not None:
        model = model.to(getattr(torch, args.dtype))
    return model, tokenizer


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize SRC into OUT. OUT is built in a temporary directory beside it and renamed into
    place once complete (weights, config and tokenizer), as ``retnet convert`` does: a kill or a
    full disk leaves no OUT, never one without its tokenizer (which would load with the byte
    tokenizer instead)."""
    from ..models import RetNet
    from ..models.checkpoint import WEIGHTS_NAME
    from ..models.quantized import save_quantized
    from ..models.shards import weight_files

    src, out = Path(args.model), Path(args.out)
    if not src.is_dir():
        raise UsageError(f"model directory {args.model} does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{args.out} exists and is not an empty directory")
    if out.resolve() == src.resolve():
        raise UsageError("OUT must differ from SRC")
    model = RetNet.from_pretrained(src, quantize=args.method)
    # The source's size from the files that hold its weights (one file or shards).
    before = sum(path.stat().st_size for path in set(weight_files(src).values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_quantized(model, tmp)
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                fsync_path(tmp / name)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's is owner-only; OUT gets a plain mkdir's mode
        fsync_path(tmp)
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(out.parent)
    after = (out / WEIGHTS_NAME).stat().st_size
    print(f"wrote {out} ({args.method}): {after / 2**20:,.1f} MiB of weights (was {before / 2**20:,.1f} MiB)")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import Chat

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # What `retnet generate` refuses (generation's _check_generation_args): checked before the
    # model loads, and named by flag, not a sampling error's traceback at the first reply.
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number >= 0 (0 for greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    model, tokenizer = _model_for(args)
    chat = Chat(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        for piece in chat.turn(line.rstrip("\n")):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import build_app
    except ImportError as err:
        raise UsageError(f"serve needs the [serve] extra: pip install 'yet-another-retnet[serve]' ({err})") from err
    if not 1 <= args.max_batch <= 256:
        raise UsageError(f"--max-batch must be in [1, 256], got {args.max_batch}")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_tokens_limit", "max_waiting", "max_prompt_tokens"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    model, tokenizer = _model_for(args)
    app = build_app(model, tokenizer, name=Path(args.model).name, max_batch=args.max_batch,
                    max_tokens_limit=args.max_tokens_limit, max_waiting=args.max_waiting,
                    max_prompt_tokens=args.max_prompt_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
