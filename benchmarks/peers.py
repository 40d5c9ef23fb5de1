"""``retnet bench peers``: decoding and prefill speed against the other RetNet libraries.

Side by side, in one run, on one machine, each implementation in its own fresh process, in
interleaved rounds (``--rounds``, default 3: every job once per round, the order rotated; each row
the median round), so that rows compared in a ratio run minutes apart at most and the host's drift
hits them alike:

- **ours** (float32, and bfloat16 weights via ``model.to(torch.bfloat16)``), decoding through
  ``model.stream_generate`` (chunkwise prompt prefill, then one fast recurrent step per token);
  the prefill row times ``model.prefill`` (what ``generate`` runs first), with the full chunkwise
  forward beside it;
- **yet-another-retnet 0.5.1** (the PyPI release this project replaces; its package name clashes
  with ours, so it is run from a ``--target`` directory put first on ``PYTHONPATH``), its
  ``forward_chunkwise`` for the prompt (fed 512 tokens at a time) and ``forward_recurrent`` per
  token;
- **torchscale 0.3.0** (the official implementation), ``RetNetDecoder`` with an incremental
  state. Its multi-token prompt path crashes, and a token-by-token prompt of 8k tokens would take
  minutes, so its state is a random tensor at the context's position: a recurrent step costs the
  same whatever the state holds;
- **Hugging Face Llama** with a real KV cache (SDPA attention), if ``transformers`` is installed:
  the Transformer whose per-token cost grows with the context.

All use the same width, depth and heads (d_model 768, 12 heads, 12 layers, vocab 256, batch 1,
dropout 0). Ours and yet-another-retnet 0.5.1 use value width = d_model and a two-matrix FFN of
2048; torchscale (always a GLU FFN) and Llama (always a SwiGLU FFN) get an FFN width that gives the
same weight bytes (~293 MB in float32): decoding a token reads every weight once, so equal bytes
is what makes the per-token times comparable.

The report also gives the memory floor: the weight bytes divided by the bandwidth of a plain
streaming read of a tensor of that size, measured in the same run.

Targets checked and printed (ratios against the best float32 peer at each context):
float32 decoding >= 1.3x fewer ms per token, bfloat16 decoding >= 2.5x, 8k prefill >= 1.5x
the tokens/s of yet-another-retnet 0.5.1's chunkwise form, and the small model
(d 256, 4 heads, 4 layers, FFN 512) under 1 ms per token.

Nothing is installed by this script. Peers, if wanted::

    pip install --no-deps --target .peers/yaretnet051 yet-another-retnet==0.5.1 einops
    pip install torchscale==0.3.0 fairscale --no-deps ; pip install transformers

Run (writes ``peers.json`` and ``peers.md`` to ``--out``)::

    python benchmarks/peers.py --out runs/bench-peers   # from a source checkout
    retnet bench peers --quick

This file must stay importable without the ``yet_another_retnet`` package (the 0.5.1 worker runs
it as a plain script with the old package first on the path): only the standard library and
torch at module level.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

BASE = {"vocab": 256, "d_model": 768, "heads": 12, "layers": 12, "ffn": 2048}
SMALL = {"vocab": 256, "d_model": 256, "heads": 4, "layers": 4, "ffn": 512}
IMPLS = ("ours", "ours-bf16", "ours-compiled", "ours-bf16-compiled", "yaretnet-0.5.1", "torchscale-0.3.0",
         "hf-llama")
#: Our rows, and the decoding target each is held to.
OURS = {"ours": "fp32_decode_ratio", "ours-compiled": "fp32_decode_ratio",
        "ours-bf16": "bf16_decode_ratio", "ours-bf16-compiled": "bf16_decode_ratio"}
LABELS = {
    "ours": "ours (float32)",
    "ours-bf16": "ours (bfloat16 weights)",
    "ours-compiled": "ours (float32, compiled)",
    "ours-bf16-compiled": "ours (bfloat16 weights, compiled)",
    "yaretnet-0.5.1": "yet-another-retnet 0.5.1",
    "torchscale-0.3.0": "torchscale 0.3.0",
    "hf-llama": "HF Llama + KV cache",
}
#: The default rows. The compiled ones are opt-in (``--impls``): on CPU at batch 1 the compiled
#: step and chunkwise form keep the eager kernels, so their rows re-timed the same code.
DEFAULT_IMPLS = tuple(i for i in IMPLS if not i.endswith("-compiled"))
FP32_PEERS = ("yaretnet-0.5.1", "torchscale-0.3.0", "hf-llama")
TARGETS = {"fp32_decode_ratio": 1.3, "bf16_decode_ratio": 2.5, "prefill_ratio": 1.5, "small_ms": 1.0}
PREFILL_CHUNK = 512


def default_peer_dir() -> Path:
    """Where yet-another-retnet 0.5.1 is installed (``$YARETNET051_PATH`` or ``<repo>/.peers``)."""
    env = os.environ.get("YARETNET051_PATH")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / ".peers" / "yaretnet051"


# --------------------------------------------------------------------------------------------
# Timing helpers (shared by every worker)
# --------------------------------------------------------------------------------------------


def _step_times(steps: Iterator[Any], count: int, warmup: int) -> list[tuple[float, float]]:
    """``(wall, cpu)`` seconds between consecutive items of ``steps`` (one decoded token each).

    Warm-up items are dropped. CPU time is this process's (all its threads): on a shared machine
    it is steadier than wall time, and with ``--threads 1`` it is the single-core cost.
    """
    times = []
    last, last_cpu = time.perf_counter(), time.process_time()
    for i, _ in enumerate(steps):
        now, now_cpu = time.perf_counter(), time.process_time()
        if i > warmup:  # item 0 arrives after the prefill; the next few warm caches up
            times.append((now - last, now_cpu - last_cpu))
        last, last_cpu = now, now_cpu
        if i + 1 >= count + warmup + 1:
            break
    return times


def _summary(times: list[tuple[float, float]]) -> dict[str, float]:
    ms = sorted(t[0] * 1e3 for t in times)
    return {"ms_per_token": statistics.median(ms), "ms_min": ms[0], "ms_p90": ms[int(0.9 * (len(ms) - 1))],
            "cpu_ms_per_token": statistics.median(t[1] * 1e3 for t in times), "steps": len(ms)}


def _greedy_loop(step: Callable[[torch.Tensor], torch.Tensor], first: torch.Tensor) -> Iterator[torch.Tensor]:
    """Feed each argmax token back: ``step(token (1, 1)) -> logits (1, vocab)``."""
    token = first
    while True:
        logits = step(token)
        token = logits.argmax(-1).view(1, 1)
        yield token


def _streaming_read_gbps(nbytes: int, repeats: int = 7) -> dict[str, float]:
    """Best read bandwidth over a float32 tensor of ``nbytes``: the floor for reading weights.

    Several read-only reductions are timed and the fastest taken (each is a streaming read of the
    whole buffer with almost no compute).
    """
    buf = torch.randn(max(1, nbytes // 4))
    best = {}
    for name, fn in (("sum", lambda: buf.sum()), ("amax", lambda: buf.amax()),
                     ("dot", lambda: torch.dot(buf, buf))):
        fn()
        best[name] = min(_timeit(fn) for _ in range(repeats))
    fastest = min(best.values())
    return {"read_gbps": nbytes / fastest / 1e9, "read_ms": fastest * 1e3,
            **{f"read_ms_{k}": v * 1e3 for k, v in best.items()}}


def _timeit(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _weight_bytes(module: torch.nn.Module) -> int:
    seen = set()
    total = 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# --------------------------------------------------------------------------------------------
# Workers: one implementation, one task, in this (fresh) process
# --------------------------------------------------------------------------------------------


def _ours(job: dict[str, Any]) -> dict[str, Any]:
    from yet_another_retnet import RetNet, RetNetConfig

    dims = job["dims"]
    config = RetNetConfig(vocab_size=dims["vocab"], d_model=dims["d_model"], num_heads=dims["heads"],
                          num_layers=dims["layers"], ffn_dim=dims["ffn"], value_factor=1.0, ffn="mlp",
                          dropout=0.0, chunk_size=PREFILL_CHUNK)
    torch.manual_seed(job["seed"])
    model = RetNet(config).eval()
    if job["impl"].startswith("ours-bf16"):
        model = model.to(torch.bfloat16)
    model.fast_decode = not job.get("reference", False)
    if job["impl"].endswith("-compiled"):
        # As a user would call them. Batch-1 CPU decoding keeps the layer kernels (nothing to
        # compile); a prefill compiles in its warm-up call.
        model.compile_decode().compile_chunkwise()
    prompt = torch.randint(0, dims["vocab"], (1, job["context"]), generator=torch.Generator().manual_seed(1))
    result: dict[str, Any] = {"weight_mb": _weight_bytes(model) / 1e6}
    if job["task"] == "prefill":
        with torch.inference_mode():
            chunk = job.get("chunk", PREFILL_CHUNK)
            # Warm-up; a compiled model compiles for the prompt's exact length, so it warms up on it.
            warm = prompt if job["impl"].endswith("-compiled") else prompt[:, :PREFILL_CHUNK]
            model(warm, mode="chunkwise", chunk_size=chunk)
            model.prefill(warm, chunk_size=chunk)
            # The row is `prefill` (what generate runs: the state and the last position's
            # logits); the full chunkwise forward (every position's logits), timed alternately
            # beside it, is reported too.
            times, full = [], []
            for _ in range(job["repeats"]):
                full.append(_timeit(lambda: model(prompt, mode="chunkwise", chunk_size=chunk)))
                times.append(_timeit(lambda: model.prefill(prompt, chunk_size=chunk)))
        return {**result, "tokens_per_s": job["context"] / statistics.median(times),
                "seconds": statistics.median(times),
                "full_forward_tokens_per_s": job["context"] / statistics.median(full)}
    runs = []
    for _ in range(job["repeats"]):
        stream = model.stream_generate(prompt, job["tokens"] + job["warmup"] + 1)
        runs.append(_summary(_step_times(stream, job["tokens"], job["warmup"])))
    result.update(_pick(runs))
    if job.get("floor"):
        result.update(_streaming_read_gbps(_weight_bytes(model)))
    return result


def _median_entry(runs: list[dict[str, Any]], key: str, higher_is_better: bool) -> dict[str, Any]:
    """A copy of the median of ``runs`` by ``key`` (of an even count, the worse of the middle two)."""
    ordered = sorted(runs, key=lambda r: float(r[key]), reverse=higher_is_better)
    return dict(ordered[len(ordered) // 2])


def combine_rounds(runs: list[dict[str, Any]], key: str, higher_is_better: bool) -> dict[str, Any]:
    """One job's row from its rounds: the median round by ``key`` (:func:`_median_entry`), with
    every round's value in ``"rounds"`` (in round order). Failed rounds are left out and counted in
    ``"failed_rounds"``; if every round failed, the first failure."""
    good = [r for r in runs if "error" not in r and r.get(key) is not None]
    if not good:
        return dict(runs[0])
    chosen = _median_entry(good, key, higher_is_better)
    chosen["rounds"] = [r[key] for r in good]
    if len(good) < len(runs):
        chosen["failed_rounds"] = len(runs) - len(good)
    return chosen


def _pick(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run (by ms per token) of several repeats, with every repeat's median kept."""
    chosen = _median_entry(runs, "ms_per_token", higher_is_better=False)
    chosen["repeats_ms"] = [round(r["ms_per_token"], 3) for r in runs]
    return chosen


def _yaretnet(job: dict[str, Any]) -> dict[str, Any]:
    import yet_another_retnet as peer

    peer_dir = Path(job["peer_dir"]).resolve()
    if peer_dir not in Path(peer.__file__).resolve().parents:
        raise RuntimeError(f"imported {peer.__file__}, not the 0.5.1 copy in {peer_dir}")
    from yet_another_retnet.retnet import RetNet as PeerRetNet

    dims = job["dims"]
    torch.manual_seed(job["seed"])
    model = PeerRetNet(dims["vocab"], d_model=dims["d_model"], nhead=dims["heads"], num_layers=dims["layers"],
                       dropout=0.0, dim_feedforward=dims["ffn"]).eval()
    prompt = torch.randint(0, dims["vocab"], (1, job["context"]), generator=torch.Generator().manual_seed(1))
    result: dict[str, Any] = {"weight_mb": _weight_bytes(model) / 1e6}

    def prefill() -> tuple[torch.Tensor, list[torch.Tensor]]:
        states: list[Any] = []
        logits = None
        chunk = job.get("chunk", PREFILL_CHUNK)
        for start in range(0, prompt.shape[1], chunk):
            logits, states = model.forward_chunkwise(prompt[:, start:start + chunk], start, states)
        assert logits is not None
        return logits, states

    with torch.inference_mode():
        if job["task"] == "prefill":
            model.forward_chunkwise(prompt[:, :PREFILL_CHUNK], 0, [])  # warm-up
            times = [_timeit(prefill) for _ in range(job["repeats"])]
            return {**result, "tokens_per_s": job["context"] / statistics.median(times),
                    "seconds": statistics.median(times)}
        runs = []
        for _ in range(job["repeats"]):
            logits, states = prefill()
            position = [job["context"]]

            def step(token: torch.Tensor, states: list[Any] = states, position: list[int] = position) -> torch.Tensor:
                out, new = model.forward_recurrent(token[:, 0], position[0], states)
                states[:] = new
                position[0] += 1
                return out

            first = logits[:, -1].argmax(-1).view(1, 1)
            runs.append(_summary(_step_times(_greedy_loop(step, first), job["tokens"], job["warmup"])))
    result.update(_pick(runs))
    return result


def _equal_bytes_glu_width(dims: dict[str, int]) -> int:
    """A GLU FFN width (3 matrices) holding the weights of our 2-matrix FFN of ``dims['ffn']``."""
    return round(2 * dims["ffn"] / 3)


def _torchscale(job: dict[str, Any]) -> dict[str, Any]:
    from yet_another_retnet.bench.common import shim_timm  # absolute: workers run by path

    shim_timm()
    from torchscale.architecture.config import RetNetConfig as TsConfig
    from torchscale.architecture.retnet import RetNetDecoder

    dims = job["dims"]
    torch.manual_seed(job["seed"])
    config = TsConfig(decoder_embed_dim=dims["d_model"], decoder_value_embed_dim=dims["d_model"],
                      decoder_retention_heads=dims["heads"], decoder_ffn_embed_dim=_equal_bytes_glu_width(dims),
                      decoder_layers=dims["layers"], vocab_size=dims["vocab"], dropout=0.0,
                      drop_path_rate=0.0, activation_dropout=0.0,
                      chunkwise_recurrent=job["task"] == "prefill",
                      recurrent_chunk_size=job.get("chunk", PREFILL_CHUNK))
    model = RetNetDecoder(config, embed_tokens=torch.nn.Embedding(dims["vocab"], dims["d_model"])).eval()
    result: dict[str, Any] = {"weight_mb": _weight_bytes(model) / 1e6}
    context = job["context"]
    with torch.inference_mode():
        if job["task"] == "prefill":
            prompt = torch.randint(0, dims["vocab"], (1, context), generator=torch.Generator().manual_seed(1))
            model(prompt[:, :PREFILL_CHUNK])
            times = [_timeit(lambda: model(prompt)) for _ in range(job["repeats"])]
            return {**result, "tokens_per_s": context / statistics.median(times),
                    "seconds": statistics.median(times), "note": "chunkwise_recurrent forward (no state out)"}
        heads, dk = dims["heads"], dims["d_model"] // dims["heads"]
        runs = []
        for _ in range(job["repeats"]):
            # Only the last token of ``tokens`` is embedded; its length sets the position.
            tokens = torch.zeros(1, context + 1, dtype=torch.long)
            state: dict[Any, Any] = {
                i: {"prev_key_value": torch.randn(1, heads, dk, dk) * 0.01, "scale": torch.ones(heads) * context}
                for i in range(dims["layers"])
            }

            def step(token: torch.Tensor, tokens: torch.Tensor = tokens, state: dict[Any, Any] = state) -> torch.Tensor:
                tokens[0, -1] = token[0, 0]
                logits, _ = model(tokens, incremental_state=state)
                return logits[:, -1]

            runs.append(_summary(_step_times(_greedy_loop(step, torch.zeros(1, 1, dtype=torch.long)),
                                             job["tokens"], job["warmup"])))
    result.update(_pick(runs))
    result["note"] = "random state at the context's position"
    return result


def _llama(job: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from yet_another_retnet.bench import common  # absolute: workers run by path

    dims = job["dims"]
    torch.manual_seed(job["seed"])
    config = LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["d_model"],
                         intermediate_size=_equal_bytes_glu_width(dims), num_hidden_layers=dims["layers"],
                         num_attention_heads=dims["heads"], num_key_value_heads=dims["heads"],
                         max_position_embeddings=1 << 17, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"  # F.scaled_dot_product_attention: transformers' fastest on CPU
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, dims["vocab"], (1, job["context"]), generator=torch.Generator().manual_seed(1))
    result: dict[str, Any] = {"weight_mb": _weight_bytes(model) / 1e6}
    key = common.llama_cache_kwarg(model)
    with torch.inference_mode():
        if job["task"] == "prefill":
            model(prompt[:, :PREFILL_CHUNK], use_cache=True)
            times = [_timeit(lambda: model(prompt, use_cache=True)) for _ in range(job["repeats"])]
            return {**result, "tokens_per_s": job["context"] / statistics.median(times),
                    "seconds": statistics.median(times)}
        runs = []
        for _ in range(job["repeats"]):
            out = model(prompt, use_cache=True)
            holder = [common.llama_cache(out)]

            def step(token: torch.Tensor, holder: list[Any] = holder) -> torch.Tensor:
                out = model(token, use_cache=True, **{key: holder[0]})
                holder[0] = common.llama_cache(out)
                return out.logits[:, -1]

            first = out.logits[:, -1].argmax(-1).view(1, 1)
            runs.append(_summary(_step_times(_greedy_loop(step, first), job["tokens"], job["warmup"])))
    result.update(_pick(runs))
    return result


WORKERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    **{impl: _ours for impl in OURS}, "yaretnet-0.5.1": _yaretnet, "torchscale-0.3.0": _torchscale,
    "hf-llama": _llama,
}


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One (implementation, task) in a fresh process; ``{"error": ...}`` if it fails."""
    env = dict(os.environ)
    if job["impl"] == "yaretnet-0.5.1":
        # Run this file as a plain script so that ``import yet_another_retnet`` finds 0.5.1.
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
        env["PYTHONPATH"] = os.pathsep.join([job["peer_dir"], *filter(None, [env.get("PYTHONPATH")])])
        cwd = job["peer_dir"]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
        cwd = None
    from yet_another_retnet.bench.common import run_json_command  # absolute: workers run by path

    return run_json_command(cmd, timeout, env=env, cwd=cwd)


def available(impl: str, peer_dir: Path) -> str | None:
    """``None`` if ``impl`` can run here, else why not (nothing is installed by this script)."""
    import importlib.util

    if impl == "yaretnet-0.5.1":
        if not (peer_dir / "yet_another_retnet" / "retnet.py").exists():
            return (f"not installed: pip install --no-deps --target {peer_dir} yet-another-retnet==0.5.1 einops")
        if not (peer_dir / "einops").exists() and importlib.util.find_spec("einops") is None:
            return f"einops missing: pip install --no-deps --target {peer_dir} einops"
    if impl == "torchscale-0.3.0" and (importlib.util.find_spec("torchscale") is None
                                       or importlib.util.find_spec("fairscale") is None):
        return "not installed: pip install torchscale==0.3.0 && pip install --no-deps fairscale"
    if impl == "hf-llama" and importlib.util.find_spec("transformers") is None:
        return "transformers not installed"
    return None


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


#: The sections --sections may name.
SECTIONS = ("decode", "prefill", "small", "training")


def build_parser() -> argparse.ArgumentParser:
    from yet_another_retnet.cli_common import _Parser  # absolute: workers run by path

    # The CLI's parser: a bad value is retnet's one-line usage error (exit 2), not a SystemExit.
    parser = _Parser(
        prog="retnet bench peers",
        description="Decoding and prefill speed: ours vs yet-another-retnet 0.5.1, torchscale 0.3.0 "
                    "and a HF Llama with KV cache, each in its own process.",
    )
    parser.add_argument("--out", default="runs/bench-peers", help="output directory (default: runs/bench-peers)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: context 512 only, fewer tokens, 2k prefill")
    parser.add_argument("--contexts", default=None, help="decoding contexts (default: 512,8192)")
    parser.add_argument("--tokens", type=int, default=None, help="timed tokens per run (default: 40)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds of the decode, prefill and small sections: each runs every "
                             "job once, each in a fresh process, the order rotated; rows are the median "
                             "round (default: 3; --quick: 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per job inside its process (default: 1)")
    parser.add_argument("--prefill-length", type=int, default=None, help="prefill prompt length (default: 8192)")
    parser.add_argument("--impls", default=",".join(DEFAULT_IMPLS),
                        help=f"subset of {','.join(IMPLS)} (default: {','.join(DEFAULT_IMPLS)})")
    parser.add_argument("--sections", default="decode,prefill,small,training",
                        help="subset of decode,prefill,small,training")
    parser.add_argument("--peer-dir", default=str(default_peer_dir()),
                        help="where yet-another-retnet 0.5.1 was pip-installed with --target")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every worker (default: torch's choice, all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--contexts must be comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise ValueError(f"--contexts must be positive integers, got {text!r}")
    return values


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10**digits else f"{value:.{digits}g}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        job = json.loads(args.worker)
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        print(json.dumps(WORKERS[job["impl"]](job)), flush=True)
        return 0
    from yet_another_retnet.bench import common  # absolute: workers run by path

    load_start = os.getloadavg()[0]
    contexts = _ints(args.contexts) if args.contexts is not None else ([512] if args.quick else [512, 8192])
    # `x if given else default`, not `x or default`: --tokens 0 is an error, not the default.
    tokens = common.count(args.tokens, 12 if args.quick else 40, "--tokens")
    rounds = common.count(args.rounds, 1 if args.quick else 3, "--rounds")
    repeats = common.count(args.repeats, 1, "--repeats")
    prefill_length = common.count(args.prefill_length, 2048 if args.quick else 8192, "--prefill-length")
    common.count(args.threads, 1, "--threads")
    common.positive_float(args.timeout, "--timeout")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise ValueError(f"--impls: unknown {unknown}; choose from {IMPLS}")
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        raise common.UsageError(f"--sections: unknown {sorted(sections - set(SECTIONS)) or args.sections!r}; "
                                f"choose from {','.join(SECTIONS)}")
    out = common.prepare_out(args.out)  # an --out that is a file: found before measuring
    # `retnet bench peers` calls main(argv); `python benchmarks/peers.py` calls main().
    command = (common.command_line("peers", argv) if argv is not None
               else "python benchmarks/peers.py " + " ".join(sys.argv[1:])).strip()
    peer_dir = Path(args.peer_dir).resolve()
    skipped = {impl: why for impl in impls if (why := available(impl, peer_dir))}
    runnable = [i for i in impls if i not in skipped]
    for impl, why in skipped.items():
        print(f"[peers] skipping {impl}: {why}", flush=True)

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    base_job = {"seed": args.seed, "threads": args.threads, "repeats": repeats, "tokens": tokens, "warmup": 3, "peer_dir": str(peer_dir)}
    results: dict[str, Any] = {"decode": [], "prefill": [], "small": [], "training": None}

    def run(impl: str, task: str, dims: dict[str, int], context: int, label: str, **extra: Any) -> dict[str, Any]:
        job = {**base_job, "impl": impl, "task": task, "dims": dims, "context": context, **extra}
        started = time.perf_counter()
        res = run_job(job, args.timeout)
        shown = res.get("ms_per_token", res.get("tokens_per_s"))
        print(f"[peers] {label} {task:7s} {LABELS[impl]:28s} ctx {context:6d}: "
              f"{_fmt(shown) if 'error' not in res else res['error']} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
        return {"impl": impl, "label": LABELS[impl], "context": context, **res}

    # (section, impl, task, dims, context, job options, options shown in the row)
    jobs: list[tuple[str, str, str, dict[str, int], int, dict[str, Any], dict[str, Any]]] = []
    if "decode" in sections:
        jobs += [("decode", impl, "decode", BASE, context, {"floor": impl in OURS}, {})
                 for context in contexts for impl in runnable]
    if "prefill" in sections:
        # compile_chunkwise covers float32 prefill; bfloat16 prefill has no compiled form.
        for impl in [i for i in runnable if i != "ours-bf16-compiled"]:
            # Each chunked implementation at the default 512 and at 128 (faster on CPU for both
            # RetNets: less quadratic work inside a chunk); Llama takes the prompt in one forward.
            chunks = [None] if impl == "hf-llama" else ([128] if impl.startswith("ours-") else [512, 128])
            for chunk in chunks:
                extra = {} if chunk is None else {"chunk": chunk}
                jobs.append(("prefill", impl, "prefill", BASE, prefill_length, extra, extra))
    if "small" in sections:
        jobs += [("small", impl, "decode", SMALL, 512, {}, {}) for impl in runnable if "bf16" not in impl]
    # The host's speed drifts over minutes: every job runs once per round and the order rotates,
    # so the rows a ratio compares are measured side by side in each round, and none is always
    # first or last.
    runs: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for r in range(rounds):
        shift = r * len(jobs) // rounds
        for j in [*range(shift, len(jobs)), *range(shift)]:
            _, impl, task, dims, context, options, _ = jobs[j]
            runs[j].append(run(impl, task, dims, context, f"round {r + 1}/{rounds}", **options))
    for (section, _, task, _, _, _, shown), got in zip(jobs, runs, strict=True):
        key, higher = ("tokens_per_s", True) if task == "prefill" else ("ms_per_token", False)
        results[section].append({**combine_rounds(got, key, higher), **shown})
    if "training" in sections:
        try:
            peers_training: Any = importlib.import_module("yet_another_retnet.bench.peers_training")
        except ImportError:
            peers_training = None
        if peers_training is not None:
            print("[peers] training section (bench/peers_training.py)", flush=True)
            results["training"] = peers_training.run_training_section(args.quick)

    summary = summarise(results, contexts, rounds)
    machine = _machine(args.threads)
    machine.update(load_average_1m=load_start, load_average_1m_end=os.getloadavg()[0])
    data = {"settings": {"quick": args.quick, "contexts": contexts, "tokens": tokens, "repeats": repeats, "rounds": rounds,
                         "prefill_length": prefill_length, "base": BASE, "small": SMALL,
                         "torch_threads": args.threads or torch.get_num_threads(), "skipped": skipped},
            "machine": machine, "results": results, "summary": summary,
            "command": command}
    markdown = render_markdown(data)
    common.write_text(out / "peers.md", markdown)
    common.write_json(out / "peers.json", data)
    print(markdown)
    print(f"[peers] wrote {out / 'peers.json'} and {out / 'peers.md'}")
    return 0


def _machine(threads: int | None) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "torch_threads": threads or torch.get_num_threads(), "python": sys.version.split()[0]}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
        info["load_average_1m"] = os.getloadavg()[0]
    except (OSError, StopIteration):
        pass
    return info


#: A target's verdict when its figures come from a single round.
ONE_ROUND = "inconclusive (one round; rerun without --quick)"


def verdict(target: dict[str, Any]) -> str:
    """``PASS``, ``FAIL`` or the inconclusive note, for the report."""
    return target.get("verdict") or ("PASS" if target["pass"] else "FAIL")


def summarise(results: dict[str, Any], contexts: list[int], rounds: int | None = None) -> dict[str, Any]:
    """Ratios against the best float32 peer, and each target's pass/fail.

    With ``rounds=1`` (``--quick``) no timing target is judged: one delayed process on a loaded
    machine can decide a single round, so each gets ``pass`` None and an inconclusive ``verdict``.
    """
    summary: dict[str, Any] = {"decode": {}, "targets": []}
    for context in contexts:
        rows = {r["impl"]: r for r in results["decode"] if r["context"] == context and "ms_per_token" in r}
        peers = [rows[i] for i in FP32_PEERS if i in rows]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["ms_per_token"])
        entry: dict[str, Any] = {"best_peer": best["impl"], "best_peer_ms": best["ms_per_token"]}
        for impl, target_key in OURS.items():
            if impl in rows:
                ratio = best["ms_per_token"] / rows[impl]["ms_per_token"]
                entry[impl] = {"ms_per_token": rows[impl]["ms_per_token"], "ratio": ratio}
                if "read_gbps" in rows[impl]:
                    floor = rows[impl]["weight_mb"] * 1e6 / (rows[impl]["read_gbps"] * 1e9) * 1e3
                    entry[impl].update(floor_ms=floor, over_floor=rows[impl]["ms_per_token"] / floor)
                summary["targets"].append({"target": f"{LABELS[impl]} decoding at context {context}: "
                                           f">= {TARGETS[target_key]}x fewer ms/token than the best float32 peer",
                                           "value": ratio, "pass": ratio >= TARGETS[target_key]})
        summary["decode"][str(context)] = entry
    fastest: dict[str, float] = {}
    for r in results["prefill"]:
        if "tokens_per_s" in r:
            fastest[r["impl"]] = max(fastest.get(r["impl"], 0.0), r["tokens_per_s"])
    if "yaretnet-0.5.1" in fastest:
        for impl in ("ours", "ours-compiled", "ours-bf16"):
            if impl in fastest:
                ratio = fastest[impl] / fastest["yaretnet-0.5.1"]
                summary[{"ours": "prefill_ratio", "ours-compiled": "prefill_ratio_compiled",
                         "ours-bf16": "prefill_ratio_bf16"}[impl]] = ratio
                summary["targets"].append({
                    "target": f"{LABELS[impl]} prefill >= {TARGETS['prefill_ratio']}x the tokens/s of "
                              "yet-another-retnet 0.5.1's chunkwise form (best chunk size of each)",
                    "value": ratio, "pass": ratio >= TARGETS["prefill_ratio"]})
    small = {r["impl"]: r for r in results["small"] if "ms_per_token" in r}
    for impl in ("ours", "ours-compiled"):
        if impl in small:
            ms = small[impl]["ms_per_token"]
            summary["targets"].append({"target": f"small model (d 256, 4 layers), {LABELS[impl]}: decoding < "
                                       f"{TARGETS['small_ms']} ms/token", "value": ms, "pass": ms < TARGETS["small_ms"]})
    training = results.get("training")
    if isinstance(training, dict) and training.get("rows"):
        peers_training = importlib.import_module("yet_another_retnet.bench.peers_training")
        summary["targets"] += peers_training.training_targets(training)
    if rounds == 1:
        for target in summary["targets"]:
            target.update({"pass": None, "verdict": ONE_ROUND})
    return summary


def _rounds_text(settings: dict[str, Any]) -> str:
    rounds = settings.get("rounds", 1)
    how = (f"Each row is the median of {rounds} interleaved rounds (every job once per round, each in a fresh "
           "process, the order rotated between rounds)" if rounds > 1 else "One round, each job in its own process")
    repeats = settings["repeats"]
    decode, prefill = ("", "one pass") if repeats == 1 else (f"; the median of {repeats} such runs",
                                                            f"the median of {repeats} passes")
    return (f"{how}; a decoding job times {settings['tokens']} greedy tokens (batch 1, the median "
            f"step{decode}), a prefill job {prefill} after a warm-up.")


def _each_round(row: dict[str, Any]) -> str:
    values = ", ".join(_fmt(v) for v in row.get("rounds", []))
    return values + (f" ({row['failed_rounds']} failed)" if row.get("failed_rounds") else "")


def render_markdown(data: dict[str, Any]) -> str:
    results, summary, settings = data["results"], data["summary"], data["settings"]
    machine = data["machine"]
    load = f"{_fmt(machine.get('load_average_1m'))} / {_fmt(machine.get('load_average_1m_end'))}"
    lines = ["# Decoding and prefill against the peers\n",
             f"Command: `{data['command']}`\n",
             f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} CPUs, {machine.get('torch_threads')} "
             f"torch threads), torch {machine.get('torch')}, 1-minute load average at "
             f"start / end {load} (a busy machine slows everything, multi-threaded code most). "
             f"{_rounds_text(settings)}\n"]
    if results["decode"]:
        contexts = settings["contexts"]
        lines += ["## Decoding, d_model 768, 12 heads, 12 layers (ms per token, lower is better)\n",
                  "Wall-clock median; in brackets the process's CPU ms per token (all threads). The "
                  "compiled rows call `model.compile_decode().compile_chunkwise()` as a user would: a "
                  "CPU step (of up to 32 rows) stays on the one-call layer kernels (`keep_kernel_steps=True`, the "
                  "default), so these rows and the small model's time the eager step's code again.\n",
                  "| implementation | weights MB | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
                  "|---|---|" + "---|" * len(contexts)]
        for impl in IMPLS:
            rows = {r["context"]: r for r in results["decode"] if r["impl"] == impl}
            if not rows:
                continue
            any_row = next(iter(rows.values()))
            cells = [f"{_fmt(rows[c].get('ms_per_token'))} ({_fmt(rows[c].get('cpu_ms_per_token'))})"
                     if c in rows and "error" not in rows[c] else ("error" if c in rows else "–")
                     for c in contexts]
            lines.append(f"| {LABELS[impl]} | {_fmt(any_row.get('weight_mb'))} | " + " | ".join(cells) + " |")
        lines.append("")
        for context, entry in summary["decode"].items():
            parts = [f"best float32 peer {LABELS[entry['best_peer']]} {_fmt(entry['best_peer_ms'])} ms"]
            for impl in OURS:
                if impl in entry:
                    e = entry[impl]
                    text = f"{LABELS[impl]} {_fmt(e['ratio'])}x fewer ms/token"
                    if "floor_ms" in e:
                        text += f" (memory floor {_fmt(e['floor_ms'])} ms, we are at {_fmt(e['over_floor'])}x it)"
                    parts.append(text)
            lines.append(f"- context {context}: " + "; ".join(parts))
        lines.append("")
    if results["prefill"]:
        lines += [f"## Prompt prefill, {settings['prefill_length']} tokens (tokens/s, higher is better)\n",
                  "| implementation | form | tokens/s | seconds | each round | full forward, tokens/s |",
                  "|---|---|---|---|---|---|"]
        forms = {"ours": "prefill(), chunk {c}", "ours-bf16": "prefill(), chunk {c}",
                 "ours-compiled": "prefill(), chunk {c}, compile_chunkwise()",
                 "yaretnet-0.5.1": "forward_chunkwise, {c} tokens a call",
                 "torchscale-0.3.0": "chunkwise_recurrent forward, chunk {c}", "hf-llama": "one forward, SDPA"}
        for r in results["prefill"]:
            label = LABELS.get(r["impl"], r["impl"])
            form = forms.get(r["impl"], "").format(c=r.get("chunk"))
            lines.append(f"| {label} | {form} | {_fmt(r.get('tokens_per_s'))} | {_fmt(r.get('seconds'))} | "
                         f"{_each_round(r)} | {_fmt(r.get('full_forward_tokens_per_s'))} |"
                         if "error" not in r else f"| {label} | {form} | error | | | |")
        lines += ["", "Ours: `model.prefill(prompt)`, what `generate` starts with (the state and the last "
                  "position's logits; the last layer computes only what those need). The last column "
                  "times `model(prompt, mode=\"chunkwise\")` (every position's logits) in the same "
                  "process, alternately. The peers have no prefill of their own: their row is their "
                  "chunkwise forward.", ""]
    if results["small"]:
        lines += ["## Small model decoding, d_model 256, 4 heads, 4 layers, FFN 512 (ms per token)\n",
                  "| implementation | ms/token (median) | min | CPU ms/token | each round |", "|---|---|---|---|---|"]
        for r in results["small"]:
            lines.append(f"| {LABELS.get(r['impl'], r['impl'])} | {_fmt(r.get('ms_per_token'))} | {_fmt(r.get('ms_min'))} "
                         f"| {_fmt(r.get('cpu_ms_per_token'))} | {_each_round(r)} |"
                         if "error" not in r else f"| {LABELS.get(r['impl'], r['impl'])} | error | | | |")
        lines.append("")
    if results.get("training"):
        lines += ["## Training (from bench/peers_training.py)\n", _training_markdown(results["training"]), ""]
    if summary["targets"]:
        lines += ["## Targets\n", "| target | value | pass |", "|---|---|---|"]
        lines += [f"| {t['target']} | {_fmt(t['value'])} | {verdict(t)} |"
                  for t in summary["targets"]]
        lines.append("")
    errors = [f"- {LABELS.get(r['impl'], r['impl'])} ({section}, ctx {r['context']}): {r['error']}"
              for section in ("decode", "prefill", "small") for r in results[section] if "error" in r]
    skipped = [f"- {LABELS[i]}: {why}" for i, why in settings["skipped"].items()]
    if errors or skipped:
        lines += ["## Not measured\n", *errors, *skipped, ""]
    return "\n".join(lines)


def _training_markdown(training: dict[str, Any]) -> str:
    """The training section's rows: tokens/s per shape (with model FLOPs utilisation), then notes."""
    rows = training.get("rows") if isinstance(training, dict) else None
    if not rows:
        return "```json\n" + json.dumps(training, indent=2) + "\n```"
    shapes = list(dict.fromkeys(k for row in rows for k in (row.get("tokens_per_s") or {})))
    out = ["| implementation | setting | " + " | ".join(f"tokens/s {s}" for s in shapes) + " | note |",
           "|---|---|" + "---|" * len(shapes) + "---|"]
    for row in rows:
        cells = []
        for shape in shapes:
            speed = (row.get("tokens_per_s") or {}).get(shape)
            mfu = (row.get("mfu") or {}).get(shape)
            cells.append(_fmt(speed) + (f" ({mfu:.0%} MFU)" if isinstance(mfu, float) else ""))
        out.append(f"| {row.get('impl')} | {row.get('setting', '')} | " + " | ".join(cells)
                   + f" | {row.get('note') or ''} |")
    if training.get("matmul_gflops") is not None:
        matmul_backends_summary = importlib.import_module("yet_another_retnet.bench.peers_training").matmul_backends_summary

        backends = matmul_backends_summary(training)
        out.append(f"\nfloat32 matmul on this machine: {_fmt(training['matmul_gflops'])} GFLOP/s (median of the "
                   "rounds; the faster of " + (backends or "the backends") + " in each measurement; each MFU "
                   "divides by the matmul its worker measured right before that shape).")
    return "\n".join(out)

if __name__ == "__main__":
    sys.exit(main())
