"""Reuse large CPU buffers across training steps instead of page-faulting fresh ones every step.

glibc hands every allocation above its mmap threshold (at most 32 MiB) back to the OS when it is
freed, so a training step at long sequence lengths maps, zero-fills and faults in gigabytes of
pages again each time: ~170,000 page faults per step for the d256 model at 16k tokens, and a
matmul writing into a fresh 64 MiB output runs at ~206 GFLOP/s instead of ~329 into a reused one
(2-core Xeon).

:func:`cached_cpu_memory` puts PyTorch's exact-size block cache (``c10::CPUCachingAllocator``)
in front of the CPU allocator while it is active: a freed buffer of at least ``min_bytes`` waits
for the next request of the same size. A loop with fixed shapes (training, evaluation, repeated
prefill) then allocates nothing new after its first step. When the outermost ``with`` exits the
cached buffers are freed; buffers still in use are freed normally later.

Memory: the cache holds, for each size, as many buffers as were alive at once, so the peak
resident memory can exceed that of the plain allocator when many different sizes come and go
(prompts of ever-changing lengths); use it around loops with a few fixed shapes.

Built with the package's C++ extension (``csrc/memory.cpp``, :mod:`._extension`); without it (no
compiler, or ``YARETNET_FAST_PATH=0``) the context manager does nothing and says so through its
value. Reference: the plain allocator; ``tests/cpu/test_buffer_cache.py`` checks that a training step gives
the same results in the cache and out of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from . import _extension

__all__ = ["cache_built", "cached_cpu_memory", "supports"]

#: Allocations below this go to the plain allocator: glibc serves them from its heap without faults.
DEFAULT_MIN_BYTES = 1 << 20

_lock = threading.Lock()
_depth = 0
_active = False  # whether the outermost use turned the cache on


def supports() -> bool:
    """Whether :func:`cached_cpu_memory` can turn the cache on: the kernels not ruled out. Pure:
    never builds the extension."""
    return _extension.usable()


def cache_built() -> bool:
    """Whether the extension builds here (it is built if need be) and holds the cache: PyTorch's
    wheels ship the caching allocator's header only from some 2.x release on (2.2's do not), and
    without it :func:`cached_cpu_memory` always yields ``False``."""
    return _extension.load() and bool(torch.ops.yaretnet.cpu_memory_cache_built())


@contextmanager
def cached_cpu_memory(min_bytes: int = DEFAULT_MIN_BYTES) -> Iterator[bool]:
    """Cache freed CPU tensor buffers of at least ``min_bytes`` for reuse while active.

    Yields whether the cache is on (``False`` where the extension is unavailable, or where another
    CPU allocator registered with a higher priority is in charge). Nested uses share one cache;
    the outermost exit frees it. The tensors themselves are ordinary CPU tensors throughout.

    Raises:
        TypeError: ``min_bytes`` is not an int. ValueError: ``min_bytes < 1``.
    """
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int):
        raise TypeError(f"min_bytes must be an int, got {type(min_bytes).__name__}")
    if min_bytes < 1:
        raise ValueError(f"min_bytes must be >= 1, got {min_bytes}")
    global _depth
    if not (supports() and _extension.load()):
        yield False
        return
    global _active
    with _lock:
        if _depth == 0:  # nested uses report what the outermost one got
            _active = bool(torch.ops.yaretnet.cpu_memory_cache_enable(min_bytes))
        active = _active
        _depth += 1
    try:
        yield active
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.ops.yaretnet.cpu_memory_cache_disable()
