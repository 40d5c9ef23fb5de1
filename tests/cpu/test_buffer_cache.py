"""The CPU buffer cache (``ops/cpu/memory.py``, ``ops/cpu/csrc/memory.cpp``)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import kernels_expected

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.ops.memory import cache_built, cached_cpu_memory

HAS_TOOLCHAIN = kernels_expected()


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_cache_turns_on_where_the_extension_builds() -> None:
    if not HAS_TOOLCHAIN:
        pytest.skip("no C++ compiler (or kernels disabled)")
    if not cache_built():
        pytest.skip(f"torch {torch.__version__} ships no caching allocator header: the cache stays off")
    with cached_cpu_memory() as on:
        assert on


def test_a_freed_buffer_is_reused_without_new_page_faults() -> None:
    with cached_cpu_memory() as on:
        if not on:
            pytest.skip("extension unavailable")
        big = torch.empty(16 << 20)  # 64 MiB: glibc would map fresh pages for each of these
        big.fill_(1.0)
        del big
        before = faults()
        again = torch.empty(16 << 20)
        again.fill_(2.0)
        touched = faults() - before
        assert float(again[-1]) == 2.0
    # 16,384 pages of 4 KiB would fault in fresh; the reused block is already mapped.
    assert touched < 1_000, touched


def test_training_steps_inside_the_cache_equal_steps_outside() -> None:
    config = RetNetConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0)
    tokens = torch.randint(0, 64, (2, 97), generator=torch.Generator().manual_seed(11))

    def run() -> tuple[list[float], list[torch.Tensor]]:
        torch.manual_seed(3)
        model = RetNet(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):  # later steps run on recycled (dirty) buffers
            loss = model(tokens, mode="chunkwise", chunk_size=16, labels=tokens).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach().item())
        return losses, [p.detach().clone() for p in model.parameters()]

    plain_losses, plain_params = run()
    with cached_cpu_memory(min_bytes=1024) as on:  # small threshold: most buffers go through it
        cached_losses, cached_params = run()
    assert on or not HAS_TOOLCHAIN or not cache_built()
    assert cached_losses == pytest.approx(plain_losses, rel=1e-6)
    for a, b in zip(plain_params, cached_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tensors_outlive_the_cache_and_nesting_keeps_it_on() -> None:
    with cached_cpu_memory(min_bytes=1024) as outer:
        kept = torch.arange(100_000, dtype=torch.float64)
        with cached_cpu_memory() as inner:
            assert inner == outer
            scratch = torch.ones(50_000)
            del scratch
        # still on after the inner exit: a same-size request is served and correct
        again = torch.full((50_000,), 3.0)
        assert float(again.sum()) == 150_000.0
    # the cache is gone; a tensor made inside it is intact and is freed normally later
    assert torch.equal(kept, torch.arange(100_000, dtype=torch.float64))
    del kept


def test_bad_min_bytes_is_refused() -> None:
    with pytest.raises(TypeError, match="min_bytes"), cached_cpu_memory(min_bytes=1.5):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError, match="min_bytes must be >= 1"), cached_cpu_memory(min_bytes=0):
        pass


def test_without_the_extension_the_cache_is_off_and_harmless() -> None:
    code = ("import torch; from yet_another_retnet.ops.memory import cached_cpu_memory\n"
            "with cached_cpu_memory() as on:\n"
            "    x = torch.ones(1 << 20); assert not on and float(x.sum()) == 1 << 20\n"
            "print('ok')")
    env = {**os.environ, "YARETNET_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_long_forward_inside_the_cache_equals_the_plain_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from yet_another_retnet.models import retnet as retnet_module

    # Big enough that the FFN's hidden activations (2 MiB) and the logits (1 MiB) go through the cache.
    config = RetNetConfig(vocab_size=64, d_model=64, num_heads=2, num_layers=3, ffn_dim=256, dropout=0.0)
    torch.manual_seed(5)
    model = RetNet(config).eval()
    tokens = torch.randint(0, 64, (2, 2048), generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(retnet_module, "_CACHE_FROM_TOKENS", 10**9)
    with torch.no_grad():
        plain = model(tokens, mode="chunkwise", chunk_size=128)
    monkeypatch.setattr(retnet_module, "_CACHE_FROM_TOKENS", 16)  # this input now runs in the cache
    with torch.no_grad():
        cached = model(tokens, mode="chunkwise", chunk_size=128)
        again = model(tokens, mode="chunkwise", chunk_size=128)  # on recycled buffers
    for out in (cached, again):
        torch.testing.assert_close(out.logits, plain.logits, rtol=1e-6, atol=1e-6)
        for a, b in zip(out.state.memories, plain.state.memories, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_forked_child_can_allocate_inside_the_cache() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    with cached_cpu_memory() as on:
        if not on:
            pytest.skip("extension unavailable")
        big = torch.ones(1 << 20)
        pid = os.fork()
        if pid == 0:  # the child: allocate through the inherited cache, then leave at once
            torch.set_num_threads(1)  # OpenMP's pool does not survive fork (as in DataLoader workers)
            ok = float((big + torch.ones(1 << 20)).sum()) == 2.0 * (1 << 20)
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:  # a deadlocked child must not hang CI
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung")
            time.sleep(0.05)
        assert os.waitstatus_to_exitcode(waited[1]) == 0
