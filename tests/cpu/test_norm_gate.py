"""The head norm + swish gate CPU kernel (``ops/cpu/csrc/norm_gate.cpp``) against float64 math."""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch
from reference import second_derivatives

from yet_another_retnet.layers.retention import MultiScaleRetention
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.norm_gate import norm_gate, norm_gate_apply, norm_gate_reference

EPS = 1e-6


def kernel_available() -> bool:
    return _extension.load() and hasattr(torch.library, "register_autograd")


def float64_norm_gate(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The formula written out (no layer_norm, no silu): x ``(b, h, L, dv)``, z ``(b, L, h dv)``."""
    batch, heads, length, dv = x.shape
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).square().mean(-1, keepdim=True)
    xhat = ((x - mean) / torch.sqrt(var + EPS)).transpose(1, 2).reshape(batch, length, heads * dv)
    return z / (1 + torch.exp(-z)) * (xhat * w + b)


def inputs(batch: int, heads: int, length: int, dv: int) -> list[torch.Tensor]:
    """retained as the transposed view the layer hands over, the gate as a column slice of a wider
    projection (rows not contiguous), affine parameters away from 1 and 0. Gate values up to +-40
    so the sigmoid saturates on both sides."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((batch, heads, length, dv)).encode()))
    x = (torch.randn(batch, length, heads, dv, generator=gen) * 3 + 1).transpose(1, 2)
    proj = torch.randn(batch, length, 2 * heads * dv, generator=gen) * 4
    proj[0, 0, heads * dv:heads * dv + 2] = torch.tensor([40.0, -40.0])
    z = proj[..., heads * dv:]
    w = 1 + 0.5 * torch.randn(heads * dv, generator=gen)
    b = 0.5 * torch.randn(heads * dv, generator=gen)
    return [t.detach().requires_grad_() for t in (x, z, w, b)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("shape", [(2, 4, 37, 64), (1, 3, 5, 16), (1, 1, 600, 32)])
def test_kernel_matches_float64(shape: tuple[int, int, int, int]) -> None:
    # Output and the four gradients; 600 rows span several of the backward's partial-sum tasks.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    args = inputs(*shape)
    assert norm_gate_apply(*args)
    out = norm_gate(*args, EPS)
    assert "yaretnet" in out.grad_fn.name()  # the kernel ran
    args64 = [a.detach().double().requires_grad_() for a in args]
    want = float64_norm_gate(*args64)
    assert rel_err(out, want) < 1e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, args, grad)
    wanted = torch.autograd.grad(want, args64, grad.double())
    for g, w in zip(got, wanted, strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 2e-6


def test_reference_matches_float64_in_every_dtype() -> None:
    # The plain form (the path where the kernel does not apply) is the same formula.
    args = [a.detach().double() for a in inputs(2, 2, 9, 16)]
    torch.testing.assert_close(norm_gate_reference(*args, EPS), float64_norm_gate(*args), rtol=1e-12, atol=1e-12)
    x, z, w, b = (a.float() for a in args)
    out = norm_gate(x.bfloat16(), z.bfloat16(), w, b, EPS, torch.bfloat16)  # half: the plain path
    torch.testing.assert_close(out.float(), float64_norm_gate(*args).float(), rtol=0.05, atol=0.1)


def test_double_backward_matches_float64() -> None:
    # The kernel's backward is not differentiable: with create_graph=True the plain form's backward
    # runs instead (no warning: torch only warns, then returns a wrong result, when it cannot).
    if not kernel_available():
        pytest.skip("kernel unavailable")
    args = inputs(1, 2, 7, 16)
    args64 = [a.detach().double().requires_grad_() for a in args]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = second_derivatives(lambda *a: norm_gate(*a, EPS), args)
    want = second_derivatives(float64_norm_gate, args64)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5


def test_falls_back_where_the_kernel_does_not_apply() -> None:
    for args in (inputs(1, 2, 5, 24), [a.detach().double() for a in inputs(1, 2, 5, 16)]):  # dv 24; float64
        assert not norm_gate_apply(*args)
        got = norm_gate(*args, EPS)
        assert got.grad_fn is None or "yaretnet" not in got.grad_fn.name()
        torch.testing.assert_close(got.double(), float64_norm_gate(*(a.detach().double() for a in args)),
                                   rtol=1e-5, atol=1e-5)


def test_kernel_rejects_bad_shapes() -> None:
    if not kernel_available():
        pytest.skip("kernel unavailable")
    x, z, w, b = (a.detach() for a in inputs(1, 2, 5, 16))
    with pytest.raises(RuntimeError, match=r"gate must be \(batch, length, heads \* head_dim\)"):
        torch.ops.yaretnet.norm_gate(x, z[:, :4], w, b, EPS)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.yaretnet.norm_gate(x[..., :8], z[..., :16], w[:16], b[:16], EPS)
    with pytest.raises(RuntimeError, match=r"weight and bias must be \(32,\)"):
        torch.ops.yaretnet.norm_gate(x, z, w[:16], b, EPS)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        torch.ops.yaretnet.norm_gate(x.double(), z.double(), w.double(), b.double(), EPS)
    with pytest.raises(RuntimeError, match="grad must be"):
        torch.ops.yaretnet.norm_gate_backward(z[:, :3], x, z, w, b, EPS)


def test_layer_through_the_kernel_equals_its_float64_copy() -> None:
    # A whole retention layer in chunkwise form (float32: the kernel; float64: the plain path),
    # outputs and parameter gradients. (Compiled: models/test_fast_decoding.py's compile_chunkwise test, whose
    # layers take the kernel too, against eager.)
    if not kernel_available():
        pytest.skip("kernel unavailable")
    torch.manual_seed(0)
    layer = MultiScaleRetention(64, 2)
    with torch.no_grad():
        layer.norm_weight.add_(torch.randn(layer.value_dim) * 0.3)
        layer.norm_bias.add_(torch.randn(layer.value_dim) * 0.3)
    layer64 = MultiScaleRetention(64, 2).double()
    layer64.load_state_dict(layer.state_dict())
    x = torch.randn(2, 40, 64)
    with torch.profiler.profile() as prof:
        y, _ = layer.forward_chunkwise(x, x, x, chunk_size=16)
    assert any("yaretnet::norm_gate" in e.name for e in prof.events())  # the kernel ran
    y64, _ = layer64.forward_chunkwise(*(x.double(),) * 3, chunk_size=16)
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    y64.square().sum().backward()
    for name, p in layer.named_parameters():
        p64 = dict(layer64.named_parameters())[name]
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-3, atol=1e-4, msg=name)
