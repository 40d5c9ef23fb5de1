"""``retnet generate``: stream text from a model directory."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from .cli_common import UsageError, _formatter, _load_model, _pick_device


def add_parser(sub: Any) -> None:
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
    p.add_argument("--cuda-graph", action="store_true",
                   help="on a CUDA GPU, replay each decoding step as one captured CUDA graph (docs/gpu.md)")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                   help="int8 weights (per output channel) for the projections and head: ~4x fewer bytes a token; "
                        "int4: 4-bit weights with a scale per group of 128 inputs (int4-gN: groups of N), ~7x fewer")


#: ``--quantize`` methods: models/quantized.py's QUANTIZE_METHODS (kept here so --help needs no torch).
QUANTIZE_CHOICES = ("int8", "int4", "int4-g32", "int4-g64", "int4-g256")


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .training.data import StreamDecoder

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    # Checked here, before the prompt is echoed, not by the sampler after it.
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    device = _pick_device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA device (--device cuda), got {device.type}")
    if args.cuda_graph and (args.compile or args.quantize):
        raise UsageError("--cuda-graph replays the float decoding step: drop --compile and --quantize")
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
        eos_token_id=eos, cuda_graph=args.cuda_graph,
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
