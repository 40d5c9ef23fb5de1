"""``retnet bench data``: the large-corpus path, measured.

1. Generates a corpus of ``--size-mb`` (default 1024) of jsonl documents: random passages of the
   embedded pydoc corpus, 1-8 KB each, deterministic (seeded).
2. Trains a small byte-level BPE ``tokenizer.json`` (``--bpe-vocab``) with the ``tokenizers``
   library on its first 20 MB.
3. Times ``retnet prepare`` with the byte tokenizer and the BPE one, 1 and 2 worker processes:
   MB of text per second.
4. Runs ``retnet train --max-steps 50`` (the default model and batch; evaluation capped as a
   prepared corpus caps it) on the byte-prepared full corpus and on a 10 MB one, and reports
   each run's peak resident memory and the time from launch to the first step.

Writes ``data.json`` and ``data.md`` into ``--out``. Needs ~3x ``--size-mb`` of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..cli_common import UsageError, _Parser
from ..training.data import default_corpus_text


def build_parser() -> argparse.ArgumentParser:
    # The CLI's parser: a bad value is retnet's one-line usage error (exit 2), not a SystemExit.
    p = _Parser(prog="retnet bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mb", type=int, default=1024, help="generated corpus size in MB (default: 1024)")
    p.add_argument("--small-mb", type=int, default=10, help="the small corpus of the memory comparison (default: 10)")
    p.add_argument("--bpe-vocab", type=int, default=8192, help="BPE vocabulary (default: 8192)")
    p.add_argument("--bpe-mb", type=int, default=None,
                   help="time the BPE tokenizer on the first N MB only (default: the whole corpus)")
    p.add_argument("--workers", default="1,2", help="worker counts to time (default: 1,2)")
    p.add_argument("--train-steps", type=int, default=50,
                   help="steps of each training run (default: 50; 0 skips the training comparison)")
    p.add_argument("--work", default="bench-data-work", help="scratch directory (corpus, shards, runs)")
    p.add_argument("--out", default="results", help="directory for data.json and data.md (default: results)")
    return p


def generate_corpus(path: Path, size_mb: int, seed: int = 0) -> int:
    """Write ``size_mb`` MB of jsonl documents to ``path``; returns the text bytes."""
    text = default_corpus_text()
    rng = random.Random(seed)
    target = size_mb * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        lines = []
        while written < target:
            n = rng.randint(1000, 8000)
            start = rng.randrange(0, len(text) - n)
            doc = text[start:start + n]
            written += len(doc.encode("utf-8"))
            lines.append(json.dumps({"text": doc}) + "\n")
            if len(lines) == 2000:
                f.writelines(lines)
                lines = []
        f.writelines(lines)
    return written


def train_bpe(corpus: Path, out: Path, vocab: int, sample_bytes: int = 20_000_000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts() -> Any:
        seen = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["text"]
                seen += len(doc)
                yield doc
                if seen > sample_bytes:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    path = out / "bpe-tokenizer.json"
    tok.save(str(path))
    return path


def _retnet(*args: str) -> list[str]:
    return [sys.executable, "-m", "yet_another_retnet", *args]


def time_prepare(corpus: Path, out: Path, tokenizer: Path | None, workers: int) -> dict[str, Any]:
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time (an identical one would be reused)
    cmd = _retnet("prepare", str(corpus), "--out", str(out), "--workers", str(workers), "--quiet")
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    split = re.search(r"cpu: ([0-9.]+) s in the main process, ([0-9.]+) s in worker processes", done.stdout)
    cpu_main, cpu_workers = (float(split.group(1)), float(split.group(2))) if split else (None, None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the whole process tree (the worker processes are waited for, so they count):
    # on a shared machine wall-clock speed follows the other jobs, CPU time much less.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    index = json.loads((out / "index.json").read_text())
    tokens = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
    mb = index["text_bytes"] / 1e6
    return {"tokenizer": "byte" if tokenizer is None else "bpe", "workers": workers, "seconds": seconds,
            "text_mb": mb, "mb_per_s": mb / seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "documents": index["documents"], "cpu_seconds": cpu, "mb_per_cpu_s": mb / cpu,
            "cores_busy": cpu / seconds, "load_average_1m": os.getloadavg()[0],
            "cpu_main_seconds": cpu_main, "cpu_worker_seconds": cpu_workers}


def train_run(data: Path, out: Path, steps: int) -> dict[str, Any]:
    """One ``retnet train`` subprocess: peak RSS (from its own log) and time to its first step."""
    cmd = _retnet("train", "--data", str(data), "--out", str(out), "--overwrite", "--max-steps", str(steps),
                  "--log-interval", "1", "--eval-interval", str(steps), "--sample-tokens", "0", "--device", "cpu")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_step = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if first_step is None and line.startswith("step ") and line.split()[1].startswith("1/"):
            first_step = time.perf_counter() - t0
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {"data": str(data), "steps": steps, "peak_rss_mib": max(r["peak_rss_mib"] for r in train),
            "seconds_to_first_step": first_step, "tokens_per_s_last": train[-1]["tokens_per_s"],
            "wall_s": time.perf_counter() - t0}


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    if out.exists() and not out.is_dir():  # found now, not after generating and timing the corpus
        raise UsageError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in args.workers.split(",") if w]
    corpus = work / "corpus.jsonl"
    small = work / "small.jsonl"
    if not corpus.is_file() or corpus.stat().st_size < args.size_mb * 1_000_000:
        print(f"generating {args.size_mb} MB ...", flush=True)
        generate_corpus(corpus, args.size_mb)
    if not small.is_file():
        generate_corpus(small, args.small_mb, seed=1)
    bpe = train_bpe(corpus, work, args.bpe_vocab)
    bpe_corpus = corpus
    if args.bpe_mb is not None:
        bpe_corpus = work / f"first-{args.bpe_mb}mb.jsonl"
        with open(corpus, "rb") as src, open(bpe_corpus, "wb") as dst:
            for line in src:
                dst.write(line)
                if dst.tell() >= args.bpe_mb * 1_000_000:
                    break
    prepare_rows = []
    for tok in (None, bpe):
        for w in workers:
            row = time_prepare(corpus if tok is None else bpe_corpus,
                               work / f"prepared-{'byte' if tok is None else 'bpe'}", tok, w)
            print(json.dumps(row), flush=True)
            prepare_rows.append(row)
    runs = {}
    if args.train_steps > 0:
        time_prepare(small, work / "prepared-small", None, 1)
        for name, data in (("small", work / "prepared-small"), ("large", work / "prepared-byte")):
            runs[name] = train_run(data, work / f"run-{name}", args.train_steps)
            print(json.dumps(runs[name]), flush=True)
    ratio = runs["large"]["peak_rss_mib"] / runs["small"]["peak_rss_mib"] if runs else None
    report = {"machine": cpu_name(), "cpu_count": os.cpu_count(), "size_mb": args.size_mb,
              "small_mb": args.small_mb, "bpe_vocab": args.bpe_vocab, "bpe_mb": args.bpe_mb, "prepare": prepare_rows, "train": runs,
              "peak_rss_ratio_large_over_small": ratio,
              "rss_within_10_percent": None if ratio is None else abs(ratio - 1) <= 0.10,
              "command": "retnet bench data " + " ".join(argv or sys.argv[1:])}
    (out / "data.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# retnet bench data ({report['machine']}, {os.cpu_count()} CPUs)", "",
             f"Corpus: {args.size_mb} MB of generated jsonl documents"
             + (f" (BPE rows: its first {args.bpe_mb} MB)." if args.bpe_mb else "."), "",
             "| tokenizer | workers | MB/s of source | tokens/s | seconds | CPU seconds: all (main + workers) "
             "| MB per CPU second | cores busy | load average (1 min, at the end) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['tokenizer']} | {r['workers']} | {r['mb_per_s']:.1f} | {r['tokens_per_s'] / 1e6:.2f}M | "
              f"{r['seconds']:.1f} | {r['cpu_seconds']:.1f} ({r['cpu_main_seconds']} + {r['cpu_worker_seconds']}) | "
              f"{r['mb_per_cpu_s']:.1f} | {r['cores_busy']:.2f} | {r['load_average_1m']:.1f} |" for r in prepare_rows]
    if ratio is not None:
        lines += ["", f"| `retnet train --max-steps {args.train_steps}` on | peak RSS (MiB) | launch to first step (s) |",
                  "|---|---|---|"]
        lines += [f"| {name} ({args.size_mb if name == 'large' else args.small_mb} MB) | {r['peak_rss_mib']:.0f} | "
                  f"{r['seconds_to_first_step']:.1f} |" for name, r in runs.items()]
        lines += ["", f"Peak RSS ratio large / small: {ratio:.3f} "
                      f"({'within' if report['rss_within_10_percent'] else 'NOT within'} 10%)."]
    (out / "data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["rss_within_10_percent"] is not False else 1
