"""``python -m yet_another_retnet.bench.gpu``: the GPU benchmark (JSON + Markdown).

Three sections, all in bfloat16 on one CUDA device:

- ``kernels``: chunkwise retention forward + backward, tokens/s, for our Triton kernels (the default
  split schedule, and the fused one), our plain PyTorch form, flash-linear-attention's ``chunk_retention`` (where installed) and
  ``F.scaled_dot_product_attention`` with the flash backend (causal), at key head dims 128 and 256
  (as many heads as make a width of 2,048; value dim = key dim), lengths 2k to 32k, 32k tokens per
  call (batch = 32k / length). The decay is Eq. 8 (the only one fla takes).
- ``training``: tokens/s of a full training step (forward, backward, AdamW) under bf16 autocast at
  the layer sizes of fla's 1.3B RetNet (d 2,048, 24 layers, 8 heads, key dim 256, value dim 512,
  SwiGLU FFN 2,816, RMS norms, vocab 32,000) against Hugging Face Llama of the same width, depth,
  heads and parameter count with SDPA attention; model-FLOPs utilisation counted as in
  docs/performance.md, over the measured rate of an 8,192^3 bf16 matrix product (and, for
  reference, over H100 SXM's datasheet 989 TFLOP/s).
- ``decode``: ms per generated token at that size, bf16 weights, RetNet's recurrent step (eager,
  and replayed as one CUDA graph) against Llama with a KV cache (eager), after a prefill of the
  context: batch 1 at 8k and 32k, batch 16 at 8k.

``--quick`` runs every code path at toy sizes, on CPU too (what the CI smoke test runs; its
numbers mean nothing). Targets and how to run: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models import RetNet, RetNetConfig
from ..models.cuda_graph import GraphedDecoder
from ..ops import backends, retention_chunkwise
from ..ops import triton as our_triton
from ..ops.triton._load import environment
from ..ops.triton.chunkwise import SCHEDULE_ENV
from . import common

MODULE = "yet_another_retnet.bench.gpu"
#: H100 SXM5 dense bf16 tensor-core peak (datasheet), FLOP/s: a second denominator for utilisation.
H100_BF16_PEAK = 989e12
SECTIONS = ("kernels", "training", "decode")
#: In the order they run (fla and flash attention straight after ours, so that a row cut by the time
#: budget is a less important one). ``ours-triton-fused``: our kernels' other schedule.
IMPLS = ("ours-triton", "fla", "sdpa-flash", "ours-torch", "ours-triton-fused")


def fla_13b_config(**overrides: Any) -> RetNetConfig:
    """Our RetNet at the layer sizes of fla's ``retnet-1.3B`` (see the module doc)."""
    fields: dict[str, Any] = {
        "vocab_size": 32000, "d_model": 2048, "num_heads": 8, "num_layers": 24, "ffn_dim": 2816,
        "value_factor": 2.0, "dropout": 0.0, "ffn": "glu", "activation": "swish", "block_norm": "rmsnorm",
        "head_norm": "rmsnorm", "tie_embeddings": False, "chunk_size": 64,
    }
    fields.update(overrides)
    return RetNetConfig(**fields)


def quick_config() -> RetNetConfig:
    return fla_13b_config(vocab_size=128, d_model=64, num_heads=2, num_layers=2, ffn_dim=96, chunk_size=16)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` (device synchronised around each call), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        fn()
        common.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured FLOP/s of a ``size``^3 matrix product (random data, output preallocated)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.matmul(a, b, out=out), device, 2, 5)
    return 2 * size**3 / seconds


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _retention_call(impl: str, chunk: int) -> Callable[..., Any]:
    backend = {"ours-triton": "triton", "ours-triton-fused": "triton", "ours-torch": "torch", "fla": "fla"}[impl]
    schedule = "fused" if impl == "ours-triton-fused" else "split"

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # The schedule is read when the forward runs; the backward belongs to that forward.
        with environment(SCHEDULE_ENV, schedule):
            return retention_chunkwise(q, k, v, None, chunk, decay="eq8", backend=backend)[0]

    return run


def _sdpa_call(device: torch.device) -> Callable[..., Any]:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def impl_unavailable(impl: str, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device`` (``None``: it can)."""
    if impl == "fla":
        if device.type != "cuda":
            return "fla's kernels need a GPU"
        if not backends.fla_available():
            return "flash-linear-attention not installed"
    if impl.startswith("ours-triton"):
        if our_triton.triton_problem() is not None:
            return our_triton.triton_problem()
        if device.type != "cuda" and not our_triton.interpreting():
            return "CPU: only under TRITON_INTERPRET=1"
        if device.type != "cuda" and our_triton.interpreter_problem() is not None:
            return our_triton.interpreter_problem()
    return None


def bench_kernels(device: torch.device, dtype: torch.dtype, head_dims: Sequence[int], lengths: Sequence[int],
                  tokens: int, width: int, chunk: int, warmup: int, repeats: int,
                  deadline: float = math.inf, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows of the kernels section, appended to ``rows`` (a new list by default) as they finish;
    rows not started by ``deadline`` (``time.monotonic()``) are marked skipped, so that a run under
    a time limit still writes what it measured."""
    rows = [] if rows is None else rows
    for dk in head_dims:
        heads = max(1, width // dk)
        for length in lengths:
            batch = max(1, tokens // length)
            gen = torch.Generator(device=device).manual_seed(length + dk)
            q, k, v = (torch.randn(batch, heads, length, dk, device=device, dtype=dtype, generator=gen)
                       .requires_grad_() for _ in range(3))
            grad = torch.randn(batch, heads, length, dk, device=device, dtype=dtype, generator=gen)
            for impl in IMPLS:
                row: dict[str, Any] = {"impl": impl, "d_head": dk, "heads": heads, "length": length, "batch": batch}
                reason = impl_unavailable(impl, device)
                if time.monotonic() > deadline:
                    reason = "skipped: the time budget (--budget-s) ran out"
                if reason is not None:
                    row["error"] = reason
                    rows.append(row)
                    continue
                fn = _sdpa_call(device) if impl == "sdpa-flash" else _retention_call(impl, chunk)

                def step(fn: Callable[..., Any] = fn, inputs: tuple[torch.Tensor, ...] = (q, k, v),
                         grad: torch.Tensor = grad) -> None:
                    torch.autograd.grad(fn(*inputs), inputs, grad)

                try:
                    seconds = median_seconds(step, device, warmup, repeats)
                except Exception as exc:  # one implementation failing must not lose the grid
                    row["error"] = _error_text(exc)
                else:
                    row["ms"] = seconds * 1e3
                    row["tokens_per_s"] = batch * length / seconds
                rows.append(row)
            del q, k, v, grad
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def kernel_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (d_head, length): ours against each peer (tokens/s ratios) and the issue's targets."""
    table: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        if "tokens_per_s" in r:
            table.setdefault((r["d_head"], r["length"]), {})[r["impl"]] = r["tokens_per_s"]
    out = []
    for (dk, length), rates in sorted(table.items()):
        ours = rates.get("ours-triton")
        row: dict[str, Any] = {"d_head": dk, "length": length}
        for peer in ("ours-torch", "fla", "sdpa-flash", "ours-triton-fused"):
            if ours is not None and peer in rates:
                row[f"vs {peer}"] = ours / rates[peer]
        out.append(row)
    return out


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _matmul_params(model: torch.nn.Module) -> int:
    """Weights in matrix products: every ``nn.Linear`` (the LM head included), no embeddings."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def retnet_flops_per_token(config: RetNetConfig, matmul_params: int) -> float:
    dk = config.d_model // config.num_heads
    dv = int(config.value_factor * config.d_model) // config.num_heads
    c = config.chunk_size
    per_head = 2 * c * dk + 2 * c * dv + 4 * dk * dv
    return 6 * matmul_params + config.num_layers * 3 * config.num_heads * per_head


def llama_flops_per_token(config: RetNetConfig, matmul_params: int, length: int) -> float:
    d_head = config.d_model // config.num_heads
    per_head = 2 * length * d_head + 2 * length * d_head  # full square (see docs/performance.md)
    return 6 * matmul_params + config.num_layers * 3 * config.num_heads * per_head


def bench_training(device: torch.device, config: RetNetConfig, batch: int, length: int, warmup: int,
                   repeats: int, peak: float, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    rows = [] if rows is None else rows
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, length + 1), generator=gen).to(device)
    autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    for name in ("retnet", "llama"):
        row: dict[str, Any] = {"model": name, "batch": batch, "length": length}
        if name == "llama" and not common.has_transformers():
            row["error"] = "transformers not installed"
            rows.append(row)
            continue
        try:
            model: torch.nn.Module
            if name == "retnet":
                torch.manual_seed(0)
                model = RetNet(config, device=device)  # built on the device: no CPU init of 1.3B weights
            else:
                model = common.build_llama(config, device, torch.float32)
            model.train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            params = _matmul_params(model)

            def step(model: torch.nn.Module = model, optimizer: Any = optimizer) -> None:
                with autocast:
                    logits = model(ids[:, :-1]).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            common.reset_peak_memory(device)
            seconds = median_seconds(step, device, warmup, repeats)
            flops = (retnet_flops_per_token(config, params) if name == "retnet"
                     else llama_flops_per_token(config, params, length))
            rate = batch * length / seconds
            row.update({"parameters": common.num_parameters(model), "tokens_per_s": rate,
                        "flops_per_token": flops, "mfu_measured": rate * flops / peak,
                        "mfu_datasheet": rate * flops / H100_BF16_PEAK if device.type == "cuda" else None,
                        "peak_gib": common.peak_memory(device) / 2**30})
            del model, optimizer
        except Exception as exc:
            row["error"] = _error_text(exc)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _retnet_decode_ms(model: RetNet, batch: int, context: int, steps: int, device: torch.device,
                      graphed: bool = False) -> float:
    """ms per greedy step after a prefill of ``context`` tokens: eager steps, or (``graphed``) the
    replays of one CUDA graph (:class:`~yet_another_retnet.models.cuda_graph.GraphedDecoder`)."""
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    out = model.prefill(prompt)
    state, token = out.state, out.logits[:, -1].argmax(-1)
    if graphed:
        decoder = GraphedDecoder(model, state, max_position=context + steps + 2)

        def step(ids: torch.Tensor) -> torch.Tensor:
            return decoder.step(ids)
    else:
        def step(ids: torch.Tensor) -> torch.Tensor:
            return model.step_(ids, state)

    for _ in range(2):  # warm-up steps (the state is handed on, as in generation)
        token = step(token).argmax(-1)
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token).argmax(-1)
    common.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


@torch.no_grad()
def _llama_decode_ms(model: torch.nn.Module, vocab: int, batch: int, context: int, steps: int,
                     device: torch.device) -> float:
    gen = torch.Generator().manual_seed(context)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    cache_kw = common.llama_cache_kwarg(model)
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = common.llama_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):
        out = model(token, use_cache=True, **{cache_kw: cache})
        cache, token = common.llama_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, **{cache_kw: cache})
        cache, token = common.llama_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    common.synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def bench_decode(device: torch.device, dtype: torch.dtype, config: RetNetConfig,
                 cases: Sequence[tuple[int, int]], steps: int,
                 rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    rows = [] if rows is None else rows
    torch.manual_seed(0)
    retnet = RetNet(config, device=device, dtype=dtype).eval()
    for batch, context in cases:
        for model, graphed in (("retnet", False), ("retnet-graph", True)):
            row: dict[str, Any] = {"model": model, "batch": batch, "context": context}
            if graphed and device.type != "cuda":
                row["error"] = "CUDA graphs need a GPU"
            else:
                try:
                    row["ms_per_token"] = _retnet_decode_ms(retnet, batch, context, steps, device, graphed)
                except Exception as exc:
                    row["error"] = _error_text(exc)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del retnet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not common.has_transformers():
        rows += [{"model": "llama", "batch": b, "context": c, "error": "transformers not installed"} for b, c in cases]
        return rows
    llama = common.build_llama(config, device, dtype).eval()
    for batch, context in cases:
        row = {"model": "llama", "batch": batch, "context": context}
        try:
            row["ms_per_token"] = _llama_decode_ms(llama, config.vocab_size, batch, context, steps, device)
        except Exception as exc:
            row["error"] = _error_text(exc)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def decode_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["model"], r["batch"], r["context"]): r.get("ms_per_token") for r in rows}
    out = []
    for (model, batch, context), ms in by.items():
        if model != "retnet":
            continue
        llama = by.get(("llama", batch, context))
        graph = by.get(("retnet-graph", batch, context))
        out.append({"batch": batch, "context": context, "retnet_ms": ms, "retnet_graph_ms": graph,
                    "llama_ms": llama, "speedup": llama / ms if ms and llama else None,
                    "graph_speedup": llama / graph if graph and llama else None})
    return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --quick")
    parser.add_argument("--out", default="docs/results/gpu", help="folder for gpu.json and gpu.md")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of every code path")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="seconds for the kernels section: rows not started by then are marked skipped")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    return parser.parse_args(argv)


def render(result: dict[str, Any]) -> list[tuple[str, str]]:
    """The Markdown sections of whatever ``result`` holds so far (a run cut short renders too)."""
    md: list[tuple[str, str]] = []
    if "kernels" in result:
        result["kernel_ratios"] = kernel_summary(result["kernels"])
        md.append(("Chunkwise retention forward + backward (tokens/s)", common.markdown_table(
            result["kernels"], [("impl", "implementation"), ("d_head", "d_head"), ("heads", "heads"),
                                ("length", "length"), ("batch", "batch"), ("ms", "ms"),
                                ("tokens_per_s", "tokens/s"), ("error", "not run")])))
        ratio_cols = [("d_head", "d_head"), ("length", "length"), ("vs ours-torch", "ours / plain PyTorch"),
                      ("vs fla", "ours / fla"), ("vs sdpa-flash", "ours / flash attention"),
                      ("vs ours-triton-fused", "split / fused schedule")]
        md.append(("Ours (Triton) against each peer", common.markdown_table(result["kernel_ratios"], ratio_cols)))
    if "training" in result:
        md.append(("Training step (forward, backward, AdamW; bf16 autocast)", common.markdown_table(
            result["training"], [("model", "model"), ("parameters", "parameters"), ("batch", "batch"),
                                 ("length", "length"), ("tokens_per_s", "tokens/s"),
                                 ("mfu_measured", "MFU (measured matmul)"), ("mfu_datasheet", "MFU (989 TFLOP/s)"),
                                 ("peak_gib", "peak GiB"), ("error", "not run")])))
    if "decode" in result:
        result["decode_ratios"] = decode_summary(result["decode"])
        md.append(("Decoding (ms per token after a prefill of the context)", common.markdown_table(
            result["decode_ratios"], [("batch", "batch"), ("context", "context"), ("retnet_ms", "RetNet ms"),
                                      ("retnet_graph_ms", "RetNet, CUDA graph ms"),
                                      ("llama_ms", "Llama + KV cache ms"), ("speedup", "speed-up"),
                                      ("graph_speedup", "speed-up, CUDA graph")])))
        errors = [r for r in result["decode"] if "error" in r]
        if errors:
            md.append(("Decoding runs that failed", common.markdown_table(
                errors, [("model", "model"), ("batch", "batch"), ("context", "context"), ("error", "error")])))
    if "matmul_flops" in result:
        md.append(("Denominator", f"{result['dtype']} {result['matmul_size']}^3 matrix product measured here: "
                                  f"{common.fmt(result['matmul_flops'] / 1e12)} TFLOP/s.\n"))
    if result.get("stopped"):
        md.append(("Stopped", f"{result['stopped']}: the rows above are those finished before it.\n"))
    return md


def write(out: Path, result: dict[str, Any], info: Any) -> None:
    md = render(result)
    common.write_json(out / "gpu.json", result)
    title = "GPU benchmark" + (" (quick smoke run: numbers mean nothing)" if result["quick"] else "")
    common.write_markdown(out / "gpu.md", title, info, result["command"], md)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: --sections: unknown {unknown}; choose from {list(SECTIONS)}")
    try:
        device = common.resolve_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if device.type != "cuda" and not args.quick:
        raise SystemExit("error: --device: the full benchmark needs a CUDA device (use --quick on CPU)")
    quick = args.quick
    # The interpreter has no bfloat16: a quick CPU run uses float32.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = common.machine_info(device)
    out = Path(args.out)
    result: dict[str, Any] = {"machine": info, "quick": quick, "dtype": str(dtype).removeprefix("torch."),
                              "command": " ".join(["python -m", MODULE, *(argv if argv is not None else [])])}
    with _written_when_stopped(out, result, info):
        result["matmul_size"] = 256 if quick else 8192
        result["matmul_flops"] = peak = matmul_flops(device, dtype, result["matmul_size"])
        if "kernels" in sections:
            bench_kernels(device, dtype, head_dims=(16,) if quick else (128, 256),
                          lengths=(48,) if quick else (2048, 4096, 8192, 16384, 32768),
                          tokens=64 if quick else 32768, width=32 if quick else 2048,
                          chunk=16 if quick else 64, warmup=1 if quick else 2, repeats=1 if quick else 5,
                          deadline=math.inf if args.budget_s is None else time.monotonic() + args.budget_s,
                          rows=result.setdefault("kernels", []))
        config = quick_config() if quick else fla_13b_config()
        if "training" in sections:
            bench_training(device, config, batch=2 if quick else 4, length=32 if quick else 2048,
                           warmup=1 if quick else 2, repeats=1 if quick else 5, peak=peak,
                           rows=result.setdefault("training", []))
        if "decode" in sections:
            cases = [(2, 24)] if quick else [(1, 8192), (1, 32768), (16, 8192)]
            bench_decode(device, dtype, config, cases, steps=2 if quick else 32, rows=result.setdefault("decode", []))
    write(out, result, info)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0


@contextlib.contextmanager
def _written_when_stopped(out: Path, result: dict[str, Any], info: Any) -> Iterator[None]:
    """Where a time limit stops the run (``timeout`` sends SIGTERM) or it is interrupted, write the
    rows finished so far before exiting: a device session has one try."""
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except KeyboardInterrupt as exc:
        result["stopped"] = f"stopped by {exc.args[0] if exc.args else 'SIGINT'}"
        write(out, result, info)
        print(f"{result['stopped']}: wrote what was measured to {out / 'gpu.json'}")
        raise SystemExit(124) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())


def _error_text(exc: BaseException) -> str:
    """A failed row's ``error``: the exception's type and the first 160 characters of its first line."""
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}"
