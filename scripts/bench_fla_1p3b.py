"""A real-size fla RetNet on this machine: fla-hub/retnet-1.3B-100B's config with random weights.

Builds the 1.3B checkpoint in fla's layout (bfloat16, sharded with an index; nothing is
downloaded), converts it with ``retnet convert --from fla``, then in a fresh process per dtype
loads it, prefills a 2,048-token prompt and decodes: load time, peak RSS while loading, prefill
tokens/s and decode ms/token, beside the memory floor (the weights' bytes over the streaming-read
bandwidth measured in the same process). Writes ``results.json`` and ``README.md`` to OUT.

Needs ~6-11 GB of memory: run it alone (``python scripts/bench_fla_1p3b.py``, with no other big job on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLA_1P3B = {
    "model_type": "retnet", "architectures": ["RetNetForCausalLM"], "hidden_size": 2048, "num_heads": 8,
    "num_hidden_layers": 24, "expand_k": 1, "expand_v": 2, "hidden_ratio": 2, "intermediate_size": None,
    "vocab_size": 32000, "hidden_act": "swish", "norm_eps": 1e-6, "elementwise_affine": True, "fuse_norm": True,
    "use_output_gate": True, "use_short_conv": False, "feature_map": None, "tie_word_embeddings": False,
    "attn_mode": "fused_chunk", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent at exec)."""
    return _status_mb("VmHWM")


def build_fla_checkpoint(directory: Path, max_shard_size: str, layers: int) -> int:
    """Random bfloat16 weights with fla's names and shapes; returns the parameter count."""
    import torch

    from yet_another_retnet.models.fla import fla_intermediate_size
    from yet_another_retnet.models.shards import save_sharded

    c = {**FLA_1P3B, "num_hidden_layers": layers}
    d, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    inner = fla_intermediate_size(d, c["hidden_ratio"], c["intermediate_size"])
    dv = d * c["expand_v"]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    tensors = {"model.embeddings.weight": rand(vocab, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            f"{p}attn_norm.weight": torch.ones(d, dtype=torch.bfloat16),
            f"{p}attn.q_proj.weight": rand(d, d), f"{p}attn.k_proj.weight": rand(d, d),
            f"{p}attn.v_proj.weight": rand(dv, d), f"{p}attn.g_proj.weight": rand(dv, d),
            f"{p}attn.o_proj.weight": rand(d, dv),
            f"{p}attn.g_norm_swish_gate.weight": torch.ones(dv // c["num_heads"], dtype=torch.bfloat16),
            f"{p}mlp_norm.weight": torch.ones(d, dtype=torch.bfloat16),
            f"{p}mlp.gate_proj.weight": rand(inner, d), f"{p}mlp.up_proj.weight": rand(inner, d),
            f"{p}mlp.down_proj.weight": rand(d, inner),
        })
    tensors["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    tensors["lm_head.weight"] = rand(vocab, d)
    directory.mkdir(parents=True, exist_ok=True)
    save_sharded(tensors, directory, max_shard_size)
    (directory / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    return sum(t.numel() for t in tensors.values())


def stream_bandwidth() -> float:
    """GB/s of a streaming read (a sum over a 1 GiB float32 tensor), best of 5."""
    import torch

    x = torch.ones(2**28)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def measure(directory: str, dtype_name: str, prompt: int, new_tokens: int) -> dict:
    """One dtype in this (fresh) process: load, prefill, decode."""
    import torch

    from yet_another_retnet import RetNet

    dtype = getattr(torch, dtype_name)
    before = rss_mb()
    t0 = time.perf_counter()
    model = RetNet.from_pretrained(directory, dtype=dtype)
    load_s = time.perf_counter() - t0
    load_peak = peak_mb()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(3, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model._forward(ids, None, "chunkwise", None, last_logits_only=True)
        prefill_s = time.perf_counter() - t0
        state, token = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(new_tokens):
            t0 = time.perf_counter()
            out = model(token, state=state)
            times.append(time.perf_counter() - t0)
            state, token = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
    bandwidth = stream_bandwidth()
    times.sort()
    return {
        "dtype": dtype_name, "weights_bytes": weight_bytes, "rss_before_load_mb": round(before, 1),
        "peak_rss_after_load_mb": round(load_peak, 1),
        "load_peak_over_weights": round((load_peak - before) * 2**20 / weight_bytes, 3),
        "load_s": round(load_s, 2), "prefill_tokens": prompt, "prefill_s": round(prefill_s, 2),
        "prefill_tokens_per_s": round(prompt / prefill_s, 1), "decode_tokens": new_tokens,
        "decode_ms_per_token_median": round(1000 * times[len(times) // 2], 1),
        "decode_ms_per_token_best": round(1000 * times[0], 1),
        "stream_read_gb_per_s": round(bandwidth, 1),
        "memory_floor_ms_per_token": round(1000 * weight_bytes / (bandwidth * 1e9), 1),
        "peak_rss_total_mb": round(peak_mb(), 1),
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor()


def markdown(result: dict) -> str:
    rows = "\n".join(
        f"| {r['dtype']} | {r['weights_bytes'] / 1e9:.2f} | {r['load_s']} | "
        f"{r['peak_rss_after_load_mb'] - r['rss_before_load_mb']:.0f} ({r['load_peak_over_weights']}x) | "
        f"{r['prefill_tokens_per_s']} | {r['decode_ms_per_token_median']} | {r['memory_floor_ms_per_token']} "
        f"({r['stream_read_gb_per_s']} GB/s) |" for r in result["runs"])
    return f"""# fla-hub/retnet-1.3B-100B's architecture on a CPU (random weights)

Command: `{result['command']}`; machine: {result['cpu']}, {result['threads']} threads, torch
{result['torch']}. {result['parameters']:,} parameters built in fla's layout ({result['shards']} bfloat16 shards with
an index), converted with `retnet convert --from fla` in {result['convert_s']} s (peak RSS of that
process {result['convert_peak_rss_mb']:.0f} MB), then loaded, prefilled and decoded in a fresh process per dtype.

| dtype | weights GB | load s | load peak RSS MB (x weights) | prefill tok/s (2,048) | decode ms/token | floor ms/token (read GB/s) |
|---|---|---|---|---|---|---|
{rows}

Load peak RSS is the process's peak after loading minus its RSS before (Python and torch).
The floor is the weights' bytes over the streaming-read bandwidth measured in the same process.
Caveat: other jobs shared this 2-core machine during the run, so wall-clock figures are noisy.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/fla-1.3b", help="where results.json and README.md go")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--layers", type=int, default=24, help="fewer for a smoke test (default: 24, the 1.3B)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated (default: bfloat16,float32)")
    parser.add_argument("--measure", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.prompt, args.new_tokens)))
        return 0
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="fla13b."))
    try:
        src, ours = work / "fla", work / "ours"
        params = build_fla_checkpoint(src, args.max_shard_size, args.layers)
        shards = len(list(src.glob("model-*.safetensors"))) or 1
        t0 = time.perf_counter()
        conv = subprocess.run([sys.executable, "-c", (
            "import sys; from yet_another_retnet.cli import main; rc = main(sys.argv[1:]); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print('PEAK', int(hwm) / 1024); sys.exit(rc)"),
            "convert", "--from", "fla", str(src), str(ours)], capture_output=True, text=True, check=True)
        convert_s = time.perf_counter() - t0
        convert_peak = float(conv.stdout.split("PEAK")[-1].strip())
        shutil.rmtree(src)
        runs = []
        for dtype in args.dtypes.split(","):
            done = subprocess.run([sys.executable, __file__, "--measure", str(ours), dtype, "--prompt", str(args.prompt),
                                   "--new-tokens", str(args.new_tokens)], capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python scripts/bench_fla_1p3b.py", "cpu": cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "parameters": params, "shards": shards,
        "convert_s": round(convert_s, 1), "convert_peak_rss_mb": convert_peak, "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": "random weights in fla's layout; other jobs shared the 2-core machine",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "README.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
