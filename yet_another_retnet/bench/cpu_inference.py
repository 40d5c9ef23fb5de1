"""CPU inference at real size: decoding in float32, bfloat16, int8 and int4 against each one's memory
floor, prompt prefill in float32 and bfloat16 against the products' peaks, and serving throughput.

    retnet bench cpu_inference            # the 1.3B configuration (d 2048, 8 heads, 24 layers,
                                          # vocab 32000), random weights: ~20 min on 2 cores
    retnet bench cpu_inference --quick    # a small model, well under a minute (CI smoke test)

Everything is measured side by side in one process:

* **Memory floor**: the time to move the bytes a decoding step must move - read every projection
  and the head in that variant's dtype, and read and write every layer's float32 state (at 1.3B,
  4 MB a layer: 192 MB a token, 15% of the int8 weights) - at the streaming read bandwidth
  measured just before each timing (the faster of ``torch.sum`` and the float32 gemv kernel over a
  buffer far larger than the caches; on a shared VM it drifts by 2x within minutes, so one figure
  at the start would not do): three rounds of the pair per point, the round with the median
  ratio reported (all three in the JSON). ``x floor`` is the step's time over that; ``x weights`` over the
  weights' time alone (the floor the issue first stated).
* **Decode**: ms per token at batch 1 with the state at position 2k and 16k (the decoding cost of
  a RetNet does not depend on what the state holds, only the rotation table's position does; the
  state is random, the prefill is measured separately). Each round times every context one after
  another, and the report gives each round's longest context over its shortest: flatness at one
  memory speed, where the rows' own times may come from different phases of the machine.
* **Prefill**: tokens/s for a prompt of each ``--prefill-contexts`` length: the float32 model, the
  float32 model with its products in bfloat16 (``ops/bf16_products.py``: oneDNN's bf16 products,
  float32 accumulation, where the CPU has AVX512-BF16/AMX) and the model cast to bfloat16, next to
  the peak GFLOP/s of a large square product in each dtype measured here.
* **Serving**: tokens/s of the continuous-batching engine (``serve/engine.py``, what
  ``retnet serve`` runs) with 16 concurrent requests against one.

Writes ``cpu_inference.json`` and ``cpu_inference.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import threading
import time
from typing import Any

import torch

from ..models import RetNet, RetNetConfig
from ..models.quantized import quantize_model
from ..models.retnet import RetNetState
from ..ops.bf16_products import bf16_products
from ..ops.cpu.gemv import gemv
from ..ops.cpu.matmul import mm_nt
from . import common

DEFAULT_OUT = "docs/results/cpu-inference"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = common.parser("retnet bench cpu_inference", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small model and short runs (CI smoke test)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    p.add_argument("--decode-contexts", type=common.positive_ints, default=None, metavar="N,N",
                   help="state positions for decoding (default: 2048,16384)")
    p.add_argument("--prefill-contexts", type=common.positive_ints, default=None, metavar="N,N",
                   help="prompt lengths for prefill (default: 2048,16384; quick: 512)")
    p.add_argument("--variants", default="float32,bfloat16,int8,int4", help="decoding variants (default: all four)")
    p.add_argument("--tokens", type=int, default=None, help="decoding steps timed per point (default: 16; quick: 8)")
    p.add_argument("--clients", type=int, default=16, help="concurrent requests in the serving run (default: 16)")
    p.add_argument("--serve-tokens", type=int, default=None, help="tokens per serving request (default: 16; quick: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return p.parse_args(argv)


def model_config(quick: bool) -> RetNetConfig:
    if quick:
        return common.retnet_config("small", vocab_size=32000, num_layers=2)
    return common.retnet_config("1.3b", vocab_size=32000)


def read_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Streaming read bandwidth in bytes/s over ``nbytes`` of float32: the best of ``repeats``
    passes of ``torch.sum`` and of the package's gemv (several streams through memory), whichever
    reads faster (``torch.sum`` alone underestimates it: one stream per thread)."""
    cols = 4096
    buf = torch.ones(nbytes // 4 // cols, cols)
    x = torch.ones(cols)
    best = float("inf")
    with torch.inference_mode():
        for read in (buf.sum, lambda: gemv(buf, x)):
            read()
            best = min([best] + [common.timed(read, torch.device("cpu"))[0] for _ in range(repeats)])
    return nbytes / best


def decode_bytes(model: RetNet) -> int:
    """Bytes of weights one decoding step reads: every projection and the head (not the embedding,
    of which a step reads one row)."""
    total = 0
    for name, t in model.state_dict().items():
        if name.startswith("embed_tokens"):
            continue
        total += t.numel() * t.element_size()  # a tied head is listed as lm_head.weight too
    return total


def state_bytes(model: RetNet, batch: int = 1) -> int:
    """Bytes of recurrent state one decoding step reads and writes: every layer's float32
    ``(batch, heads, dk, dv)`` memory, once each way."""
    return 2 * sum(m.numel() * m.element_size() for m in model.empty_state(batch).memories)


def product_peak(dtype: torch.dtype, n: int) -> float:
    """GFLOP/s of an ``n x n x n`` product in ``dtype``: the best of three, through ATen's
    ``torch.mm`` and through the package's ``mm_nt`` (oneDNN where it chose it), the faster."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for product in (lambda: torch.mm(a, b), lambda: mm_nt(a, b.t())):
            product()
            best = min([best] + [common.timed(product, torch.device("cpu"))[0] for _ in range(3)])
    return 2 * n**3 / best / 1e9


def time_decode(model: RetNet, position: int, tokens: int) -> float:
    """Median seconds per token of ``tokens`` batch-1 steps from a state at ``position``, stepped in
    place (:meth:`RetNet.step_`) as ``generate`` does."""
    state = model.empty_state(1)
    state = RetNetState([torch.randn_like(m) * 0.01 for m in state.memories], torch.tensor([position]))
    token = torch.tensor([1])
    times = []
    with torch.inference_mode():
        for i in range(tokens + 2):
            t0 = time.perf_counter()
            model.step_(token, state)
            if i >= 2:  # the first steps build the stacked tables and rotation cache
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_prefill(model: RetNet, length: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.prefill(ids[:, : min(length, 256)])
        t0 = time.perf_counter()
        model.prefill(ids)
        return time.perf_counter() - t0


def serve_throughput(model: RetNet, clients: int, tokens: int, prompt: int = 4,
                     **options: int) -> tuple[float, int]:
    """``(tokens/s, batched steps)`` of ``clients`` concurrent requests of a ``prompt``-token
    prompt and ``tokens`` sampled tokens each, submitted together to the engine (``options``: its
    constructor's, such as ``prefill_from``)."""
    from ..serve.engine import Engine, Request

    engine = Engine(model, max_batch=max(clients, 1), **options)
    done = threading.Semaphore(0)

    def emit(token: int | None, finish: str | None) -> None:
        if finish is not None:
            done.release()

    engine.start()
    try:
        engine.submit(Request([1, 2, 3], 2, emit, temperature=0))  # warm-up
        if not done.acquire(timeout=600):
            raise RuntimeError("serving warm-up timed out")
        steps, t0 = engine.steps, time.perf_counter()
        for i in range(clients):
            ids = [1 + (i + t) % 100 for t in range(prompt)]
            engine.submit(Request(ids, tokens, emit, temperature=1.0, seed=i))
        for _ in range(clients):
            if not done.acquire(timeout=1800):
                raise RuntimeError("serving run timed out")
        return clients * tokens / (time.perf_counter() - t0), engine.steps - steps
    finally:
        engine.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    common.configure_threads(args.threads)
    quick = args.quick
    config = model_config(quick)
    decode_contexts = args.decode_contexts if args.decode_contexts is not None else ([512, 4096] if quick else [2048, 16384])
    prefill_contexts = args.prefill_contexts if args.prefill_contexts is not None else ([512] if quick else [2048, 16384])
    tokens = common.count(args.tokens, 8 if quick else 16, "--tokens")
    rounds_per_point = 1 if quick else 3
    serve_tokens = common.count(args.serve_tokens, 8 if quick else 16, "--serve-tokens")
    clients = common.count(args.clients, 16, "--clients")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants:
        raise common.UsageError(f"--variants names no variant (got {args.variants!r}); choose from "
                                "float32, bfloat16, int8, int4")
    for v in variants:
        if v not in ("float32", "bfloat16", "int8", "int4"):
            raise ValueError(f"--variants: unknown variant {v!r} (float32, bfloat16, int8, int4)")
    from ..models.retnet import count_parameters

    result: dict[str, Any] = {"machine": common.machine_info(torch.device("cpu")), "config": config.to_dict(),
                              "parameters": count_parameters(config), "quick": quick}
    probe = 256 << 20 if quick else 1 << 30
    bandwidth = read_bandwidth(probe)
    result["read_bandwidth_gb_s"] = bandwidth / 1e9
    result["product_peak_gflops"] = {"float32": product_peak(torch.float32, 1024 if quick else 2048),
                                     "bfloat16": product_peak(torch.bfloat16, 1024 if quick else 2048)}
    decode: list[dict[str, Any]] = []
    flatness: list[dict[str, Any]] = []
    prefill: list[dict[str, Any]] = []
    # One variant at a time, each built on its own (random weights) and dropped after use: at
    # 1.3B the float32 model alone is 5.4 GB; the int8 one is quantized from a bfloat16 build, so
    # a run without float32 stays under ~3 GB.
    for variant in variants:
        torch.manual_seed(0)
        if variant == "float32":
            model = RetNet(config).eval()
        elif variant == "bfloat16":
            model = RetNet(config, dtype=torch.bfloat16).eval()
        else:
            model = quantize_model(RetNet(config, dtype=torch.bfloat16), variant).float()
        gc.collect()
        nbytes, sbytes = decode_bytes(model), state_bytes(model)
        # Rounds of (the bandwidth of this moment, then the decoding timing beside it), the
        # contexts interleaved within each round; a row is the round with the median ratio of the
        # two. Side by side, a round's longest context over its shortest shows whether decoding
        # stays flat, whatever the machine's memory speed did between rounds.
        rounds: dict[int, list[tuple[float, float, float]]] = {p: [] for p in decode_contexts}
        for _ in range(rounds_per_point):
            for position in decode_contexts:
                here = read_bandwidth(probe)
                seconds = time_decode(model, position, tokens)
                rounds[position].append((seconds / ((nbytes + sbytes) / here), seconds, here))
        for position in decode_contexts:
            _, seconds, here = sorted(rounds[position])[len(rounds[position]) // 2]
            floor = (nbytes + sbytes) / here
            decode.append({"variant": variant, "context": position, "ms_per_token": seconds * 1e3,
                           "tokens_per_s": 1 / seconds, "weight_bytes": nbytes, "state_bytes": sbytes,
                           "read_bandwidth_gb_s": here / 1e9, "floor_ms": floor * 1e3, "x_floor": seconds / floor,
                           "x_weights_floor": seconds / (nbytes / here),
                           "rounds": [{"ms_per_token": t * 1e3, "read_bandwidth_gb_s": b / 1e9, "x_floor": x}
                                      for x, t, b in rounds[position]]})
            print(json.dumps(decode[-1]), flush=True)
        if len(decode_contexts) > 1:
            short, long = min(decode_contexts), max(decode_contexts)
            ratios = [b[1] / a[1] for a, b in zip(rounds[short], rounds[long], strict=True)]
            flatness.append({"variant": variant, "short": short, "long": long,
                             "ratio": statistics.median(ratios), "rounds": ratios})
            print(json.dumps(flatness[-1]), flush=True)
        if variant not in ("int8", "int4"):
            for length in prefill_contexts:
                runs = [(variant, False)] + ([("float32 + bf16 products", True)] if variant == "float32" else [])
                for name, products in runs:
                    with bf16_products(products) as on:
                        if products and not on:
                            continue  # no bf16 units here
                        seconds = time_prefill(model, length)
                    prefill.append({"variant": name, "context": length, "seconds": seconds,
                                    "tokens_per_s": length / seconds})
                    print(json.dumps(prefill[-1]), flush=True)
        if variant == ("int8" if "int8" in variants else variants[0]):
            result["serve"] = {"variant": variant, "tokens_per_request": serve_tokens, "clients": clients,
                               "one_client_tokens_per_s": serve_throughput(model, 1, serve_tokens)[0],
                               "many_clients_tokens_per_s": serve_throughput(model, clients, serve_tokens)[0]}
            print(json.dumps(result["serve"]), flush=True)
        del model
    result["decode"], result["decode_flatness"], result["prefill"] = decode, flatness, prefill
    gc.collect()
    return result


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    kind = f" ({m['cpu_kind']})" if m.get("cpu_kind") else ""
    lines = [f"# CPU inference at d {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads, vocab {c['vocab_size']}"
             f" ({result['parameters'] / 1e6:,.0f}M parameters, random weights)", "",
             f"Measured {m['date']} on {m['cpu']}{kind} ({m['torch_threads']} threads, load average {m['load_average_1m']} "
             f"at the start: other jobs shared the machine), torch {m['torch']}. Command: "
             f"`{result['command']}`.", "",
             f"Streaming read bandwidth at the start: {result['read_bandwidth_gb_s']:.1f} GB/s; each decoding row "
             "measures it again just before its timing (its own column: the round with the median ratio of "
             "three; all rounds in the JSON).", "",
             "## Decoding, batch 1", "",
             "The floor moves the weights once and each layer's float32 state in and out: (weights + state) / "
             "bandwidth. `x weights` compares with the weights' time alone.", "",
             "| variant | context | ms/token | tokens/s | weights (MB) | state in+out (MB) | GB/s | floor (ms) "
             "| x floor | x weights |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["decode"]:
        lines.append(f"| {r['variant']} | {r['context']} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.2f} | "
                     f"{r['weight_bytes'] / 1e6:,.0f} | {r['state_bytes'] / 1e6:,.0f} | "
                     f"{r['read_bandwidth_gb_s']:.1f} | {r['floor_ms']:.2f} | {r['x_floor']:.2f} | "
                     f"{r['x_weights_floor']:.2f} |")
    if result.get("decode_flatness"):
        lines += ["", "Flat in context: each round times every context one after another, so a round's longest "
                  "context over its shortest compares them at one memory speed.", "",
                  "| variant | contexts | time ratio (median) | each round |", "|---|---|---:|---|"]
        for f in result["decode_flatness"]:
            lines.append(f"| {f['variant']} | {f['long']} / {f['short']} | {f['ratio']:.3f} | "
                         f"{', '.join(f'{x:.3f}' for x in f['rounds'])} |")
    peaks = result["product_peak_gflops"]
    lines += ["", "## Prefill, batch 1", "",
              f"Product peaks measured here: float32 {peaks['float32']:.0f} GFLOP/s, bfloat16 {peaks['bfloat16']:.0f} GFLOP/s.", "",
              "| variant | prompt | seconds | tokens/s |", "|---|---:|---:|---:|"]
    for r in result["prefill"]:
        lines.append(f"| {r['variant']} | {r['context']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |")
    s = result["serve"]
    many = s["many_clients_tokens_per_s"]
    lines += ["", "## Serving (continuous batching engine)", "",
              f"{s['variant']} weights, {s['tokens_per_request']} tokens per request: one client "
              f"{s['one_client_tokens_per_s']:.2f} tokens/s, {s['clients']} concurrent clients {many:.2f} tokens/s "
              f"({many / s['one_client_tokens_per_s']:.1f}x).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = common.prepare_out(args.out)  # an --out that is a file: found before measuring
    result = {"command": common.command_line("cpu_inference", argv), **run(args)}
    # The markdown is rendered before anything is written, and both files are written atomically:
    # a failure leaves the previous pair, never a JSON without its markdown.
    text = markdown(result)
    common.write_text(out / "cpu_inference.md", text)
    common.write_text(out / "cpu_inference.json", json.dumps(result, indent=2))
    print(text)
    return 0
