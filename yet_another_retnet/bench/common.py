"""Shared pieces of the benchmarks: machine info, timing, memory, the Llama baseline, report writers.

Every benchmark writes three kinds of output into its ``--out`` directory: a JSON file with the
raw measurements and the machine they were taken on, a Markdown table, and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cli_common import UsageError, _Parser
from ..models.checkpoint import atomic_write
from ..models.config import PRESETS, RetNetConfig
from ..ops.cpu.machine import cpu_kind, first_cpu

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


# --------------------------------------------------------------------------------------------
# Arguments shared by every benchmark
# --------------------------------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, default_out: str, default_preset: str) -> None:
    """``--device``, ``--dtype``, ``--preset``, ``--quick``, ``--out``, ``--seed``, ``--threads``."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype")
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"RetNet size (default: {default_preset}); the Transformer is matched to it")
    parser.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    parser.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's choice)")


def parser(prog: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A benchmark's parser: the CLI's, so that a bad value is the one-line usage error (exit 2)
    that ``retnet`` prints, not argparse's usage block and a ``SystemExit`` out of ``main()``."""
    return _Parser(prog=prog, **kwargs)


def count(value: int | None, default: int, flag: str) -> int:
    """``value`` or, when the option was not given (``None``), ``default``; ``flag`` must be >= 1.

    Not ``value or default``: that would record ``--steps 0`` as the default's count."""
    if value is None:
        return default
    if value < 1:
        raise UsageError(f"{flag} must be >= 1, got {value}")
    return value


def positive_float(value: float | None, flag: str) -> None:
    """Refuse a float option that is not finite and > 0 (NaN would also be written as invalid JSON)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a finite number > 0, got {value}")


def prepare_out(out: str | Path) -> Path:
    """Create the ``--out`` directory before anything is measured, so that an ``--out`` naming a
    file (or an unwritable place) is found in a second, not after the whole run."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the directory ({err.strerror or err})") from None
    return path


def write_text(path: Path, text: str) -> None:
    """Write a report atomically: a kill mid-write leaves the previous report, not a truncated one."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def positive_ints(text: str) -> list[int]:
    """Parse ``"512,1024,2048"`` into ``[512, 1024, 2048]`` (argparse ``type=``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``; ``ValueError`` for CUDA without a GPU."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def retnet_config(preset: str, **overrides: Any) -> RetNetConfig:
    """A preset for benchmarking: dropout off (it changes nothing about the cost we compare)."""
    return RetNetConfig.from_preset(preset, **{"dropout": 0.0, **overrides})


# --------------------------------------------------------------------------------------------
# Machine, timing and memory
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    fields = first_cpu() or {}
    return fields.get("model name") or platform.processor() or platform.machine()


def transformers_version() -> str | None:
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was."""
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_kind": cpu_kind(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        info["load_average_1m"] = None
    try:
        info["memory_total_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        info["memory_total_gib"] = None
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes (GPU work included), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def timed_both(fn: Callable[[], Any], device: torch.device) -> tuple[float, float, Any]:
    """Wall seconds and CPU seconds (``time.process_time``, all threads) of one call, and its result.

    With one torch thread on a CPU, the CPU time is the work the step needed; unlike the wall
    time it does not grow while other processes hold the core, so on a shared machine it is the
    steadier of the two. It is meaningless for GPU work.
    """
    synchronize(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - wall0, time.process_time() - cpu0, result


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones.

    The median, not the mean: on a shared machine a few runs are slowed by other processes.
    """
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device)[0] for _ in range(max(1, repeats)))


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux ``VmRSS``; psutil elsewhere)."""
    kib = _proc_status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss() -> int:
    """The process's high-water resident set size, in bytes (Linux ``VmHWM``, else ``ru_maxrss``).

    It never goes down, so a clean per-configuration peak needs a fresh process for each
    configuration (the benchmarks run one subprocess each).
    """
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_free_memory() -> None:
    """Hand memory that is freed but still held by the C allocator back to the OS (glibc only).

    After a large prefill, glibc keeps the freed blocks of its heap mapped, so the resident set
    would overstate what decoding needs. ``malloc_trim`` releases them without changing how later
    allocations are served; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int:
    """Peak bytes: ``torch.cuda.max_memory_allocated`` on GPU, peak process RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss()


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's distinct parameters and buffers (tied weights count once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def configure_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The Transformer baseline: Hugging Face's Llama with SDPA attention and a real KV cache
# --------------------------------------------------------------------------------------------


def has_transformers() -> bool:
    return transformers_version() is not None


def without_missing_transformer(models: list[str], doing: str) -> list[str]:
    """``models`` less ``"transformer"`` where transformers is not installed, saying so on stderr
    (after the arguments were checked: a usage error stays the one line printed)."""
    if "transformer" not in models or has_transformers():
        return models
    print(f"transformers is not installed: {doing} RetNet only (pip install transformers)", file=sys.stderr)
    return [m for m in models if m != "transformer"]


def matched_llama_ffn(config: RetNetConfig) -> int:
    """The Llama FFN width that gives the RetNet's parameter count at the same width and depth.

    A RetNet layer has ``(2 + 3 * value_factor) d^2`` retention weights (q, k: d x d; v, g:
    d x vd; out: vd x d) plus the FFN (``2 d f`` for an MLP, ``3 d f`` for a GLU); a Llama layer
    has ``4 d^2`` attention weights plus a ``3 d I`` gated FFN. Norm weights are negligible.
    """
    d = config.d_model
    retention = (2 + 3 * config.value_factor) * d * d
    ffn = (3 if config.ffn == "glu" else 2) * d * config.ffn_dim
    return max(1, round((retention + ffn - 4 * d * d) / (3 * d)))


def build_llama(config: RetNetConfig, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of the RetNet's width, depth, heads and size.

    Nothing is downloaded. Attention is ``sdpa`` (``F.scaled_dot_product_attention``), the
    fastest attention transformers offers on CPU; the FFN width is matched so that both models
    have the same number of parameters (within a fraction of a percent).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    llama_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=matched_llama_ffn(config),
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=1 << 17,
        rms_norm_eps=1e-6,
        tie_word_embeddings=config.tie_embeddings,
        attention_dropout=0.0,
    )
    llama_config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model: nn.Module = LlamaForCausalLM(llama_config)
    return model.to(dtype=dtype)


def kv_cache_tensors(cache: Any) -> list[torch.Tensor]:
    """The key and value tensors of a transformers cache (``DynamicCache`` or the legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out: list[torch.Tensor] = []
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
        return out
    if hasattr(cache, "key_cache"):
        return [*cache.key_cache, *cache.value_cache]
    return [t for pair in cache for t in pair]


def llama_cache(output: Any) -> Any:
    """The KV cache of a transformers model output (``past_key_values`` was renamed ``cache`` in v5)."""
    for name in ("cache", "past_key_values"):
        if name in output and output[name] is not None:
            return output[name]
    raise RuntimeError("the transformers output holds no KV cache (was use_cache=True passed?)")


def llama_cache_kwarg(model: nn.Module) -> str:
    """The keyword that hands a KV cache back to ``model.forward`` in this transformers version."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------------------------
# Fresh-process workers (clean peak RSS per configuration)
# --------------------------------------------------------------------------------------------


def run_worker(module: str, job: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """Run ``python -m module --worker JSON`` in a fresh process; return the JSON it prints last."""
    return run_json_command([sys.executable, "-m", module, "--worker", json.dumps(job)], timeout)


def run_json_command(cmd: list[str], timeout: float, env: dict[str, str] | None = None,
                     cwd: str | None = None) -> dict[str, Any]:
    """Run ``cmd`` and return the last JSON object line it printed.

    A failed command gives ``{"error": ...}`` rather than an exception, so that one configuration
    running out of memory does not lose the rest of the grid.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers to ``digits`` significant figures, missing values as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub table of ``rows``; ``columns`` are ``(key, header)`` pairs."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    return (f"{info['cpu']} ({info['cpu_count']} CPUs, {info['torch_threads']} torch threads{gpu}), "
            f"torch {info['torch']}, transformers {info.get('transformers') or 'not installed'}, "
            f"load average at start {info.get('load_average_1m')}, {info['date']}")


def write_markdown(path: Path, title: str, info: dict[str, Any], command: str,
                   sections: Sequence[tuple[str, str]]) -> None:
    """A report: title, the exact command, the machine, then ``(heading, body)`` sections."""
    parts = [f"# {title}\n", f"Command: `{command}`\n", f"Machine: {machine_line(info)}\n"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body}")
    write_text(path, "\n".join(parts))


def pyplot() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend, or ``None`` if not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save small PNGs (low dpi, no metadata) so that committed plots stay well under 300 KB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def command_line(module: str, argv: Sequence[str]) -> str:
    return " ".join(["retnet bench", module, *argv]).strip()


def shim_timm() -> None:
    """Let ``torchscale.architecture.retnet`` import without timm.

    torchscale imports ``timm.models.layers.drop_path`` (used only with drop_path_rate > 0), and
    timm's import chain wants torchvision, which has no CPU build here: when timm cannot be
    imported, stand in a module whose ``drop_path`` refuses to run.
    """
    if "timm.models.layers" in sys.modules:
        return
    try:
        import timm.models.layers

        return
    except Exception:
        pass
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")

    def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
        raise NotImplementedError("timm shim: drop_path is not available")

    layers.drop_path = drop_path  # type: ignore[attr-defined]
    models.layers = layers  # type: ignore[attr-defined]
    timm.models = models  # type: ignore[attr-defined]
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
