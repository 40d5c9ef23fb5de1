"""Old tree against new tree: is the speed unchanged? (``scripts/compare-trees.sh OLD NEW``)

Checks two git revisions of this repository out into temporary worktrees and times our rows of
the peer benchmark in both, side by side in one session on one machine:

- the training section (``peers_training.py``'s worker: forward + backward of the d 256,
  4-layer model, chunkwise 128 with and without the CPU buffer cache, and the parallel form),
  in tokens/s per shape;
- the decoding section (``peers.py``'s worker: greedy ``stream_generate`` of the d 768,
  12-layer model in float32 and with bfloat16 weights, and of the small d 256 model), in ms per
  token at each context.

Each tree runs with ``PYTHONPATH=<its worktree>`` (no virtual environment: the interpreter's
site-packages give torch and the rest) and its own ``TORCH_EXTENSIONS_DIR``; its C++ kernels are
built (and checked to load from its own worktree) before anything is timed. The worktrees
(``<out>/worktrees``, removed at the end) and the extension caches (``<out>/ext-*``, kept) have
the same paths for the same commits, so a rerun reuses the builds. Every measurement is
a fresh process. The rows are measured in ``--rounds`` interleaved rounds: in each round, every
row runs once on each tree, back to back, the tree that goes first alternating from row to row
and from round to round (old/new, new/old, ...), so that the host's drift hits both alike.

The report (``compare.json`` and ``compare.md`` in ``--out``) gives, per row, the median over the
rounds of the old tree, of the new tree, their ratio new/old and every round's figures; a row
whose ratio lies outside ``1 +- --tolerance`` (default 5%) is flagged. The ratio is of the row's
own unit: tokens/s for training (above 1: the new tree is faster), ms/token for decoding (above
1: the new tree is slower).

Usage (from a source checkout; OLD and NEW are anything ``git rev-parse`` takes)::

    scripts/compare-trees.sh OLD NEW [--rounds 3] [--out runs/compare-trees]
    python benchmarks/compare_trees.py OLD NEW --rounds 2 --shapes 2x1024 --contexts 512 --no-bf16

Run it alone on the machine: every figure is wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The decoding models of the peer benchmark (peers.py's BASE and SMALL).
BASE = {"vocab": 256, "d_model": 768, "heads": 12, "layers": 12, "ffn": 2048}
SMALL = {"vocab": 256, "d_model": 256, "heads": 4, "layers": 4, "ffn": 512}
#: Our training rows of the peer benchmark: (label, worker kind, chunk or None for parallel).
TRAIN_ROWS = (("chunkwise 128", "ours", 128), ("chunkwise 128, no buffer cache", "ours-nocache", 128),
              ("parallel", "ours", None))
#: The parallel form keeps (heads x L x L) scores per layer: not run above this length.
PARALLEL_MAX = 4096
#: Where each tree keeps the benchmark files (the old layout first, then the new one).
LOCATIONS = {"peers_training": ("yet_another_retnet/bench/peers_training.py", "benchmarks/peers_training.py"),
             "peers": ("yet_another_retnet/bench/peers.py", "benchmarks/peers.py")}
#: Run in each tree before timing: builds the C++ kernels that training and decoding use, and
#: says which package was imported.
WARM_UP = """
import json, torch, yet_another_retnet
from yet_another_retnet.models import RetNet, RetNetConfig
for d, h in ((256, 4), (768, 12)):
    model = RetNet(RetNetConfig(vocab_size=256, d_model=d, num_heads=h, num_layers=2, ffn_dim=2 * d,
                                value_factor=1.0, ffn="mlp", dropout=0.0))
    x = torch.randint(0, 256, (1, 300))
    model(x, mode="chunkwise", chunk_size=128, labels=x).loss.backward()
    with torch.inference_mode():
        list(model.eval().stream_generate(x[:, :20], 4))
        list(model.to(torch.bfloat16).stream_generate(x[:, :20], 4))
print(json.dumps({"package": yet_another_retnet.__file__}))
"""


class CompareError(RuntimeError):
    """A tree could not be checked out, built or run."""


def _git(*args: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CompareError(f"git {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


class Tree:
    """One revision checked out in a temporary worktree, with its own extension cache."""

    def __init__(self, name: str, rev: str, root: Path) -> None:
        self.name = name
        self.rev = rev
        self.sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
        # The same path for the same commit from run to run: the extension cache beside it then
        # finds its build commands unchanged and a rerun skips the compile.
        self.path = root / "worktrees" / f"{name}-{self.sha[:12]}"
        if self.path.exists():  # left by an interrupted run
            self.remove()
            shutil.rmtree(self.path, ignore_errors=True)
        _git("worktree", "prune")
        _git("worktree", "add", "--detach", "--quiet", str(self.path), self.sha)
        self.ext_dir = root / f"ext-{name}-{self.sha[:12]}"
        self.ext_dir.mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
        env["PYTHONPATH"] = str(self.path)
        env["TORCH_EXTENSIONS_DIR"] = str(self.ext_dir)
        return env

    def script(self, key: str) -> Path:
        for relative in LOCATIONS[key]:
            if (self.path / relative).is_file():
                return self.path / relative
        raise CompareError(f"{self.name} tree ({self.rev}) has no {key}.py in {' or '.join(LOCATIONS[key])}")

    def run(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout,
                              env=self.env(), cwd=str(self.path), check=False)

    def warm_up(self, timeout: float) -> dict[str, Any]:
        started = time.perf_counter()
        done = self.run(["-c", WARM_UP], timeout)
        if done.returncode != 0:
            raise CompareError(f"{self.name} tree ({self.rev}): the warm-up failed: "
                               f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        package = json.loads(done.stdout.strip().splitlines()[-1])["package"]
        if not Path(package).resolve().is_relative_to(self.path.resolve()):
            raise CompareError(f"{self.name} tree imported yet_another_retnet from {package}, not from {self.path}")
        return {"package": package, "warm_up_s": time.perf_counter() - started}

    def remove(self) -> None:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.path)],
                       capture_output=True, check=False)


def _last_json(text: str, prefix: str = "") -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        line = line.removeprefix(prefix) if prefix else line
        if line.startswith("{"):
            return dict(json.loads(line))
    return None


def jobs(shapes: list[tuple[int, int]], contexts: list[int], bf16: bool, sections: set[str],
         clock: str = "wall") -> list[dict[str, Any]]:
    """Every worker run of a round: ``{"section", "spec", "rows"}``, where each of ``rows`` is one
    line of the report, ``{"row", "section", "unit", "higher_is_better", "key"}`` (``key``: where
    the worker's result holds its figure). A training worker times all its shapes in one process,
    as the peer benchmark does."""
    out: list[dict[str, Any]] = []
    if "training" in sections:
        for label, kind, chunk in TRAIN_ROWS:
            mine = [(b, n) for b, n in shapes if chunk is not None or n <= PARALLEL_MAX]
            if not mine:
                continue
            rows = [{"row": f"training {b}x{n} {label}", "section": "training", "unit": "tokens/s",
                     "higher_is_better": True, "key": f"{b}x{n}"} for b, n in mine]
            out.append({"section": "training", "rows": rows,
                        "spec": {"kind": kind, "chunk": chunk, "shapes": [list(s) for s in mine], "repeats": 2,
                                 "threads": 1 if clock == "cpu" else None, "clock": clock}})
    if "decode" in sections:
        runs = [("ours", "fp32", BASE, "d768", c) for c in contexts]
        runs += [("ours-bf16", "bf16", BASE, "d768", c) for c in contexts] if bf16 else []
        runs += [("ours", "fp32", SMALL, "small (d256)", 512)]
        for impl, dtype, dims, model, context in runs:
            row = {"row": f"decode {dtype} {model} context {context}", "section": "decode",
                   "unit": "CPU ms/token" if clock == "cpu" else "ms/token", "higher_is_better": False,
                   "key": "cpu_ms_per_token" if clock == "cpu" else "ms_per_token"}
            out.append({"section": "decode", "rows": [row],
                        "spec": {"impl": impl, "task": "decode", "dims": dims, "context": context,
                                 "threads": 1 if clock == "cpu" else None}})
    return out


def measure(tree: Tree, job: dict[str, Any], tokens: int, timeout: float) -> dict[str, float | str]:
    """One fresh worker process of ``tree`` for ``job``: each of its rows' figure, or why none."""
    if job["section"] == "training":
        argv = [str(tree.script("peers_training")), "--worker", json.dumps(job["spec"])]
        prefix = "RESULT "
    else:
        spec = {"seed": 0, "repeats": 1, "tokens": tokens, "warmup": 3, "peer_dir": "", "floor": False,
                **job["spec"]}
        argv = [str(tree.script("peers")), "--worker", json.dumps(spec)]
        prefix = ""
    try:
        done = tree.run(argv, timeout)
    except subprocess.TimeoutExpired:
        return {row["row"]: f"timed out after {timeout:.0f} s" for row in job["rows"]}
    result = (_last_json(done.stdout, prefix) if done.returncode == 0 else None) or {}
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {row["row"]: float(result[row["key"]]) if isinstance(result.get(row["key"]), int | float)
            else f"exit {done.returncode}: {tail[0][:200]}" for row in job["rows"]}


def summarise(job: dict[str, Any], old: list[float | str], new: list[float | str], tolerance: float) -> dict[str, Any]:
    """A row of the report: medians over the rounds, ratio new/old, the flag."""
    good_old = [v for v in old if isinstance(v, float)]
    good_new = [v for v in new if isinstance(v, float)]
    row: dict[str, Any] = {"row": job["row"], "section": job["section"], "unit": job["unit"],
                           "higher_is_better": job["higher_is_better"], "old_rounds": old, "new_rounds": new,
                           "old_median": statistics.median(good_old) if good_old else None,
                           "new_median": statistics.median(good_new) if good_new else None}
    if row["old_median"] and row["new_median"] is not None:
        ratio = row["new_median"] / row["old_median"]
        row["ratio_new_over_old"] = ratio
        # One round on each side is one sample of a noisy host: no verdict either way.
        row["outside_tolerance"] = abs(ratio - 1.0) > tolerance if min(len(old), len(new)) > 1 else None
    else:
        row["ratio_new_over_old"] = None
        row["outside_tolerance"] = True  # no figure is no evidence: flagged
    return row


def markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        "# Old tree against new tree", "",
        f"Old: `{data['old']['rev']}` ({data['old']['sha'][:10]}); new: `{data['new']['rev']}` "
        f"({data['new']['sha'][:10]}). Machine: {data['machine']['cpu']} ({data['machine']['cpu_count']} CPUs), "
        f"torch {data['machine']['torch']}, load average {data['machine']['load_start']:.2f} at start, "
        f"{data['machine']['load_end']:.2f} at the end; {data['elapsed_s'] / 60:.1f} minutes in all.", "",
        f"Command: `{data['command']}`", "",
        ("Clock: the workers' CPU time, one thread each (a check of the method on a loaded machine, "
         "not the wall-clock speed users see). " if s.get("clock") == "cpu" else "Clock: wall time. ") +
        f"Each figure is the median over {s['rounds']} interleaved rounds (in each round every row runs once "
        "on each tree, back to back, in a fresh process; the tree going first alternates). Training: "
        "tokens/s of a forward + backward step (the median of its timed steps); decoding: ms per token "
        f"(the median of {s['tokens']} greedy steps). Ratio = new median / old median; rows outside "
        f"1 +- {s['tolerance']:.0%} are flagged.", "",
        "| row | unit | old (median) | new (median) | new / old | flag | old rounds | new rounds |",
        "|---|---|---:|---:|---:|---|---|---|",
    ]

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return "–" if v is None else str(v)

    for r in data["rows"]:
        ratio_value = r["ratio_new_over_old"] or 1.0
        better = "faster" if (ratio_value > 1) == r["higher_is_better"] else "slower"
        flag = (f"**outside +-{s['tolerance']:.0%}** (new {better})" if r["outside_tolerance"]
                and r["ratio_new_over_old"] is not None else "**no figure**" if r["outside_tolerance"]
                else "inconclusive (one round)" if r["outside_tolerance"] is None else "")
        ratio = "–" if r["ratio_new_over_old"] is None else f"{r['ratio_new_over_old']:.3f}"
        lines.append(f"| {r['row']} | {r['unit']} | {fmt(r['old_median'])} | {fmt(r['new_median'])} | {ratio} | "
                     f"{flag} | {', '.join(fmt(v) for v in r['old_rounds'])} | "
                     f"{', '.join(fmt(v) for v in r['new_rounds'])} |")
    flagged = [r for r in data["rows"] if r["outside_tolerance"]]
    undecided = [r for r in data["rows"] if r["outside_tolerance"] is None]
    lines += ["", f"{len(flagged)} of {len(data['rows'])} rows outside +-{s['tolerance']:.0%}."
              if flagged else f"Every row within +-{s['tolerance']:.0%}." if not undecided
              else "Inconclusive: one round gives one sample per tree; run --rounds 3 or more."]
    return "\n".join(lines) + "\n"


def _pairs(text: str, name: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",") if part.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"compare-trees: error: {name} must look like 2x1024,1x4096, got {text!r}")
    return [(s[0], s[1]) for s in shapes]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare-trees", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="the old revision (a commit, branch or tag)")
    p.add_argument("new", help="the new revision")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--shapes", default="2x1024,1x4096,1x16384", help="training shapes (default: 2x1024,1x4096,1x16384)")
    p.add_argument("--contexts", default="512,8192", help="decoding contexts of the d768 model (default: 512,8192)")
    p.add_argument("--tokens", type=int, default=40, help="timed decoding steps per run (default: 40)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 decoding rows")
    p.add_argument("--sections", default="training,decode", help="subset of training,decode")
    p.add_argument("--tolerance", type=float, default=0.05, help="flag ratios outside 1 +- this (default: 0.05)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "compare-trees",
                   help="report directory; also keeps each commit's built kernels for the next run "
                        "(default: runs/compare-trees, ignored by git)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: wall-clock time with torch's threads (the real comparison, on an idle machine); "
                        "cpu: the worker's CPU time with one thread, steadier where other jobs load the "
                        "machine (a smoke test of the method, not the speed users see)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker (default: 900)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - {"training", "decode"}:
        raise SystemExit(f"compare-trees: error: --sections must be a subset of training,decode, got {args.sections!r}")
    if args.rounds < 1 or args.tokens < 1 or not 0 < args.tolerance < 1:
        raise SystemExit("compare-trees: error: --rounds and --tokens must be >= 1, --tolerance in (0, 1)")
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    todo = jobs(_pairs(args.shapes, "--shapes"), contexts, args.bf16, sections, args.clock)
    # A plain `kill` ends the run through the clean-up below (the worktrees are removed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    trees: list[Tree] = []
    try:
        try:
            trees = [Tree("old", args.old, args.out), Tree("new", args.new, args.out)]
            for tree in trees:
                print(f"[compare] {tree.name}: {tree.rev} ({tree.sha[:10]}) building its kernels ...", flush=True)
                info = tree.warm_up(args.timeout)
                print(f"[compare] {tree.name}: ready in {info['warm_up_s']:.0f} s", flush=True)
        except (CompareError, subprocess.TimeoutExpired) as err:
            print(f"compare-trees: error: {err}", file=sys.stderr)
            return 2
        old, new = trees
        report_rows = [row for job in todo for row in job["rows"]]
        figures: dict[str, dict[str, list[float | str]]] = {row["row"]: {"old": [], "new": []} for row in report_rows}
        for r in range(args.rounds):
            for j, job in enumerate(todo):
                order = (old, new) if (r + j) % 2 == 0 else (new, old)
                for tree in order:
                    began = time.perf_counter()
                    values = measure(tree, job, args.tokens, args.timeout)
                    for row in job["rows"]:
                        value = values[row["row"]]
                        figures[row["row"]][tree.name].append(value)
                        shown = f"{value:,.4g} {row['unit']}" if isinstance(value, float) else value
                        print(f"[compare] round {r + 1}/{args.rounds} {tree.name} {row['row']}: {shown}", flush=True)
                    print(f"[compare]   ({time.perf_counter() - began:.0f} s)", flush=True)
        rows = [summarise(row, figures[row["row"]]["old"], figures[row["row"]]["new"], args.tolerance)
                for row in report_rows]
    finally:
        for tree in trees:
            tree.remove()
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    data = {"old": {"rev": old.rev, "sha": old.sha}, "new": {"rev": new.rev, "sha": new.sha},
            "settings": {"rounds": args.rounds, "shapes": args.shapes, "contexts": contexts, "tokens": args.tokens,
                         "bf16": args.bf16, "sections": sorted(sections), "tolerance": args.tolerance,
                         "clock": args.clock},
            "machine": {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "load_start": load_start, "load_end": os.getloadavg()[0]},
            "command": "python benchmarks/compare_trees.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "elapsed_s": time.perf_counter() - started, "rows": rows}
    (args.out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
    text = markdown(data)
    (args.out / "compare.md").write_text(text)
    print(text)
    print(f"[compare] wrote {args.out / 'compare.json'} and {args.out / 'compare.md'}")
    return 1 if any(r["outside_tolerance"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
