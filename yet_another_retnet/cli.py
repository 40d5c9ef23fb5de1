"""The ``retnet`` command line: train, prepare, generate, eval, info, bench, convert, quantize, chat
and serve.

``retnet train`` with no arguments trains a small RetNet on the embedded corpus (750 steps;
``retnet train --help`` says more). Run ``retnet <command> --help`` for each command's options. A user
mistake prints one line, ``retnet: error: ...``, and exits with status 2; set
``RETNET_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Each command's options and code live in a module of their own (cli_train, cli_eval, ...); the
# names are imported here so that every one keeps working from ``yet_another_retnet.cli``.
from .cli_bench import BENCHMARKS, cmd_bench
from .cli_common import UsageError, _formatter, _load_model, _Parser, _pick_device
from .cli_eval import cmd_eval
from .cli_generate import QUANTIZE_CHOICES, cmd_generate
from .cli_train import cmd_train

__all__ = ["BENCHMARKS", "COMMANDS", "QUANTIZE_CHOICES", "UsageError", "_load_model", "_pick_device", "build_parser", "cmd_bench",
           "cmd_eval", "cmd_generate", "cmd_info", "cmd_prepare", "cmd_train", "main"]


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def _add_prepare(sub: Any) -> None:
    from .training.prepare import add_arguments

    p = sub.add_parser("prepare", formatter_class=_formatter, help="tokenize a corpus into memory-mapped shards",
                       description="Tokenize text files, directories, .jsonl, .parquet or a datasets directory into\n"
                                   "token shards that `retnet train --data DIR` reads through memory maps.")
    add_arguments(p)


def _add_info(sub: Any) -> None:
    from .models import PRESETS

    p = sub.add_parser("info", formatter_class=_formatter, help="configuration and parameter count",
                       description="Print a model's configuration and parameter count (big presets are counted\n"
                                   "on the meta device: nothing is allocated).")
    p.add_argument("model", metavar="DIR", nargs="?", default=None, help="model directory")
    p.add_argument("--preset", default=None, help=f"a preset instead of a directory: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--kernels", action="store_true",
                   help="instead: which CPU fast paths this machine takes, and why not")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="retnet", formatter_class=_formatter,
                     description="RetNet (Retentive Networks): train, generate, evaluate, inspect, benchmark.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"yet-another-retnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from . import cli_bench, cli_eval, cli_generate, cli_train

    cli_train.add_parser(sub)
    _add_prepare(sub)
    cli_generate.add_parser(sub)
    cli_eval.add_parser(sub)
    _add_info(sub)
    cli_bench.add_parser(sub)
    from .cli_convert import add_parser as _add_convert

    _add_convert(sub, _formatter)
    from .serve.commands import add_commands  # quantize, chat, serve

    add_commands(sub, _formatter)
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from .training.prepare import run

    return run(args)


def cmd_info(args: argparse.Namespace) -> int:
    from .models import PRESETS, RetNetConfig, count_parameters
    from .models.checkpoint import read_config

    if args.kernels:
        if args.model is not None or args.preset is not None:
            raise UsageError("info --kernels: give no model directory or --preset (it reports this machine)")
        from .ops.cpu.report import cmd_kernels

        return cmd_kernels(args)
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
        evals = [r for r in _metric_records(Path(args.model))
                 if r.get("kind") == "eval" and all(k in r for k in ("step", "val_loss", "val_bpb"))]
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
        print(f"last evaluation: step {e['step']}, val loss {_number(e['val_loss'])}, "
              f"val bits/byte {_number(e['val_bpb'])}")
    return 0


def _metric_records(directory: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``directory``'s metrics file. Lines that are not one (a line cut short
    by a kill, a hand edit) are skipped: ``info`` reports the model, and one odd line must not make
    it fail."""
    from .training.progress import METRICS_NAME

    path = directory / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _number(value: Any) -> str:
    """A metric to 4 decimals; the trainer writes a non-finite one as null, shown as n/a."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "n/a"


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


if __name__ == "__main__":  # python -m yet_another_retnet.cli
    sys.exit(main())
