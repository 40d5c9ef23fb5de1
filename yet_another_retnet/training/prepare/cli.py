"""``retnet prepare`` on the command line."""

from __future__ import annotations

import os
import sys
from typing import Any

from ..shards import DTYPES
from .pipeline import prepare


def add_arguments(p: Any) -> None:
    """The options of ``retnet prepare`` on an argparse parser."""
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="text files, directories, .jsonl, .parquet, a datasets directory, or hf:NAME")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory for the shards and index.json")
    p.add_argument("--tokenizer", metavar="JSON", default=None,
                   help="a Hugging Face `tokenizers` JSON file (default: UTF-8 bytes plus an end-of-document id 256)")
    p.add_argument("--field", default="text", help="the jsonl field / parquet or dataset column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="share of documents held out for validation (default: 0.05)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), metavar="N",
                   help="tokenizing processes (default: the CPU count, at most 8)")
    p.add_argument("--data-encoding", default="utf-8", metavar="NAME",
                   help="the sources' text encoding; undecodable bytes are an error (default: utf-8)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="shard dtype (default: uint16 when the vocabulary fits)")
    p.add_argument("--sft", action="store_true",
                   help="supervised fine-tuning: jsonl rows with 'prompt' and 'completion'; only completions are scored")
    p.add_argument("--overwrite", action="store_true", help="replace prepared data from other sources or settings")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: Any) -> int:
    """``retnet prepare`` from parsed arguments."""
    result = prepare(args.sources, args.out, tokenizer=args.tokenizer, field_name=args.field,
                     val_fraction=args.val_fraction, workers=args.workers, encoding=args.data_encoding,
                     dtype=args.dtype, overwrite=args.overwrite, progress=None if args.quiet else sys.stderr,
                     sft=args.sft)
    index = result.index
    splits = index["splits"]
    if result.reused:
        print(f"{result.out}: already prepared from these sources with these settings; nothing to do")
    print(f"{result.out}: {index['documents']:,} documents, {index['text_bytes'] / 1e6:,.1f} MB of text -> "
          f"{splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens ({index['dtype']}, "
          f"tokenizer {index['tokenizer']['type']}, vocabulary {index['tokenizer']['vocab_size']:,})"
          + ("" if result.reused else f" in {result.seconds:.1f} s"))
    if not result.reused:
        print(f"cpu: {result.cpu_main:.2f} s in the main process, {result.cpu_workers:.2f} s in worker processes")
    return 0
