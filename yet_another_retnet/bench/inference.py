"""``retnet bench inference``: decoding cost of RetNet against a KV-cache Transformer of the same size.

For each context length (at batch 1) and each batch size (at one context length), and for each
model, a fresh process

1. builds the model (random weights, seeded; nothing downloaded),
2. warms up on a short prompt,
3. prefills a random prompt of ``context`` tokens (timed: the prefill time),
4. decodes ``warmup + steps`` tokens greedily and times each one; the median of the last
   ``steps`` is the per-token latency *at that context* (``decode_ms_best_block`` keeps the
   lowest median of four blocks of them), and the state the decoding holds afterwards is
   measured.

The timing claims need repeated rounds (``--rounds``, default 3): with one round (``--quick``)
they read "inconclusive (one round; rerun without --quick)" instead of a verdict.

RetNet runs through its public ``stream_generate`` (chunkwise prefill, then recurrent steps).
The Transformer is Hugging Face's ``LlamaForCausalLM`` (``attn_implementation="sdpa"``) with its
real KV cache, same width, depth and heads, FFN width matched for equal parameters, driven by the
same greedy loop ``generate`` runs (``logits_to_keep=1`` in the prefill, as ``generate`` does).

Memory: the peak of the process (``torch.cuda.max_memory_allocated`` on GPU, peak RSS on CPU:
hence one process per configuration), and separately the bytes of RetNet's recurrent state and of
the Transformer's KV cache at ``context`` tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from . import common

MODULE = "yet_another_retnet.bench.inference"
MODELS = ("retnet", "transformer")
LABELS = {"retnet": "RetNet (recurrent)", "transformer": "Transformer (Llama, KV cache)"}
COLORS = {"retnet": "tab:red", "transformer": "tab:blue"}
MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser(
        "retnet bench inference",
        description="Decode latency, throughput, prefill time and memory: RetNet vs a same-size "
                    "KV-cache Transformer (Hugging Face Llama), over context length and batch size.",
    )
    common.add_common_args(parser, default_out="bench-results/inference", default_preset="small")
    parser.add_argument("--contexts", type=common.positive_ints, default=None,
                        help="context lengths of the batch-1 sweep (default: 512,...,16384)")
    parser.add_argument("--batch-sizes", type=common.positive_ints, default=None,
                        help="batch sizes of the batch sweep (default: 1,2,4,8,16)")
    parser.add_argument("--batch-context", type=int, default=None,
                        help="context length of the batch sweep (default: 8192)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default: 32)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed decode steps before them (default: 4)")
    parser.add_argument("--models", default="retnet,transformer",
                        help="comma-separated subset of retnet,transformer")
    parser.add_argument("--kv-cache", choices=("static", "dynamic"), default="static",
                        help="the Transformer's cache: transformers' StaticCache (preallocated, "
                             "default, the faster on CPU) or DynamicCache (generate's default)")
    parser.add_argument("--max-cache-gib", type=float, default=8.0,
                        help="skip Transformer configurations whose KV cache would exceed this")
    parser.add_argument("--isolate", choices=("subprocess", "none"), default=None,
                        help="one fresh process per configuration (default; clean peak RSS) or "
                             "all in this process (default with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="measure RetNet's batch-1 context sweep this many times, the contexts in a "
                             "rotating order, and keep each context's median run (default: 3; --quick: 1)")
    parser.add_argument("--compile-decode", action="store_true",
                        help="RetNet decodes through model.compile_decode() (torch.compile of the step; "
                             "CPU steps of up to 32 rows stay on the one-call layer kernels)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------------


def _decode_summary(times: list[float], batch: int, cpu_times: list[float] | None = None) -> dict[str, Any]:
    """Per-step latency from the timed decode steps.

    ``decode_ms_per_token`` is the median over all timed steps (one step that another process
    delayed moves it by nothing). The lowest median of four consecutive blocks of steps is kept
    as ``decode_ms_best_block`` (what the hardware does when nothing else runs), named as such.
    """
    ms = [t * 1e3 for t in times]
    size = max(1, len(ms) // 4)
    blocks = [ms[i:i + size] for i in range(0, len(ms) - size + 1, size)]
    median = statistics.median(ms)
    ordered = sorted(ms)
    return {
        "decode_ms_per_token": median,
        "decode_ms_median_all": median,
        "decode_ms_best_block": min(statistics.median(b) for b in blocks),
        "decode_ms_p25": ordered[len(ordered) // 4],
        "decode_ms_p75": ordered[(3 * len(ordered)) // 4],
        "decode_tokens_per_s": batch * 1e3 / median,
        # CPU time per step (one torch thread: the work itself, whatever else runs on the machine).
        "decode_cpu_ms_per_token": statistics.median(cpu_times) * 1e3 if cpu_times else None,
    }


def _decode_memory(device: torch.device) -> int:
    """Memory held while decoding, measured after the last step with the state or cache alive.

    GPU: allocated bytes. CPU: the resident set after handing the allocator's free blocks back
    to the OS (without that, heap left over from the prefill reads as decoding memory).
    """
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    common.release_free_memory()
    return common.current_rss()


def _live_state_bytes(stream: Any) -> int:
    """Bytes of the recurrent state a paused ``stream_generate`` holds (its ``state`` local)."""
    frame = getattr(stream, "gi_frame", None)
    state = frame.f_locals.get("state") if frame is not None else None
    if state is None or not hasattr(state, "nbytes"):
        raise RuntimeError("bench inference: cannot read the decoding stream's state (generation.py changed?)")
    return int(state.nbytes())


def _measure_retnet(job: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    from ..models.retnet import RetNet

    config = common.retnet_config(job["preset"])
    torch.manual_seed(job["seed"])
    model = RetNet(config, device=device, dtype=dtype).eval()
    if job.get("compile_decode"):
        model.compile_decode()  # compiled by the warm-up below (the step's graph fits any context)
    batch, context = job["batch"], job["context"]
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    # Warm-up: lazy initialisation, allocator, kernels for both forms.
    model.generate(torch.randint(0, config.vocab_size, (batch, 64), generator=gen).to(device), 3)
    prompt = torch.randint(0, config.vocab_size, (batch, context), generator=gen).to(device)
    rss_ready = common.current_rss()
    common.reset_peak_memory(device)
    total = job["warmup_steps"] + job["steps"]
    stream = model.stream_generate(prompt, max_new_tokens=total + 1)
    prefill_s, _ = common.timed(lambda: next(stream), device)  # prefill + the first token
    both = [common.timed_both(lambda: next(stream), device) for _ in range(total)]
    times, cpu_times = [b[0] for b in both], [b[1] for b in both]
    decode_mem = _decode_memory(device)  # the stream (and its state) is still alive here
    return {
        "prefill_s": prefill_s,
        **_decode_summary(times[job["warmup_steps"]:], batch,
                          cpu_times[job["warmup_steps"]:] if device.type == "cpu" else None),
        # The state the stream holds after the prompt and every decoded token: the flatness claim
        # compares it across contexts (a state that grew with the context would show here).
        "cache_bytes": _live_state_bytes(stream),
        "weights_bytes": common.module_bytes(model),
        "parameters": model.num_parameters(),
        "rss_ready_bytes": rss_ready,
        "peak_bytes": common.peak_memory(device),
        "decode_memory_bytes": decode_mem,
    }


def _measure_transformer(job: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    config = common.retnet_config(job["preset"])
    model = common.build_llama(config, device, dtype, seed=job["seed"]).eval()
    cache_kw = common.llama_cache_kwarg(model)
    batch, context = job["batch"], job["context"]
    gen = torch.Generator().manual_seed(job["seed"] + 1)

    static = job.get("kv_cache", "static") == "static"
    llama_config: Any = model.config

    def prefill(ids: torch.Tensor, extra: int) -> tuple[torch.Tensor, Any]:
        kw: dict[str, Any] = {}
        if static:
            # A preallocated cache written in place: no per-step copy of the whole cache
            # (DynamicCache concatenates), the faster of the two on CPU.
            from transformers.cache_utils import StaticCache

            kw[cache_kw] = StaticCache(config=llama_config, max_cache_len=ids.shape[1] + extra)
        out = model(ids, use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1].argmax(-1), common.llama_cache(out)

    def step(token: torch.Tensor, cache: Any) -> torch.Tensor:
        out = model(token[:, None], use_cache=True, **{cache_kw: cache})
        return out.logits[:, -1].argmax(-1)

    with torch.inference_mode():
        token, cache = prefill(torch.randint(0, config.vocab_size, (batch, 64), generator=gen).to(device), 4)
        for _ in range(3):
            token = step(token, cache)
        del cache
        prompt = torch.randint(0, config.vocab_size, (batch, context), generator=gen).to(device)
        rss_ready = common.current_rss()
        common.reset_peak_memory(device)
        total = job["warmup_steps"] + job["steps"]
        prefill_s, (token, cache) = common.timed(lambda: prefill(prompt, total + 1), device)
        # After the prefill: `context` tokens (dynamic), or `context + total + 1` slots (static).
        cache_bytes = common.tensor_bytes(common.kv_cache_tensors(cache))
        times, cpu_times = [], []
        for _ in range(total):
            current = token
            seconds, cpu, token = common.timed_both(lambda: step(current, cache), device)  # noqa: B023
            times.append(seconds)
            cpu_times.append(cpu)
        decode_mem = _decode_memory(device)  # the KV cache is still alive here
    return {
        "prefill_s": prefill_s,
        **_decode_summary(times[job["warmup_steps"]:], batch,
                          cpu_times[job["warmup_steps"]:] if device.type == "cpu" else None),
        "cache_bytes": cache_bytes,
        "weights_bytes": common.module_bytes(model),
        "parameters": common.num_parameters(model),
        "rss_ready_bytes": rss_ready,
        "peak_bytes": common.peak_memory(device),
        "decode_memory_bytes": decode_mem,
    }


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration (``job``: model, preset, context, batch, steps, ...) here and now."""
    device = common.resolve_device(job["device"])
    dtype = common.resolve_dtype(job["dtype"])
    common.configure_threads(job.get("threads"))
    fn = _measure_retnet if job["model"] == "retnet" else _measure_transformer
    result = fn(job, device, dtype)
    return {"model": job["model"], "context": job["context"], "batch": job["batch"], **result}


# --------------------------------------------------------------------------------------------
# The grid, the claims and the reports
# --------------------------------------------------------------------------------------------


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated measurements of one configuration, the one with the median decode ms/step (the
    lower middle for an even count), with every run's figure in ``decode_ms_per_round``. Runs that
    failed are left out; if all failed, the first is returned."""
    good = [r for r in runs if r.get("decode_ms_per_token") is not None]
    if not good:
        return runs[0]
    ordered = sorted(good, key=lambda r: r["decode_ms_per_token"])
    return {**ordered[(len(ordered) - 1) // 2], "decode_ms_per_round": [r["decode_ms_per_token"] for r in good]}


def kv_cache_estimate(preset: str, context: int, batch: int, dtype: torch.dtype) -> int:
    config = common.retnet_config(preset)
    return 2 * config.num_layers * config.d_model * context * batch * torch.empty((), dtype=dtype).element_size()


def _find(results: list[dict[str, Any]], model: str, context: int, batch: int) -> dict[str, Any] | None:
    for r in results:
        if r.get("model") == model and r["context"] == context and r["batch"] == batch and "error" not in r:
            return r
    return None


def comparisons(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (context, batch) measured for both models: speed-up and memory ratios."""
    rows = []
    keys = sorted({(r["context"], r["batch"]) for r in results})
    for context, batch in keys:
        a, b = _find(results, "retnet", context, batch), _find(results, "transformer", context, batch)
        if a is None or b is None:
            continue
        rows.append({
            "context": context,
            "batch": batch,
            "retnet_ms": a["decode_ms_per_token"],
            "transformer_ms": b["decode_ms_per_token"],
            "speedup": b["decode_ms_per_token"] / a["decode_ms_per_token"],
            "retnet_cpu_ms": a.get("decode_cpu_ms_per_token"),
            "transformer_cpu_ms": b.get("decode_cpu_ms_per_token"),
            "speedup_cpu": (b["decode_cpu_ms_per_token"] / a["decode_cpu_ms_per_token"]
                            if a.get("decode_cpu_ms_per_token") and b.get("decode_cpu_ms_per_token") else None),
            "retnet_state_mib": a["cache_bytes"] / MIB,
            "kv_cache_mib": b["cache_bytes"] / MIB,
            "cache_ratio": b["cache_bytes"] / a["cache_bytes"],
            "retnet_decode_mib": a["decode_memory_bytes"] / MIB,
            "transformer_decode_mib": b["decode_memory_bytes"] / MIB,
            "retnet_peak_mib": a["peak_bytes"] / MIB,
            "transformer_peak_mib": b["peak_bytes"] / MIB,
        })
    return rows


#: What a timing check says when it rests on a single round.
ONE_ROUND = "inconclusive (one round; rerun without --quick)"


def check_claims(results: list[dict[str, Any]], contexts: list[int], batch_context: int,
                 batch_sizes: list[int], rounds: int | None = None) -> dict[str, Any]:
    """The product's inference claims, evaluated on these measurements.

    A claim about time needs repeated rounds: from one round (``rounds=1``, ``--quick``), a
    single delayed process on a loaded machine decides it, so its ``holds`` is ``None`` and its
    ``verdict`` says "inconclusive". Claims about bytes (state, cache sizes) do not vary and
    always get a verdict. ``statistic`` names the figure each timing claim compares.
    """
    claims: dict[str, Any] = {}
    one_round = rounds == 1
    retnet_statistic = ("median decode ms/step over the timed steps" + (
        f", the median of {rounds} interleaved rounds" if rounds and rounds > 1 else ", one round"))
    retnet = [r for c in contexts if (r := _find(results, "retnet", c, 1)) is not None]
    if len(retnet) >= 2:
        times = [r["decode_ms_per_token"] for r in retnet]
        first, last = retnet[0], retnet[-1]
        claims["retnet_decode_change"] = {
            "from_context": first["context"], "to_context": last["context"],
            "ms_first": first["decode_ms_per_token"], "ms_last": last["decode_ms_per_token"],
            "relative_change": last["decode_ms_per_token"] / first["decode_ms_per_token"] - 1,
            "max_over_min": max(times) / min(times),
            "holds": abs(last["decode_ms_per_token"] / first["decode_ms_per_token"] - 1) < 0.10,
            "statistic": retnet_statistic,
        }
        cpu: list[float] = [r["decode_cpu_ms_per_token"] for r in retnet
                            if r.get("decode_cpu_ms_per_token") is not None]
        if len(cpu) == len(retnet):
            claims["retnet_decode_change"].update({
                "cpu_ms_first": cpu[0], "cpu_ms_last": cpu[-1],
                "cpu_relative_change": cpu[-1] / cpu[0] - 1,
                "cpu_max_over_min": max(cpu) / min(cpu),
                "holds_cpu": abs(cpu[-1] / cpu[0] - 1) < 0.10,
            })
        _settle(claims["retnet_decode_change"], one_round, ("holds", "holds_cpu"))
        claims["retnet_state_flat"] = {
            "state_bytes": sorted({r["cache_bytes"] for r in retnet}),
            "holds": len({r["cache_bytes"] for r in retnet}) == 1,
        }
        mems = [r["decode_memory_bytes"] for r in retnet]
        claims["retnet_decode_memory"] = {
            "mib_by_context": {str(r["context"]): r["decode_memory_bytes"] / MIB for r in retnet},
            "max_over_min": max(mems) / min(mems),
            "peak_incl_prefill_mib_by_context": {str(r["context"]): r["peak_bytes"] / MIB for r in retnet},
        }
    rows = [r for r in comparisons(results) if r["context"] >= 8192]
    if rows:
        claims["speedup_at_8k_plus"] = {
            "by_config": [{"context": r["context"], "batch": r["batch"], "speedup": r["speedup"]} for r in rows],
            "min": min(r["speedup"] for r in rows),
            "max": max(r["speedup"] for r in rows),
            "min_cpu": min((r["speedup_cpu"] for r in rows if r["speedup_cpu"]), default=None),
            "holds_for": [[r["context"], r["batch"]] for r in rows if r["speedup"] >= 5.0],
            "statistic": "ratio of median decode ms/step, one run per configuration",
        }
        _settle(claims["speedup_at_8k_plus"], one_round, ("holds_for",))
        at8k = [r for r in rows if r["context"] == 8192]
        if at8k:
            claims["state_vs_kv_cache_at_8k"] = {
                "ratio_by_batch": {str(r["batch"]): r["cache_ratio"] for r in at8k},
                "holds": all(r["cache_ratio"] >= 3.0 for r in at8k),
            }
    return claims


def _settle(claim: dict[str, Any], one_round: bool, keys: tuple[str, ...]) -> None:
    """Give a timing claim its verdict, or mark it inconclusive (``keys`` set to None)."""
    if one_round:
        claim.update({k: None for k in keys if k in claim}, verdict=ONE_ROUND)
    elif "holds" in claim:
        claim["verdict"] = "holds" if claim["holds"] else "does not hold"


def _plot(results: list[dict[str, Any]], contexts: list[int], batch_sizes: list[int],
          batch_context: int, models: list[str], out: Path, title: str) -> list[str]:
    plt = common.pyplot()
    if plt is None:
        return []
    written = []
    for sweep, xs, xlabel in (("context", contexts, "context length (tokens)"),
                              ("batch", batch_sizes, f"batch size (context {batch_context})")):
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for model in models:
            pts = [(x, r) for x in xs if (r := _find(results, model, x, 1) if sweep == "context"
                                          else _find(results, model, batch_context, x)) is not None]
            if not pts:
                continue
            x = [p[0] for p in pts]
            kw = {"color": COLORS[model], "marker": "o", "label": LABELS[model]}
            axes[0].plot(x, [p[1]["decode_memory_bytes"] / MIB for p in pts], **kw)
            axes[0].plot(x, [p[1]["cache_bytes"] / MIB for p in pts], color=COLORS[model],
                         marker="x", linestyle="--",
                         label="RetNet state" if model == "retnet" else "KV cache")
            axes[1].plot(x, [p[1]["decode_tokens_per_s"] for p in pts], **kw)
            axes[2].plot(x, [p[1]["decode_ms_per_token"] for p in pts], **kw)
        for ax, ylabel in zip(axes, ("memory while decoding / cache (MiB)", "decode throughput (tokens/s)",
                                     "latency (ms per decode step)"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7)
        axes[2].legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        name = f"inference_vs_{sweep}.png"
        common.save_figure(fig, out / name)
        written.append(name)
    return written


def _markdown(data: dict[str, Any], out: Path) -> None:
    cols = [("model", "model"), ("context", "context"), ("batch", "batch"),
            ("prefill_s", "prefill (s)"), ("decode_ms_per_token", "decode ms/step"),
            ("decode_tokens_per_s", "tokens/s"), ("decode_cpu_ms_per_token", "CPU ms/step"),
            ("cache_mib", "state / KV cache (MiB)"),
            ("weights_mib", "weights (MiB)"), ("decode_mib", "decode memory (MiB)"),
            ("peak_mib", "peak incl. prefill (MiB)")]
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append({"model": r["model"], "context": r["context"], "batch": r["batch"],
                         "prefill_s": r["error"][:80]})
            continue
        rows.append({**r, "cache_mib": r["cache_bytes"] / MIB, "weights_mib": r["weights_bytes"] / MIB,
                     "peak_mib": r["peak_bytes"] / MIB, "decode_mib": r["decode_memory_bytes"] / MIB})
    cmp_cols = [("context", "context"), ("batch", "batch"), ("retnet_ms", "RetNet ms/step"),
                ("transformer_ms", "Transformer ms/step"), ("speedup", "speed-up"),
                ("retnet_cpu_ms", "RetNet CPU ms/step"), ("transformer_cpu_ms", "Transformer CPU ms/step"),
                ("speedup_cpu", "speed-up (CPU time)"),
                ("retnet_state_mib", "RetNet state (MiB)"), ("kv_cache_mib", "KV cache (MiB)"),
                ("cache_ratio", "KV / state"), ("retnet_decode_mib", "RetNet decode mem (MiB)"),
                ("transformer_decode_mib", "Transformer decode mem (MiB)"),
                ("retnet_peak_mib", "RetNet peak (MiB)"),
                ("transformer_peak_mib", "Transformer peak (MiB)")]
    s = data["setup"]
    setup = (f"RetNet preset `{s['preset']}` ({s['parameters'].get('retnet') or 0:,} parameters) vs Llama "
             f"({s['parameters'].get('transformer') or 0:,} parameters, transformers "
             f"{s['kv_cache'].title()}Cache), {s['dtype']}, {s['steps']} timed "
             f"decode steps after {s['warmup_steps']} untimed ones: ms/step is the median over those steps (the "
             f"lowest median of four blocks of them is `decode_ms_best_block`; RetNet's batch-1 "
             f"sweep: the run with the median of that figure among {s.get('rounds', 1)} interleaved runs); memory "
             f"{'isolated per configuration (fresh process)' if s['isolate'] == 'subprocess' else 'NOT isolated (one process)'}.\n")
    sections = [("Setup", setup),
                ("RetNet vs Transformer", common.markdown_table(comparisons(data["results"]), cmp_cols)),
                ("All measurements", common.markdown_table(rows, cols)),
                ("Claims", "```json\n" + json.dumps(data["claims"], indent=2) + "\n```\n")]
    common.write_markdown(out / "inference.md", "Inference benchmark", data["machine"], data["command"], sections)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype)
    common.configure_threads(args.threads)
    quick = args.quick
    preset = args.preset if not quick or args.preset != "small" else "tiny"
    contexts = args.contexts if args.contexts is not None else ([128, 512] if quick else [512, 1024, 2048, 4096, 8192, 16384])
    batch_sizes = args.batch_sizes if args.batch_sizes is not None else ([1, 2] if quick else [1, 2, 4, 8, 16])
    batch_context = common.count(args.batch_context, 512 if quick else 8192, "--batch-context")
    steps = common.count(args.steps, 8 if quick else 48, "--steps")
    warmup = args.warmup_steps if args.warmup_steps is not None else (2 if quick else 4)
    isolate = args.isolate or ("none" if quick else "subprocess")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise ValueError(f"--models must be a comma-separated subset of {MODELS}, got {args.models!r}")
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    if steps < 1 or warmup < 0 or batch_context < 1 or rounds < 1:
        raise ValueError("--steps must be >= 1, --warmup-steps >= 0, --batch-context >= 1 and --rounds >= 1")
    common.positive_float(args.max_cache_gib, "--max-cache-gib")
    out = common.prepare_out(args.out)
    models = common.without_missing_transformer(models, "measuring")
    machine = common.machine_info(device)  # before measuring: its load average is "at start"

    configs = [(c, 1) for c in contexts] + [(batch_context, b) for b in batch_sizes]
    configs = list(dict.fromkeys(configs))  # (batch_context, 1) may be in both sweeps
    results: list[dict[str, Any]] = []

    def run(model: str, context: int, batch: int) -> dict[str, Any]:
        job = {"model": model, "preset": preset, "context": context, "batch": batch,
               "steps": steps, "warmup_steps": warmup, "device": args.device,
               "dtype": args.dtype, "seed": args.seed, "threads": args.threads,
               "kv_cache": args.kv_cache, "compile_decode": args.compile_decode}
        result: dict[str, Any]
        if model == "transformer" and kv_cache_estimate(preset, context, batch, dtype) > args.max_cache_gib * 2**30:
            result = {"model": model, "context": context, "batch": batch,
                      "error": f"skipped: KV cache over --max-cache-gib {args.max_cache_gib}"}
        elif isolate == "subprocess":
            result = {"model": model, "context": context, "batch": batch, **common.run_worker(MODULE, job)}
        else:
            result = measure(job)
        msg = result.get("error") or (f"prefill {result['prefill_s']:.2f} s, "
                                      f"{result['decode_ms_per_token']:.2f} ms/step, "
                                      f"peak {result['peak_bytes'] / MIB:.0f} MiB")
        print(f"[inference] {model:11s} context {context:6d} batch {batch:3d}: {msg}", flush=True)
        return result

    for context, batch in configs:
        # Both models back to back, so that a busy spell on a shared machine hits both alike.
        for model in models:
            results.append(run(model, context, batch))
    if "retnet" in models and rounds > 1:
        # RetNet's step is ~1 ms, and the host's noise between processes is of the order of the
        # flatness claim's 10% bound: repeat the context sweep, the order rotating, keep medians.
        repeats: dict[int, list[dict[str, Any]]] = {c: [] for c in contexts}
        for r in range(1, rounds):
            for context in contexts[r % len(contexts):] + contexts[: r % len(contexts)]:
                repeats[context].append(run("retnet", context, 1))
        for i, result in enumerate(results):
            if result["model"] == "retnet" and result["batch"] == 1 and result["context"] in repeats:
                results[i] = median_run([result, *repeats[result["context"]]])

    params = {m: next((r["parameters"] for r in results if r["model"] == m and "parameters" in r), None)
              for m in MODELS}
    data: dict[str, Any] = {
        "benchmark": "inference",
        "command": common.command_line("inference", argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "setup": {"preset": preset, "config": common.retnet_config(preset).to_dict(),
                  "transformer_ffn": common.matched_llama_ffn(common.retnet_config(preset)),
                  "parameters": params, "dtype": args.dtype, "contexts": contexts,
                  "batch_sizes": batch_sizes, "batch_context": batch_context, "steps": steps,
                  "warmup_steps": warmup, "isolate": isolate, "models": models, "rounds": rounds,
                  "kv_cache": args.kv_cache,
                  "memory": "peak RSS of the process (CPU) / torch.cuda.max_memory_allocated (GPU)"},
        "results": results,
        "comparisons": comparisons(results),
        "claims": check_claims(results, contexts, batch_context, batch_sizes, rounds),
    }
    title = (f"RetNet vs Transformer decoding, preset {preset} "
             f"({params.get('retnet') or 0:,} params), {args.dtype}, {device}")
    data["plots"] = _plot(results, contexts, batch_sizes, batch_context, models, out, title)
    common.write_json(out / "inference.json", data)
    _markdown(data, out)
    print(f"[inference] wrote {out / 'inference.json'}, {out / 'inference.md'} and {len(data['plots'])} plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
