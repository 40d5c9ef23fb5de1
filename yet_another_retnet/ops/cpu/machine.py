"""What the kernels need to know of this CPU: the first processor's ``/proc/cpuinfo`` fields, its
kind, and how the decoding kernels move memory on it.

The decoding products (``csrc/gemv.h``, ``csrc/int_dot.h``) read each weight once and are bound by
how fast memory streams. On most of our machines a software prefetch a fixed distance ahead of
each row stream keeps more lines in flight than the hardware prefetcher alone, and the core writes
each layer's new state with streaming stores. On the AMD Zen 4 kind (family 25 with AVX-512) both
cost time: the 1.3B step ran 9-13% faster without the prefetch and another 4-15% faster without
the streaming stores (docs/performance.md), so there the kernels use neither.
``YARETNET_DECODE_PREFETCH`` and ``YARETNET_DECODE_STREAM_STATE`` override the choice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PREFETCH_ENV", "STREAM_ENV", "DecodeTuning", "cpu_kind", "decode_tuning", "first_cpu"]

#: The environment variable that overrides the decoding products' prefetch distances.
PREFETCH_ENV = "YARETNET_DECODE_PREFETCH"
#: The environment variable that overrides the streaming stores of the decoding core's state.
STREAM_ENV = "YARETNET_DECODE_STREAM_STATE"

#: (float32/bfloat16 kernels, int8/int4 kernels) bytes ahead where nothing says otherwise. The
#: integer kernels spend more instructions a byte, so their loads come later and want more ahead.
DEFAULT_PREFETCH = (1024, 2048)

#: The largest distance accepted: past a few KB a prefetched line is evicted before it is read.
MAX_PREFETCH = 8192

#: The words an on/off environment variable of the kernels accepts (any case), here and in
#: ``_extension.py``'s ``YARETNET_FAST_PATH``.
OFF_WORDS, ON_WORDS = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


def first_cpu(cpuinfo: str | None = None) -> dict[str, str] | None:
    """The fields of the first processor in ``/proc/cpuinfo`` (or in its text ``cpuinfo``);
    ``None`` where there is no such file."""
    text = cpuinfo
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _core(fields: dict[str, str]) -> str | None:
    """The AMD core a vendor family means (AMD family 25 with AVX-512: Zen 4, without: Zen 3;
    family 26: Zen 5); ``None`` where not known."""
    if fields.get("vendor_id") != "AuthenticAMD":
        return None
    wide = "avx512f" in fields.get("flags", "").split()
    return {"25": "Zen 4" if wide else "Zen 3", "26": "Zen 5"}.get(fields.get("cpu family", ""))


def cpu_kind(cpuinfo: str | None = None) -> str | None:
    """Which kind of x86 CPU this is, from ``/proc/cpuinfo`` (or its text ``cpuinfo``): the
    vendor's family and model, the core it means where known, and the instructions the kernels
    choose between (AVX512-VNNI and -BF16, AMX). ``None`` off Linux. Shared VMs report one model
    name for several kinds, and each kind runs the benchmarks at its own speed."""
    fields = first_cpu(cpuinfo)
    if fields is None:
        return None
    flags = set(fields.get("flags", "").split())
    core = _core(fields)
    units = [name for flag, name in (("avx512_vnni", "AVX512-VNNI"), ("avx512_bf16", "AVX512-BF16"),
                                     ("amx_tile", "AMX")) if flag in flags]
    head = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return ", ".join([head] + ([core] if core else []) + units)


def _parse_prefetch(value: str) -> tuple[int, int]:
    """``YARETNET_DECODE_PREFETCH``'s value as (float, integer) bytes ahead."""
    text = value.strip().lower()
    if text in (*OFF_WORDS, "none"):
        return (0, 0)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) in (1, 2) and all(p.isdigit() for p in parts):
        sizes = [int(p) for p in parts]
        if all(s % 64 == 0 and s <= MAX_PREFETCH for s in sizes):
            return (sizes[0], sizes[-1])
    raise ValueError(
        f"{PREFETCH_ENV} must be auto (the default: chosen for this CPU), 0 or off (no software prefetch), "
        f"or bytes ahead as N or FLOAT,INT (multiples of 64 up to {MAX_PREFETCH}), got {value!r}")


@dataclass(frozen=True)
class DecodeTuning:
    """How the decoding kernels move memory (none of it changes a result)."""

    #: Bytes ahead of each weight stream the float32/bfloat16 products prefetch (0: no prefetch).
    float_prefetch: int
    #: The same for the int8/int4 products.
    int_prefetch: int
    #: Whether the core writes a large new state (2 MB a layer and more) with streaming stores.
    stream_state: bool
    #: Where the choice came from, in words.
    why: str


def _parse_stream(value: str) -> bool:
    text = value.strip().lower()
    if text in ON_WORDS:
        return True
    if text in OFF_WORDS:
        return False
    raise ValueError(f"{STREAM_ENV} must be auto (the default: chosen for this CPU), 1 (streaming stores) "
                     f"or 0 (plain stores), got {value!r}")


def decode_tuning(cpuinfo: str | None = None, env: Mapping[str, str] | None = None) -> DecodeTuning:
    """How the decoding kernels move memory on this CPU (``cpuinfo``: the text of
    ``/proc/cpuinfo``, default this one's): on AMD Zen 4 no software prefetch and plain stores,
    elsewhere 1 KB (float) and 2 KB (integer) ahead and streaming stores.

    ``env`` (default: ``os.environ``) overrides each part where its variable is set to anything
    but ``auto``: ``YARETNET_DECODE_PREFETCH`` (``0``/``off``, ``N`` or ``FLOAT,INT`` bytes) and
    ``YARETNET_DECODE_STREAM_STATE`` (``1`` or ``0``).

    Raises:
        ValueError: a variable is malformed (the message names it).
    """
    env = os.environ if env is None else env
    fields = first_cpu(cpuinfo) or {}
    zen4 = _core(fields) == "Zen 4"
    floats, ints = (0, 0) if zen4 else DEFAULT_PREFETCH
    stream = not zen4
    reasons = ["AMD Zen 4: the hardware prefetcher alone and plain stores are faster" if zen4 else "the default"]
    prefetch = env.get(PREFETCH_ENV, "")
    if prefetch.strip().lower() not in ("", "auto"):
        floats, ints = _parse_prefetch(prefetch)
        reasons.append(f"{PREFETCH_ENV}={prefetch}")
    streaming = env.get(STREAM_ENV, "")
    if streaming.strip().lower() not in ("", "auto"):
        stream = _parse_stream(streaming)
        reasons.append(f"{STREAM_ENV}={streaming}")
    return DecodeTuning(floats, ints, stream, "; ".join(reasons))
