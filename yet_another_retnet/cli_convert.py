"""``retnet convert``: checkpoints between this library's format and fla's, and from 0.5.1's.

``--from fla`` / ``--to fla`` (models/convert.py) work on checkpoint directories; ``--from
yar051`` (compat/convert.py) reads a yet-another-retnet 0.5.1 state-dict file.
"""

from __future__ import annotations

import argparse
from typing import Any

from .cli_common import UsageError

FORMAT_HELP = ("ours (save_pretrained's directory), fla (flash-linear-attention, e.g. fla-hub/retnet-1.3B-100B), "
               "syncdoth (syncdoth/RetNet's RetNetForCausalLM, read only) or yar051 (a yet-another-retnet 0.5.1 RetNet state dict: torch.save file or .safetensors)")


def add_parser(sub: Any, formatter: Any) -> None:
    p = sub.add_parser(
        "convert", formatter_class=formatter, help="convert a checkpoint directory (fla <-> ours)",
        description="Convert a checkpoint directory. `retnet convert --from fla SRC OUT` reads an fla RetNet\n"
                    "(config.json, safetensors, tokenizer.json) into our format; `retnet convert --to fla SRC OUT`\n"
                    "writes one of ours for fla; `retnet convert --from yar051 old.pt OUT` reads a yet-another-retnet\n"
                    "0.5.1 state dict; `retnet convert --from syncdoth SRC OUT` reads a syncdoth/RetNet checkpoint.\n"
                    "OUT must not exist (or be empty); nothing is written on error.")
    p.add_argument("src", metavar="SRC", help="checkpoint directory to read")
    p.add_argument("out", metavar="OUT", help="directory to write")
    p.add_argument("--from", dest="source", default=None, help=f"format of SRC (default: detected): {FORMAT_HELP}")
    p.add_argument("--to", dest="target", default=None, help="format of OUT (default: the other one)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="store the weights in this dtype (default: as in SRC)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="largest weights file, e.g. 2GB (default: 5GB, as Hugging Face writes them)")
    from .compat.convert import add_yar051_arguments

    add_yar051_arguments(p)


def cmd_convert(args: argparse.Namespace) -> int:
    if args.source == "yar051":
        from .compat.convert import run

        for flag, value in (("--to", args.target), ("--dtype", args.dtype), ("--max-shard-size", args.max_shard_size)):
            if value is not None:
                raise ValueError(f"{flag} does not apply to --from yar051")

        return run(args)
    # The 0.5.1 options describe what a 0.5.1 state dict cannot show; for other formats they would
    # be silently ignored, so refuse them.
    given = [flag for flag, value in (("--nhead", args.nhead), ("--post-norm", args.post_norm or None),
                                      ("--activation", args.activation), ("--layer-norm-eps", args.layer_norm_eps),
                                      ("--overwrite", args.overwrite or None)) if value is not None]
    if given:
        raise UsageError(f"convert: {', '.join(given)} only apply with --from yar051")
    import torch

    from .models.convert import convert
    from .models.shards import parse_size

    if args.max_shard_size is not None:
        parse_size(args.max_shard_size)  # a bad size is a usage error before anything is read
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = convert(args.src, args.out, args.source, args.target, dtype=dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return 0
