"""Load a kernel module for a device: compiled for CUDA tensors, interpreted for CPU ones.

Triton decides at ``@triton.jit`` time whether a kernel is compiled or run by its interpreter
(``TRITON_INTERPRET``). So that one process can run the compiled kernels on a GPU and the
interpreted ones on CPU tensors (the tests do both where a GPU is present), each kernel module is
loaded twice on demand, once per mode, as two separate module objects, with ``TRITON_INTERPRET``
set for the duration of that load only.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_lock = threading.Lock()
_loaded: dict[tuple[str, bool], ModuleType] = {}


def kernel_module(name: str, interpret: bool) -> ModuleType:
    """The module ``name`` of this package (e.g. ``"chunkwise_kernels"``), its kernels compiled
    (``interpret=False``) or interpreted."""
    key = (name, interpret)
    with _lock:
        module = _loaded.get(key)
        if module is not None:
            return module
        full = f"{__package__}.{name}" + ("_interpreted" if interpret else "")
        spec = importlib.util.spec_from_file_location(full, Path(__file__).with_name(f"{name}.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        with interpreter(interpret):
            sys.modules[full] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(full, None)
                raise
        _loaded[key] = module
        return module


def interpreter(on: bool) -> contextlib.AbstractContextManager[None]:
    """``TRITON_INTERPRET`` set to ``on`` for the duration (Triton reads it when a kernel is
    decorated and again in parts of a launch), then restored."""
    return environment("TRITON_INTERPRET", "1" if on else "0")


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` for the duration, then restored (or
    removed, where it was unset)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def outside_graphs(fn: F) -> F:
    """``fn`` as ``torch.compile`` should meet it: run eagerly, as a graph break (tracing into a
    launcher fails: module loading, the interpreter's environment switch, Triton's launch code;
    under the interpreter dynamo would trace NumPy). ``torch.compiler.disable`` is applied on the
    first call, not here: it imports dynamo (~70 MiB, ~1 s), which a process that never launches
    a kernel (CPU training) should not pay for."""
    disabled: list[Callable[..., Any]] = []

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if not disabled:
            disabled.append(torch.compiler.disable(fn))
        return disabled[0](*args, **kwargs)

    return call  # type: ignore[return-value]
