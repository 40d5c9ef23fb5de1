"""The chunk-state scan (``ops/cpu/csrc/chunk_scan.cpp``) against a float64 loop and the decay-matrix form."""

from __future__ import annotations

import zlib

import pytest
import torch

from yet_another_retnet.ops.chunk_scan import (
    chunk_scan,
    chunk_scan_applies,
    chunk_scan_kernel_available,
)
from yet_another_retnet.ops.retention import retention_chunkwise, retention_chunkwise_reference


def loop_reference(contributions: torch.Tensor, decay: torch.Tensor,
                   prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one chunk at a time, in float64."""
    c, d = contributions.double(), decay.double().view(1, -1, 1)
    state = torch.zeros_like(c[:, :, 0]) if prev is None else prev.double()
    befores = []
    for i in range(c.shape[2]):
        befores.append(state)
        state = d * state + c[:, :, i]
    return torch.stack(befores, dim=2), state


@pytest.mark.parametrize("n", [1, 2, 7, 130])
@pytest.mark.parametrize("with_prev", [False, True])
@pytest.mark.parametrize("size", [5, 256, 300])
def test_scan_matches_a_float64_loop_forward_and_backward(n: int, with_prev: bool, size: int) -> None:
    if not chunk_scan_kernel_available():
        pytest.skip("kernel unavailable")
    gen = torch.Generator().manual_seed(zlib.crc32(repr((n, with_prev, size)).encode()))
    contributions = torch.randn(2, 3, n, size, generator=gen, requires_grad=True)
    decay = torch.rand(3, generator=gen) * 0.5 + 0.5
    prev = torch.randn(2, 3, size, generator=gen, requires_grad=True) if with_prev else None
    assert chunk_scan_applies(contributions, decay)
    befores, final = chunk_scan(contributions, decay, prev)
    want_befores, want_final = loop_reference(contributions, decay, prev)
    torch.testing.assert_close(befores.double(), want_befores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.double(), want_final, rtol=1e-5, atol=1e-5)
    grad_b, grad_f = torch.randn(befores.shape, generator=gen), torch.randn(final.shape, generator=gen)
    inputs = [contributions] + ([prev] if prev is not None else [])
    got = torch.autograd.grad((befores * grad_b).sum() + (final * grad_f).sum(), inputs)
    c64 = contributions.detach().double().requires_grad_()
    p64 = None if prev is None else prev.detach().double().requires_grad_()
    wb, wf = loop_reference(c64, decay, p64)
    want = torch.autograd.grad((wb * grad_b.double()).sum() + (wf * grad_f.double()).sum(),
                               [c64] + ([p64] if p64 is not None else []))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_scan_with_only_one_output_used() -> None:
    if not chunk_scan_kernel_available():
        pytest.skip("kernel unavailable")
    contributions = torch.randn(1, 2, 4, 8, requires_grad=True)
    decay = torch.tensor([0.9, 0.5])
    _, final = chunk_scan(contributions, decay, None)
    (grad,) = torch.autograd.grad(final.sum(), contributions)  # befores unused: its gradient is None
    expected = decay.view(1, 2, 1, 1) ** torch.arange(3, -1, -1).view(1, 1, 4, 1)
    torch.testing.assert_close(grad, expected.expand(1, 2, 4, 8))


def test_scan_rejects_bad_shapes_and_dtypes() -> None:
    if not chunk_scan_kernel_available():
        pytest.skip("kernel unavailable")
    with pytest.raises(RuntimeError, match=r"decay must be \(heads,\)"):
        torch.ops.yaretnet.chunk_scan(torch.randn(1, 2, 3, 4), torch.rand(3), None)
    with pytest.raises(RuntimeError, match="prev must be"):
        torch.ops.yaretnet.chunk_scan(torch.randn(1, 2, 3, 4), torch.rand(2), torch.randn(1, 2, 5))
    with pytest.raises(RuntimeError, match="float32 CPU"):
        torch.ops.yaretnet.chunk_scan(torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.rand(2), None)
    assert not chunk_scan_applies(torch.randn(1, 2, 3, 4, dtype=torch.float64), torch.rand(2))


@pytest.mark.parametrize("length", [300, 1024 + 17])
def test_chunkwise_with_the_scan_equals_the_loop_reference(length: int) -> None:
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 4, length, 16, generator=gen, requires_grad=True) for _ in range(3))
    prev = torch.randn(2, 4, 16, 16, generator=gen)
    out, state = retention_chunkwise(q, k, v, prev, chunk_size=32)
    ref_out, ref_state = retention_chunkwise_reference(q.double(), k.double(), v.double(), prev.double(), 32)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), ref_state, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum() + state.sum(), (q, k, v))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    r_out, r_state = retention_chunkwise_reference(*ref, prev.double(), 32)
    ref_grads = torch.autograd.grad(r_out.sum() + r_state.sum(), ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-3)
