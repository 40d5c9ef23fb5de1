"""``retnet bench training``: training throughput and memory over sequence length.

Forward + backward (next-token cross entropy on random tokens; no optimizer step, which costs the
same for models of equal size) for RetNet in parallel and chunkwise form and for a Transformer of
the same width, depth and parameter count (Hugging Face ``LlamaForCausalLM`` with SDPA attention).
Each (model, length) runs in a fresh process, so that its peak RSS is its own; the reported
"activation memory" is that peak minus the resident memory just before the first step (weights,
gradients' buffers not yet allocated, libraries).
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

MODULE = "yet_another_retnet.bench.training"
MODELS = ("retnet-parallel", "retnet-chunkwise", "transformer")
LABELS = {"retnet-parallel": "RetNet parallel", "retnet-chunkwise": "RetNet chunkwise",
          "transformer": "Transformer (Llama, SDPA)"}
COLORS = {"retnet-parallel": "tab:orange", "retnet-chunkwise": "tab:red", "transformer": "tab:blue"}
MIB = 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser(
        "retnet bench training",
        description="Training (forward + backward) tokens/s and peak memory over sequence length: "
                    "RetNet parallel and chunkwise vs a same-size Transformer.",
    )
    common.add_common_args(parser, default_out="bench-results/training", default_preset="small")
    parser.add_argument("--lengths", type=common.positive_ints, default=None,
                        help="sequence lengths (default: 512,1024,2048,4096,8192,16384)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default: 1)")
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="chunk length of the chunkwise form (default: the config's, 512)")
    parser.add_argument("--max-parallel-length", type=int, default=4096,
                        help="longest length for RetNet's parallel form (its memory is quadratic)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default: 3)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--isolate", choices=("subprocess", "none"), default=None,
                        help="a fresh process per configuration (default) or none (default with --quick)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One (model, length) configuration: median seconds of a forward+backward step, peak memory."""
    device = common.resolve_device(job["device"])
    dtype = common.resolve_dtype(job["dtype"])
    common.configure_threads(job.get("threads"))
    config = common.retnet_config(job["preset"])
    kind, length, batch = job["model"], job["length"], job["batch"]
    gen = torch.Generator().manual_seed(job["seed"] + 1)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=gen).to(device)
    model: torch.nn.Module
    if kind == "transformer":
        model = common.build_llama(config, device, dtype, seed=job["seed"]).train()

        def loss_fn() -> torch.Tensor:
            return model(ids, labels=ids, use_cache=False).loss
    else:
        from ..models.retnet import RetNet

        torch.manual_seed(job["seed"])
        model = RetNet(config, device=device, dtype=dtype).train()
        mode = kind.split("-", 1)[1]
        chunk = job.get("chunk_size")

        def loss_fn() -> torch.Tensor:
            out = model(ids, mode=mode, chunk_size=chunk, labels=ids)
            assert out.loss is not None
            return out.loss

    def step() -> None:
        model.zero_grad(set_to_none=False)
        loss_fn().backward()

    # Warm-up on a short input first (one-time costs), then allocate the gradients.
    rss_ready = common.current_rss()
    common.reset_peak_memory(device)
    step()  # warm-up
    both = [common.timed_both(step, device) for _ in range(job["repeats"])]
    seconds = statistics.median(b[0] for b in both)
    cpu_seconds = statistics.median(b[1] for b in both) if device.type == "cpu" else None
    tokens = batch * length
    return {
        "model": kind, "length": length, "batch": batch,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        # Per CPU second (one torch thread: the work itself, steadier on a shared machine).
        "tokens_per_cpu_s": tokens / cpu_seconds if cpu_seconds else None,
        "parameters": common.num_parameters(model),
        "weights_bytes": common.module_bytes(model),
        "rss_ready_bytes": rss_ready,
        "peak_bytes": common.peak_memory(device),
        "activation_bytes": common.peak_memory(device) - (rss_ready if device.type == "cpu" else 0),
    }


def _find(results: list[dict[str, Any]], model: str, length: int) -> dict[str, Any] | None:
    for r in results:
        if r["model"] == model and r["length"] == length and "error" not in r:
            return r
    return None


def check_claims(results: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Chunkwise: throughput at the longest length vs at 1k; memory per token over length."""
    claims: dict[str, Any] = {}
    rows = [r for n in lengths if (r := _find(results, "retnet-chunkwise", n)) is not None]
    base = next((r for r in rows if r["length"] == 1024), rows[0] if rows else None)
    if base is not None and rows[-1]["length"] > base["length"]:
        last = rows[-1]
        claims["chunkwise_throughput_kept"] = {
            "from_length": base["length"], "to_length": last["length"],
            "tokens_per_s_from": base["tokens_per_s"], "tokens_per_s_to": last["tokens_per_s"],
            "ratio": last["tokens_per_s"] / base["tokens_per_s"],
            "holds": last["tokens_per_s"] >= 0.8 * base["tokens_per_s"],
        }
        if base.get("tokens_per_cpu_s") and last.get("tokens_per_cpu_s"):
            claims["chunkwise_throughput_kept"].update({
                "tokens_per_cpu_s_from": base["tokens_per_cpu_s"],
                "tokens_per_cpu_s_to": last["tokens_per_cpu_s"],
                "ratio_cpu": last["tokens_per_cpu_s"] / base["tokens_per_cpu_s"],
                "holds_cpu": last["tokens_per_cpu_s"] >= 0.8 * base["tokens_per_cpu_s"],
            })
        per_token = {str(r["length"]): r["activation_bytes"] / (r["length"] * r["batch"]) for r in rows}
        longer = [r for r in rows if r["length"] >= 2048]
        claims["chunkwise_memory_linear"] = {
            "activation_bytes_per_token": per_token,
            # Linear growth: the bytes per token settle to a constant (short lengths carry
            # fixed costs such as the gradient buffers, so they read higher).
            "per_token_max_over_min_from_2k": (max(r["activation_bytes"] / r["length"] for r in longer)
                                               / min(r["activation_bytes"] / r["length"] for r in longer))
            if len(longer) >= 2 else None,
        }
    ts = [r for n in lengths if (r := _find(results, "transformer", n)) is not None]
    if ts and rows:
        claims["chunkwise_vs_transformer_tokens_per_s"] = {
            str(r["length"]): c["tokens_per_s"] / r["tokens_per_s"]
            for r in ts if (c := _find(results, "retnet-chunkwise", r["length"])) is not None
        }
    return claims


def _plot(results: list[dict[str, Any]], lengths: list[int], models: list[str], out: Path,
          title: str) -> list[str]:
    plt = common.pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for model in models:
        pts = [(n, r) for n in lengths if (r := _find(results, model, n)) is not None]
        if not pts:
            continue
        x = [p[0] for p in pts]
        kw = {"color": COLORS[model], "marker": "o", "label": LABELS[model]}
        axes[0].plot(x, [p[1]["tokens_per_s"] for p in pts], **kw)
        axes[1].plot(x, [p[1]["activation_bytes"] / MIB for p in pts], **kw)
    for ax, ylabel in zip(axes, ("training tokens/s (fwd + bwd)", "activation memory (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log", base=2)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, out / "training.png")
    return ["training.png"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(measure(json.loads(args.worker))), flush=True)
        return 0
    device = common.resolve_device(args.device)
    common.resolve_dtype(args.dtype)
    common.configure_threads(args.threads)
    preset = args.preset if not args.quick or args.preset != "small" else "tiny"
    lengths = args.lengths if args.lengths is not None else ([256, 1024] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    repeats = common.count(args.repeats, 1 if args.quick else 3, "--repeats")
    isolate = args.isolate or ("none" if args.quick else "subprocess")
    chunk = common.count(args.chunk_size, 128, "--chunk-size") if args.chunk_size is not None or args.quick else None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        raise ValueError(f"--models must be a comma-separated subset of {MODELS}, got {args.models!r}")
    if args.batch < 1 or repeats < 1:
        raise ValueError("--batch and --repeats must be >= 1")
    out = common.prepare_out(args.out)
    models = common.without_missing_transformer(models, "measuring")
    machine = common.machine_info(device)  # before measuring: its load average is "at start"
    results: list[dict[str, Any]] = []
    for length in lengths:
        for model in models:
            job = {"model": model, "preset": preset, "length": length, "batch": args.batch,
                   "repeats": repeats, "chunk_size": chunk, "device": args.device,
                   "dtype": args.dtype, "seed": args.seed, "threads": args.threads}
            if model == "retnet-parallel" and length > args.max_parallel_length:
                result = {"model": model, "length": length, "batch": args.batch,
                          "error": f"skipped: longer than --max-parallel-length {args.max_parallel_length}"}
            elif isolate == "subprocess":
                result = {"model": model, "length": length, "batch": args.batch,
                          **common.run_worker(MODULE, job)}
            else:
                result = measure(job)
            results.append(result)
            msg = result.get("error") or (f"{result['tokens_per_s']:.0f} tokens/s, activations "
                                          f"{result['activation_bytes'] / MIB:.0f} MiB")
            print(f"[training] {model:16s} length {length:6d}: {msg}", flush=True)

    params = {m: next((r["parameters"] for r in results if r["model"] == m and "parameters" in r), None)
              for m in models}
    config = common.retnet_config(preset)
    data: dict[str, Any] = {
        "benchmark": "training",
        "command": common.command_line("training", argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "setup": {"preset": preset, "config": config.to_dict(), "parameters": params,
                  "transformer_ffn": common.matched_llama_ffn(config), "dtype": args.dtype,
                  "lengths": lengths, "batch": args.batch, "repeats": repeats,
                  "chunk_size": chunk or config.chunk_size, "isolate": isolate,
                  "memory": "activation memory = peak RSS - RSS before the first step (CPU); "
                            "torch.cuda.max_memory_allocated (GPU)"},
        "results": results,
        "claims": check_claims(results, lengths),
    }
    title = f"Training, preset {preset}, batch {args.batch}, {args.dtype}, {device}"
    data["plots"] = _plot(results, lengths, models, out, title)
    common.write_json(out / "training.json", data)
    rows = []
    for r in results:
        row = dict(r)
        if "error" not in r:
            row.update(peak_mib=r["peak_bytes"] / MIB, activation_mib=r["activation_bytes"] / MIB)
        else:
            row["step_s"] = r["error"][:60]
        rows.append(row)
    cols = [("model", "model"), ("length", "length"), ("batch", "batch"), ("step_s", "step (s)"),
            ("tokens_per_s", "tokens/s"), ("tokens_per_cpu_s", "tokens per CPU s"),
            ("activation_mib", "activation memory (MiB)"),
            ("peak_mib", "peak RSS (MiB)")]
    setup = (f"RetNet preset `{preset}` ({params.get('retnet-chunkwise') or params.get('retnet-parallel')} "
             f"parameters), Transformer {params.get('transformer')} parameters, chunk "
             f"{chunk or config.chunk_size}, median of {repeats} steps after one warm-up step.\n")
    common.write_markdown(out / "training.md", "Training benchmark", data["machine"], data["command"],
                          [("Setup", setup), ("Results", common.markdown_table(rows, cols)),
                           ("Claims", "```json\n" + json.dumps(data["claims"], indent=2) + "\n```\n")])
    print(f"[training] wrote {out / 'training.json'}, {out / 'training.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
