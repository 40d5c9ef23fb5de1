"""``retnet bench NAME``: dispatch to a benchmark module's ``main(argv)``."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from .cli_common import UsageError, _formatter

BENCHMARKS = ("ops", "inference", "training", "quality", "peers", "data", "cpu_inference", "quantization")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", formatter_class=_formatter, help="run a benchmark", add_help=True,
                       description="Run a benchmark: retnet bench NAME [args...]; `retnet bench NAME --help` for its options.\n"
                                   f"NAME: {', '.join(BENCHMARKS)}.")
    p.add_argument("name", choices=BENCHMARKS, help="benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench._outside import RelocatedBenchmarkError

    module_name = f"yet_another_retnet.bench.{args.name}"
    try:
        module = importlib.import_module(module_name)
    except RelocatedBenchmarkError as err:  # an installed wheel: the peer comparison is not in it
        raise UsageError(str(err)) from err
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(f"benchmark {args.name!r} is not available: no module {module_name}") from err
        raise UsageError(f"benchmark {args.name!r} needs a missing package: {err.name} "
                         f"(pip install 'yet-another-retnet[bench]')") from err
    entry = getattr(module, "main", None)
    if not callable(entry):
        raise UsageError(f"benchmark {args.name!r}: {module_name} has no main(argv)")
    try:
        return int(entry(list(args.args)) or 0)
    except SystemExit as done:  # `--help` (0), or a module that still exits on its own
        if done.code is None or isinstance(done.code, int):
            return int(done.code or 0)
        raise UsageError(f"bench {args.name}: {done.code}") from None
