"""Benchmark of the three functional retention forms: time and peak memory against length.

``retnet bench ops`` (or ``python -m yet_another_retnet.bench.ops``) times
:func:`~yet_another_retnet.ops.retention_parallel`, :func:`~yet_another_retnet.ops.retention_chunkwise`
and :func:`~yet_another_retnet.ops.retention_recurrent` (stepped token by token) on random
``(batch, heads, length, dim)`` inputs, forward only (under ``torch.no_grad``) and forward +
backward (``out.sum().backward()``), for each length.

Method:

- Each (form, length) runs in a **fresh subprocess**, so that one configuration's memory cannot
  hide in another's numbers, and an out-of-memory kill loses only that cell.
- Time: the median of ``--repeats`` calls after one untimed warm-up call.
- Peak memory: the largest total of live tensor bytes during a call, above what was live
  before it (inputs excluded; saved activations, gradients and temporaries included), from the
  allocation and free events of PyTorch's profiler (``profile_memory=True``) on CPU, from
  ``max_memory_allocated`` on CUDA. The decay tables that the ops cache across calls are added
  (see :func:`_steady_peak`). As a cross-check on CPU, the rise of the process's peak resident
  set size (``ru_maxrss``) during the first (cold) forward and forward + backward calls is
  recorded too; it also counts allocator caching and is blind to untouched zero pages.
- Cases that cannot run are recorded as skipped with a reason, never extrapolated: the parallel
  form when its ``(length, length)`` temporaries would exceed ``--max-memory-gb``, and the
  recurrent form above ``--max-recurrent-length`` (one Python-level call per token).

Outputs in ``--out``: ``ops.json`` (settings, machine, every measurement), ``ops.md`` (tables)
and ``ops.png`` (time and memory against length, if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..ops import retention_chunkwise, retention_parallel, retention_recurrent
from . import common
from .common import (
    DTYPES,
    command_line,
    configure_threads,
    fmt,
    machine_info,
    markdown_table,
    peak_rss,
    positive_ints,
    pyplot,
    resolve_device,
    resolve_dtype,
    run_worker,
    save_figure,
    write_json,
    write_markdown,
)

FORMS = ("parallel", "chunkwise", "recurrent")
DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_LENGTHS = [512, 1024, 2048]
#: Chunk size for the chunkwise form. On 2 CPU cores 128 was the fastest of 64/128/256/512 for
#: forward + backward at 2k-8k tokens with 8 heads of 64 (the paper's 512 is a GPU choice).
DEFAULT_CHUNK = 128
MiB = 2**20


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = common.parser(
        "retnet bench ops",
        description="Time and peak memory of parallel, chunkwise and recurrent retention vs length.",
    )
    parser.add_argument("--out", default="out/bench/ops", help="output directory (default: out/bench/ops)")
    parser.add_argument("--lengths", type=positive_ints, default=None,
                        help="comma-separated lengths (default: 512,...,32768; --quick: 512,1024,2048)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 3 short lengths, 2 repeats")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default: float32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                        help=f"chunk size of the chunkwise form (default: {DEFAULT_CHUNK})")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (default: 3; --quick: 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64, help="dk = dv (default: 64)")
    parser.add_argument("--forms", default=",".join(FORMS), help="comma-separated subset of forms")
    parser.add_argument("--max-recurrent-length", type=int, default=4096,
                        help="longest sequence the token-by-token recurrent form is timed at (default: 4096)")
    parser.add_argument("--max-memory-gb", type=float, default=8.0,
                        help="skip the parallel form where its (L, L) temporaries would need more (default: 8)")
    parser.add_argument("--case-timeout", type=float, default=600.0, help="seconds per case before it is abandoned")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------
# One case, in a fresh process
# --------------------------------------------------------------------------------------------


def _forward(form: str, q: Tensor, k: Tensor, v: Tensor, chunk: int) -> Tensor:
    if form == "parallel":
        return retention_parallel(q, k, v)[0]
    if form == "chunkwise":
        return retention_chunkwise(q, k, v, None, chunk)[0]
    # The recurrent form as it is used for decoding: one call per token, the state handed on.
    # unbind, not q[:, :, t]: the backward of L separate slices would materialise L full-size
    # zero gradients (quadratic); unbind's backward is one stack.
    outs, state = [], None
    for qt, kt, vt in zip(q.unbind(2), k.unbind(2), v.unbind(2), strict=True):
        out, state = retention_recurrent(qt, kt, vt, state)
        outs.append(out)
    return torch.stack(outs, dim=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_mark(device: torch.device) -> int:
    """Bytes to subtract from the peak: the current peak RSS (CPU) or allocated bytes (CUDA)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    return peak_rss()


def _memory_peak(device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()


def _tensor_peak(fn: Callable[[], Any], device: torch.device) -> tuple[int, int] | None:
    """``(peak, end)``: bytes of live tensors at the peak of ``fn()`` and after it, above before.

    On CPU: the allocation and free events that PyTorch's profiler records with
    ``profile_memory=True`` (every tensor the CPU allocator hands out, including autograd's saved
    tensors and the gradients), summed in time order. Unlike the process RSS this ignores
    allocator caching and the zero pages of untouched memory. ``None`` if this torch's profiler
    does not expose the events. On CUDA: ``max_memory_allocated`` and ``memory_allocated``.
    """
    if device.type == "cuda":
        base = _memory_mark(device)
        fn()
        return _memory_peak(device) - base, int(torch.cuda.memory_allocated(device)) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        cpu = torch._C._autograd.DeviceType.CPU
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            if event.device_type() == cpu:
                live += event.nbytes()
                peak = max(peak, live)
    except (AttributeError, RuntimeError):
        return None
    return peak, live


def _clear_op_caches() -> None:
    """Empty every ``functools`` cache of the ops modules (their decay tables), generically."""
    from ..ops import decay, position
    from ..ops import retention as retention_ops

    for module in (decay, position, retention_ops):
        for obj in vars(module).values():
            clear = getattr(obj, "cache_clear", None)
            if callable(clear):
                clear()


def _steady_peak(fn: Callable[[], Any], device: torch.device) -> dict[str, float | None]:
    """Peak tensor memory of a repeated call, counting the decay tables the ops cache.

    The ops keep data-independent decay tables in a cache across calls (for the parallel form,
    the whole ``(heads, L, L)`` mask up to some length). A warm call's peak alone would leave
    them out, a cold call's peak would count the one-off float64 work of building them. So:
    a cold call (caches cleared) tells how many bytes stay cached after it, and the reported
    peak is a warm call's peak plus those bytes, the memory a training loop holds per step.
    """
    _clear_op_caches()
    cold = _tensor_peak(fn, device)
    warm = _tensor_peak(fn, device)
    if cold is None or warm is None:
        return {"peak": None, "cold_peak": None, "cached": None}
    cached = max(0, cold[1] - warm[1])
    return {"peak": (warm[0] + cached) / MiB, "cold_peak": cold[0] / MiB, "cached": cached / MiB}


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def run_case(job: dict[str, Any]) -> dict[str, Any]:
    """Measure one (form, length): peak memory first (clean high-water marks), then time."""
    configure_threads(job["threads"])
    device = resolve_device(job["device"])
    dtype = resolve_dtype(job["dtype"])
    form, length, chunk = job["form"], job["length"], job["chunk_size"]
    shape = (job["batch"], job["heads"], length, job["head_dim"])
    gen = torch.Generator().manual_seed(job["seed"])
    q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

    def forward() -> None:
        with torch.no_grad():
            _forward(form, q, k, v, chunk)

    def forward_backward() -> None:
        out = _forward(form, leaves[0], leaves[1], leaves[2], chunk)
        out.float().sum().backward()
        for x in leaves:
            x.grad = None

    # Warm up at a short length so that the first measured call does not pay for loading
    # kernels and thread pools; the warm-up's own peak then sits in the baseline.
    small = [x[:, :, :64].detach().clone().requires_grad_(True) for x in (q, k, v)]
    _forward(form, small[0], small[1], small[2], min(chunk, 64)).float().sum().backward()

    # Process RSS first (its high-water mark only rises, so forward before forward + backward),
    # then the exact tensor peaks from the allocator's events.
    base = peak_rss()
    forward()
    rss_fwd = peak_rss() - base
    forward_backward()
    rss_fb = peak_rss() - base
    peak_fwd = _steady_peak(forward, device)
    peak_fb = _steady_peak(forward_backward, device)

    fwd_s, fwd_all = _median_seconds(forward, device, job["repeats"])
    fb_s, fb_all = _median_seconds(forward_backward, device, job["repeats"])
    return {
        "forward_ms": 1e3 * fwd_s,
        "forward_backward_ms": 1e3 * fb_s,
        "forward_ms_all": [round(1e3 * t, 3) for t in fwd_all],
        "forward_backward_ms_all": [round(1e3 * t, 3) for t in fb_all],
        "peak_forward_mib": peak_fwd["peak"],
        "peak_forward_backward_mib": peak_fb["peak"],
        "cold_peak_forward_mib": peak_fwd["cold_peak"],
        "cold_peak_forward_backward_mib": peak_fb["cold_peak"],
        "cached_tables_mib": peak_fb["cached"],
        "rss_forward_mib": rss_fwd / MiB if device.type == "cpu" else None,
        "rss_forward_backward_mib": rss_fb / MiB if device.type == "cpu" else None,
        "input_mib": 3 * q.numel() * q.element_size() / MiB,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def parallel_bytes_estimate(batch: int, heads: int, length: int) -> int:
    """A rough (high) peak for the parallel form's forward + backward, from its ``(L, L)`` arrays.

    Per head and (n, m) pair the parallel form holds float32 scores, the decay mask and the
    masked scores (and their gradients in the backward); where the mask is not cached it is
    built in float64 first. Measured with this package's ops (8 heads of 64, float32): ~8 bytes
    per head and pair up to 4k tokens, ~17 at 8k (uncached float64 mask). This assumes 20.
    Used only to decide what to skip, never reported as a measurement.
    """
    return (batch * heads * 20 + 8) * length * length


def skip_reason(form: str, length: int, args: argparse.Namespace) -> str | None:
    if form == "recurrent" and length > args.max_recurrent_length:
        return (f"not timed: the recurrent form makes one Python-level call per token; lengths above "
                f"--max-recurrent-length {args.max_recurrent_length} are skipped, nothing extrapolated")
    if form == "parallel":
        need = parallel_bytes_estimate(args.batch, args.heads, length)
        if need > args.max_memory_gb * 2**30:
            return (f"not run: the parallel form's (L, L) scores and decay mask would need ~{need / 2**30:.0f} GiB "
                    f"(> --max-memory-gb {args.max_memory_gb:g})")
    return None


def peak_mib(r: dict[str, Any], kind: str) -> float:
    """A case's peak memory in MiB (``kind``: ``forward`` or ``forward_backward``): the tensor
    peak from the allocator's events, or the RSS increase where the profiler gave none."""
    value = r.get(f"peak_{kind}_mib")
    return float(r[f"rss_{kind}_mib"] if value is None else value)


def checks(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The two claims the benchmark exists to show, computed from the measurements."""
    by = {(r["form"], r["length"]): r for r in results if "forward_ms" in r}
    chunk = sorted((r for r in results if r["form"] == "chunkwise" and "forward_ms" in r), key=lambda r: r["length"])
    per_token = [
        {"length": r["length"],
         "forward_backward_kib_per_token": 1024 * peak_mib(r, "forward_backward") / r["length"],
         "forward_kib_per_token": 1024 * peak_mib(r, "forward") / r["length"]}
        for r in chunk
    ]
    speedups = []
    for r in chunk:
        p = by.get(("parallel", r["length"]))
        if p is not None:
            speedups.append({
                "length": r["length"],
                "forward_speedup": p["forward_ms"] / r["forward_ms"],
                "forward_backward_speedup": p["forward_backward_ms"] / r["forward_backward_ms"],
                "forward_backward_memory_ratio": peak_mib(p, "forward_backward")
                / max(peak_mib(r, "forward_backward"), 1e-9),
            })
    from_2048 = [s for s in speedups if s["length"] >= 2048]
    return {
        "chunkwise_memory_per_token": per_token,
        "chunkwise_vs_parallel": speedups,
        # None when no length >= 2048 was measured for both forms.
        "chunkwise_beats_parallel_from_2048": all(
            s["forward_speedup"] > 1 and s["forward_backward_speedup"] > 1 for s in from_2048
        ) if from_2048 else None,
    }


def render(data: dict[str, Any]) -> list[tuple[str, str]]:
    """Markdown sections from the JSON data."""
    s = data["settings"]
    rows = []
    for r in data["results"]:
        rows.append({**r, "status": "ok" if "forward_ms" in r else r.get("skipped") or r.get("error")})
    columns = [("form", "form"), ("length", "length"), ("forward_ms", "forward ms"),
               ("forward_backward_ms", "fwd+bwd ms"), ("peak_forward_mib", "peak fwd MiB"),
               ("peak_forward_backward_mib", "peak fwd+bwd MiB"),
               ("rss_forward_backward_mib", "RSS increase fwd+bwd MiB"), ("status", "status")]
    setup = (f"Functional ops, batch {s['batch']}, {s['heads']} heads, dk = dv = {s['head_dim']}, "
             f"{s['dtype']} on {s['device']}, {s['threads'] or 'default'} torch thread(s), chunk size "
             f"{s['chunk_size']}; time is the median of {s['repeats']} calls after 1 warm-up; each case "
             f"runs in a fresh process. Forward runs under `torch.no_grad()`; fwd+bwd is "
             f"`out.sum().backward()` into q, k, v.\n\n"
             f"Peak memory (\"peak\" columns): the largest total of live tensor bytes during a "
             f"warm call above what was live before it (inputs excluded; saved activations, "
             f"gradients and temporaries included), from the allocation/free events of PyTorch's "
             f"profiler with `profile_memory=True`, plus the decay tables the ops keep cached "
             f"across calls (for the parallel form up to 4,096 tokens, its whole (heads, L, L) "
             f"mask). \"RSS increase\": the rise of the process's peak resident set size during "
             f"the first (cold) forward and fwd+bwd calls, a cross-check that also counts "
             f"allocator caching and one-off table building.\n\n")
    c = data["checks"]
    lines = ["| length | chunkwise fwd+bwd KiB/token | chunkwise fwd KiB/token |", "|---|---|---|"]
    for p in c["chunkwise_memory_per_token"]:
        lines.append(f"| {p['length']:,} | {fmt(p['forward_backward_kib_per_token'])} | {fmt(p['forward_kib_per_token'])} |")
    lines += ["", "| length | parallel / chunkwise time, fwd | fwd+bwd | parallel / chunkwise peak memory, fwd+bwd |",
              "|---|---|---|---|"]
    for p in c["chunkwise_vs_parallel"]:
        lines.append(f"| {p['length']:,} | {fmt(p['forward_speedup'])}x | {fmt(p['forward_backward_speedup'])}x "
                     f"| {fmt(p['forward_backward_memory_ratio'])}x |")
    lines.append(f"\nChunkwise faster than parallel (forward and fwd+bwd) at every measured length >= 2048: "
                 f"**{fmt(c['chunkwise_beats_parallel_from_2048'])}**\n")
    return [("Results", setup + markdown_table(rows, columns)), ("Checks", "\n".join(lines))]


def plot(data: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for form in FORMS:
        rs = [r for r in data["results"] if r["form"] == form and "forward_ms" in r]
        if not rs:
            continue
        lengths = [r["length"] for r in rs]
        axes[0].plot(lengths, [r["forward_backward_ms"] for r in rs], marker="o", label=form)
        axes[1].plot(lengths, [peak_mib(r, "forward_backward") for r in rs], marker="o", label=form)
    for ax, label in zip(axes, ("forward + backward (ms)", "peak memory, fwd+bwd (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.legend()
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with the hidden ``--worker``, one case) and write the reports."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_case(json.loads(args.worker))))
        return 0

    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as err:
        parser.error(str(err))
    for name in ("chunk_size", "repeats", "batch", "heads", "head_dim", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    forms = [f for f in args.forms.split(",") if f]
    unknown = sorted(set(forms) - set(FORMS))
    if not forms or unknown:
        parser.error(f"--forms must be a comma-separated subset of {','.join(FORMS)}, got {args.forms!r}")
    lengths = args.lengths if args.lengths is not None else (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)
    repeats = common.count(args.repeats, 2 if args.quick else 3, "--repeats")
    common.positive_float(args.case_timeout, "--case-timeout")
    common.positive_float(args.max_memory_gb, "--max-memory-gb")
    out_dir = common.prepare_out(args.out)
    configure_threads(args.threads)

    settings = {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
                "device": str(device), "chunk_size": args.chunk_size, "repeats": repeats,
                "lengths": lengths, "max_recurrent_length": args.max_recurrent_length,
                "max_memory_gb": args.max_memory_gb, "threads": args.threads, "seed": args.seed}
    info = machine_info(device)
    results: list[dict[str, Any]] = []
    started = time.perf_counter()
    for length in lengths:
        for form in forms:
            case = {"form": form, "length": length}
            reason = skip_reason(form, length, args)
            if reason is not None:
                results.append({**case, "skipped": reason})
                print(f"{form:>9} {length:>6}: skipped", flush=True)
                continue
            job = {**case, "chunk_size": args.chunk_size, "batch": args.batch, "heads": args.heads,
                   "head_dim": args.head_dim, "dtype": args.dtype, "device": args.device,
                   "repeats": repeats, "threads": args.threads, "seed": args.seed}
            out = run_worker("yet_another_retnet.bench.ops", job, timeout=args.case_timeout)
            results.append({**case, **out})
            if "error" in out:
                print(f"{form:>9} {length:>6}: {out['error']}", flush=True)
            else:
                print(f"{form:>9} {length:>6}: fwd {out['forward_ms']:.1f} ms, fwd+bwd "
                      f"{out['forward_backward_ms']:.1f} ms, peak {peak_mib(out, 'forward_backward'):.0f} MiB",
                      flush=True)

    data: dict[str, Any] = {"benchmark": "ops", "command": command_line("ops", argv), "settings": settings,
            "machine": info, "wall_seconds": round(time.perf_counter() - started, 1),
            "results": results}
    data["checks"] = checks(results)
    with contextlib.suppress(OSError):
        info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    if not any("error" not in r and "skipped" not in r for r in results):
        # Nothing was measured: keep the previous (good) report and say so with a non-zero exit.
        print(f"ops: no case succeeded; {out_dir} left as it was", file=sys.stderr)
        return 1
    write_json(out_dir / "ops.json", data)
    write_markdown(out_dir / "ops.md", "Retention ops: time and peak memory against length", info,
                   data["command"], render(data))
    plot(data, out_dir / "ops.png")
    print(f"wrote {out_dir / 'ops.json'}, {out_dir / 'ops.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
