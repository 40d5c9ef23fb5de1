"""The causal intra-chunk kernel (``ops/csrc/intra_chunk.cpp``) against float64 PyTorch."""

from __future__ import annotations

import zlib

import pytest
import torch

from tests.reference import reference_gammas, reference_retention
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.intra_chunk import (
    intra_chunk,
    intra_chunk_applies,
    intra_chunk_reference,
)
from yet_another_retnet.ops.retention import retention_chunkwise


def kernel_available() -> bool:
    return _extension.load() and hasattr(torch.library, "register_autograd")


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest entry (sums of up to 128 float32 products)."""
    return float((got.double() - want).abs().max() / want.abs().max())


def random_mask(heads: int, c: int, gen: torch.Generator) -> torch.Tensor:
    """A (heads, 1, c, c) causal mask with random positive entries (not only decays: every entry
    of the lower triangle must reach the output)."""
    return (torch.rand(heads, 1, c, c, generator=gen) + 0.5).tril()


@pytest.mark.parametrize("shape", [(1, 2, 3, 32, 32, 32), (2, 3, 2, 128, 64, 64), (1, 1, 2, 64, 32, 96)])
def test_kernel_matches_float64_forward_and_backward(shape: tuple[int, ...]) -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    batch, heads, chunks, c, dk, dv = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    q, k = (torch.randn(batch, heads, chunks, c, dk, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, chunks, c, dv, generator=gen, requires_grad=True)
    mask = random_mask(heads, c, gen)
    assert intra_chunk_applies(q, k, v, mask)
    out = intra_chunk(q, k, v, mask)
    ref64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = intra_chunk_reference(*ref64, mask.double())
    assert max_err(out, want) < 1e-6
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad)
    wanted = torch.autograd.grad(want, ref64, grad.double())
    for g, w in zip(got, wanted, strict=True):
        assert max_err(g, w) < 1e-6


def test_falls_back_where_the_kernel_does_not_apply() -> None:
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 3, 24, 16, generator=gen) for _ in range(3))  # chunk 24: not a multiple of 32
    mask = random_mask(2, 24, gen)
    assert not intra_chunk_applies(q, k, v, mask)
    torch.testing.assert_close(intra_chunk(q, k, v, mask), intra_chunk_reference(q, k, v, mask))
    q64, k64, v64 = (torch.randn(1, 1, 1, 32, 32, dtype=torch.float64, generator=gen) for _ in range(3))
    assert not intra_chunk_applies(q64, k64, v64, random_mask(1, 32, gen).double())
    q32, k32, v32 = (t.float() for t in (q64, k64, v64))
    learned = random_mask(1, 32, gen).requires_grad_()
    assert not intra_chunk_applies(q32, k32, v32, learned)  # a mask that needs a gradient: the plain form
    intra_chunk(q32, k32, v32, learned).sum().backward()
    assert learned.grad is not None


def test_kernel_rejects_bad_shapes() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    q = torch.randn(1, 2, 1, 32, 32)
    with pytest.raises(RuntimeError, match=r"mask must be \(heads, 1, chunk, chunk\)"):
        torch.ops.yaretnet.intra_chunk(q, q, q, torch.ones(1, 1, 32, 32))
    with pytest.raises(RuntimeError, match="multiples of 32"):
        torch.ops.yaretnet.intra_chunk(q[..., :16], q[..., :16], q[..., :16], torch.ones(2, 1, 32, 32))
    with pytest.raises(RuntimeError, match="float32 CPU"):
        torch.ops.yaretnet.intra_chunk(q.double(), q.double(), q.double(), torch.ones(2, 1, 32, 32).double())


@pytest.mark.parametrize("length", [256, 64 * 5 + 17])
def test_chunkwise_through_the_kernel_equals_float64_retention(length: int) -> None:
    # The whole chunkwise form with chunk 64 and head size 32 (the kernel's path on CPU float32),
    # a previous state, a length the chunk does not divide: outputs, state and gradients against
    # the independent float64 reference.
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 4, length, 32, generator=gen, requires_grad=True) for _ in range(3))
    prev = torch.randn(2, 4, 32, 32, generator=gen)
    out, state = retention_chunkwise(q, k, v, prev, chunk_size=64)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want_out, want_state = reference_retention(*ref, reference_gammas(4), prev_state=prev.double())
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.double(), want_state, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum() + state.sum(), (q, k, v))
    wanted = torch.autograd.grad(want_out.sum() + want_state.sum(), ref)
    for g, w in zip(grads, wanted, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-3)
