"""The projection split + rotation CPU kernel (``ops/cpu/csrc/split_heads.cpp``) against float64."""

from __future__ import annotations

import warnings

import pytest
import torch

from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.position import rotation_tables
from yet_another_retnet.ops.split_heads import split_heads, split_heads_apply, split_heads_reference

HEADS, DK, DV = 3, 8, 16
WIDTH = 2 * HEADS * DK + 2 * HEADS * DV


def kernel_available() -> bool:
    return _extension.load() and hasattr(torch.library, "register_autograd")


def tables(batch: int, length: int, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 or batch, length, DK)`` tables at positions that differ per row when ``per_row``."""
    positions = torch.arange(length)[None] + (torch.tensor([[0], [5]])[:batch] if per_row else 0)
    return rotation_tables(positions, DK, torch.float32)


def float64_split(proj: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> list[torch.Tensor]:
    """The split written out: each (even, odd) pair of q and k rotated by its angle."""
    batch, length, _ = proj.shape
    q, k = (proj[..., i * HEADS * DK:(i + 1) * HEADS * DK].reshape(batch, length, HEADS, DK) for i in (0, 1))
    if cos is not None and sin is not None:
        c, s = cos[:, :, None, 0::2], sin[:, :, None, 0::2]

        def rot(x: torch.Tensor) -> torch.Tensor:
            a, b = x[..., 0::2], x[..., 1::2]
            return torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)

        q, k = rot(q), rot(k)
    v = proj[..., 2 * HEADS * DK:2 * HEADS * DK + HEADS * DV].reshape(batch, length, HEADS, DV)
    gate = proj[..., 2 * HEADS * DK + HEADS * DV:]
    return [q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate]


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_kernel_matches_float64(rotate: bool, per_row: bool) -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    gen = torch.Generator().manual_seed(3 + rotate + 2 * per_row)
    wide = torch.randn(2, 37, WIDTH + 5, generator=gen)
    proj = wide[..., :WIDTH].detach().requires_grad_()  # rows WIDTH + 5 apart: not contiguous
    cos, sin = tables(2, 37, per_row) if rotate else (None, None)
    assert split_heads_apply(proj, cos)
    outs = split_heads(proj, cos, sin, HEADS, DK)
    assert all(o.is_contiguous() for o in outs) and "yaretnet" in outs[0].grad_fn.name()  # the kernel ran
    proj64 = proj.detach().double().requires_grad_()
    wants = float64_split(proj64, *((cos.double(), sin.double()) if rotate else (None, None)))
    for got, want in zip(outs, wants, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    grads = [torch.randn(o.shape, generator=gen) for o in outs]
    (got_grad,) = torch.autograd.grad(outs, proj, grads, retain_graph=True)
    (want_grad,) = torch.autograd.grad(wants, proj64, [g.double() for g in grads])
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-6, atol=1e-6)
    # An unused output (the gate, as when a caller ignores it) gives zero gradient there.
    (partial,) = torch.autograd.grad(outs[:3], proj, grads[:3])
    assert partial[..., 2 * HEADS * DK + HEADS * DV:].abs().max() == 0
    torch.testing.assert_close(partial[..., :2 * HEADS * DK + HEADS * DV], got_grad[..., :2 * HEADS * DK + HEADS * DV])


def test_reference_matches_float64() -> None:
    gen = torch.Generator().manual_seed(9)
    proj = torch.randn(2, 11, WIDTH, dtype=torch.float64, generator=gen)
    cos, sin = (t.double() for t in tables(2, 11, True))
    for got, want in zip(split_heads_reference(proj, cos, sin, HEADS, DK), float64_split(proj, cos, sin), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not split_heads_apply(proj, cos)  # float64: the plain path


def test_double_backward_matches_float64() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    gen = torch.Generator().manual_seed(4)
    proj = torch.randn(1, 9, WIDTH, generator=gen, requires_grad=True)
    cos, sin = tables(1, 9, False)
    proj64 = proj.detach().double().requires_grad_()

    def second(fn, x: torch.Tensor) -> torch.Tensor:
        outs = fn(x)
        (first,) = torch.autograd.grad(sum((o.square() * o).sum() for o in outs), x, create_graph=True)
        (again,) = torch.autograd.grad(first.square().sum(), x)
        return again

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = second(lambda x: split_heads(x, cos, sin, HEADS, DK), proj)
    want = second(lambda x: float64_split(x, cos.double(), sin.double()), proj64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_shapes() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    proj = torch.randn(1, 4, WIDTH)
    cos, sin = tables(1, 4, False)
    with pytest.raises(RuntimeError, match="last dim must be 2 heads key_dim"):
        torch.ops.yaretnet.split_heads(proj[..., :-1], cos, sin, HEADS, DK)
    with pytest.raises(RuntimeError, match="key_dim even"):
        torch.ops.yaretnet.split_heads(proj, None, None, HEADS, 7)
    with pytest.raises(RuntimeError, match=r"cos must be \(1 or batch, length, key_dim\)"):
        torch.ops.yaretnet.split_heads(proj, cos[:, :3], sin, HEADS, DK)
    with pytest.raises(RuntimeError, match="given together"):
        torch.ops.yaretnet.split_heads(proj, cos, None, HEADS, DK)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        torch.ops.yaretnet.split_heads(proj.double(), None, None, HEADS, DK)
