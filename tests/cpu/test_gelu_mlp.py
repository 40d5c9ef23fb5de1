"""The fused GELU feed-forward node (``ops/cpu/mlp.py``, ``ops/cpu/csrc/mlp.cpp``) against float64 math."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from reference import second_derivatives

from yet_another_retnet.layers.feedforward import FeedForward
from yet_another_retnet.ops import _extension
from yet_another_retnet.ops.matmul import linear
from yet_another_retnet.ops.mlp import gelu_mlp, gelu_mlp_apply, gelu_mlp_reference


def kernel_available() -> bool:
    return _extension.load()


def float64_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
                b2: torch.Tensor | None) -> torch.Tensor:
    """The formula written out: x Phi(x) with Phi from erf, no F.gelu, no F.linear."""
    h = x @ w1.T + (b1 if b1 is not None else 0)
    g = h * 0.5 * (1 + torch.erf(h / math.sqrt(2)))
    return g @ w2.T + (b2 if b2 is not None else 0)


def inputs(shape: tuple[int, ...], hidden: int, bias: bool, seed: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(*shape, generator=gen) * 2
    w1 = torch.randn(hidden, d, generator=gen) * 1.5 / math.sqrt(d)  # pre-activations ~N(0, 9): both tails
    w2 = torch.randn(d, hidden, generator=gen) / math.sqrt(hidden)
    b1 = torch.randn(hidden, generator=gen) if bias else None
    b2 = torch.randn(d, generator=gen) if bias else None
    return [t.requires_grad_() if t is not None else None for t in (x, w1, b1, w2, b2)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


@pytest.mark.parametrize(("shape", "hidden", "bias"), [((2, 37, 64), 96, False), ((3, 5, 48), 33, True),
                                                       ((300, 16), 128, True)])
def test_fused_node_matches_float64(shape: tuple[int, ...], hidden: int, bias: bool) -> None:
    # Output and every gradient; hidden 33 leaves a partial vector at the kernel's end.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    args = inputs(shape, hidden, bias, seed=hidden)
    assert gelu_mlp_apply(*args)
    out = gelu_mlp(*args)
    assert "GeluMLP" in out.grad_fn.name()  # the fused node ran
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    want = float64_mlp(*args64)
    assert out.shape == want.shape and rel_err(out, want) < 2e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [a for a in args if a is not None]
    leaves64 = [a for a in args64 if a is not None]
    got = torch.autograd.grad(out, leaves, grad)
    wanted = torch.autograd.grad(want, leaves64, grad.double())
    for g, w in zip(got, wanted, strict=True):
        assert g.shape == w.shape and rel_err(g, w) < 2e-6


def test_gelu_slope_kernel_matches_float64() -> None:
    # The GELU and its derivative over both tails and around the minimum (x ~ -0.75), 1,001 values
    # (not a multiple of the vector width).
    if not kernel_available():
        pytest.skip("kernel unavailable")
    x = torch.linspace(-12, 12, 1001)
    y, slope = torch.ops.yaretnet.gelu_slope(x)
    x64 = x.double()
    cdf = 0.5 * (1 + torch.erf(x64 / math.sqrt(2)))
    pdf = torch.exp(-x64.square() / 2) / math.sqrt(2 * math.pi)
    torch.testing.assert_close(y.double(), x64 * cdf, rtol=0, atol=1e-6)
    torch.testing.assert_close(slope.double(), cdf + x64 * pdf, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        torch.ops.yaretnet.gelu_slope(x64)


def test_only_some_inputs_need_gradients() -> None:
    # Frozen weights (fine-tuning an adapter elsewhere): only x's gradient, still the fused node.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    x, w1, b1, w2, b2 = inputs((4, 9, 32), 64, True, seed=3)
    frozen = [t.detach() for t in (w1, b1, w2, b2)]  # type: ignore[union-attr]
    out = gelu_mlp(x, *frozen)
    assert "GeluMLP" in out.grad_fn.name()
    (dx,) = torch.autograd.grad(out.square().sum(), [x])
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(float64_mlp(x64, *(t.double() for t in frozen)).square().sum(), [x64])
    assert rel_err(dx, want) < 2e-6


def test_double_backward_matches_float64() -> None:
    # The fused backward is not differentiable: with create_graph=True the plain form's runs.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    args = [a for a in inputs((2, 7, 16), 24, True, seed=5) if a is not None]
    args64 = [a.detach().double().requires_grad_() for a in args]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = second_derivatives(gelu_mlp, args)
    want = second_derivatives(float64_mlp, args64)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-5


def test_plain_path_where_the_node_does_not_apply() -> None:
    # float64, inference (no gradient: the slope would be wasted) and bfloat16 autocast take the
    # plain form, which is the same formula.
    args = inputs((2, 5, 16), 32, True, seed=7)
    args64 = [a.detach().double() if a is not None else None for a in args]
    assert not gelu_mlp_apply(*args64)
    torch.testing.assert_close(gelu_mlp(*args64), float64_mlp(*args64), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert not gelu_mlp_apply(*args)
        out = gelu_mlp(*args)
    torch.testing.assert_close(out.double(), float64_mlp(*args64), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gelu_mlp_apply(*args)
        out = gelu_mlp(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), float64_mlp(*args64), rtol=0.05, atol=0.1)
    torch.testing.assert_close(gelu_mlp_reference(*args64), float64_mlp(*args64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kind", "activation", "dropout", "fused"), [
    ("mlp", "gelu", 0.0, True), ("mlp", "gelu", 0.3, False), ("mlp", "relu", 0.0, False), ("glu", "gelu", 0.0, False),
])
def test_feedforward_module_equals_its_float64_copy(kind: str, activation: str, dropout: float, fused: bool) -> None:
    # The module takes the fused node only for the paper's MLP without activation dropout while
    # training; its output and parameter gradients equal a float64 copy's (with dropout: in eval
    # mode, where the fused node applies again).
    torch.manual_seed(0)
    ffn = FeedForward(32, 64, kind, activation, bias=True, activation_dropout=dropout).train()
    ffn64 = FeedForward(32, 64, kind, activation, bias=True, activation_dropout=dropout).double()
    ffn64.load_state_dict(ffn.state_dict())
    x = torch.randn(3, 11, 32)
    y = ffn(x)
    assert ("GeluMLP" in y.grad_fn.name()) == (fused and kernel_available())
    if dropout:
        ffn.eval()
        y = ffn(x)
        assert ("GeluMLP" in y.grad_fn.name()) == kernel_available()
    y64 = ffn64.train(ffn.training)(x.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y64.square().sum().backward()
    for (name, p), p64 in zip(ffn.named_parameters(), ffn64.parameters(), strict=True):
        assert rel_err(p.grad, p64.grad) < 1e-5, name


@pytest.mark.parametrize("bias", [False, True])
def test_residual_inside_the_fused_node_matches_float64(bias: bool) -> None:
    # The block's skip connection added inside the second product: output and every gradient,
    # the residual's included.
    if not kernel_available():
        pytest.skip("kernel unavailable")
    args = inputs((2, 19, 32), 48, bias, seed=11)
    residual = torch.randn(2, 19, 32, generator=torch.Generator().manual_seed(12)).requires_grad_()
    out = gelu_mlp(*args, residual)
    assert "GeluMLP" in out.grad_fn.name()
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    residual64 = residual.detach().double().requires_grad_()
    want = residual64 + float64_mlp(*args64)
    assert rel_err(out, want) < 2e-6
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(13))
    leaves = [a for a in args if a is not None] + [residual]
    leaves64 = [a for a in args64 if a is not None] + [residual64]
    for g, w in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(want, leaves64, grad.double()),
                    strict=True):
        assert rel_err(g, w) < 2e-6
    if not bias:
        return
    # Twice differentiable through the plain form.
    got2 = second_derivatives(lambda *a: gelu_mlp(*a[:-1], a[-1]), leaves)
    want2 = second_derivatives(lambda *a: a[-1] + float64_mlp(*a[:-1]), leaves64)
    for g, w in zip(got2, want2, strict=True):
        assert rel_err(g, w) < 1e-5


def test_residual_without_autograd_and_in_other_dtypes() -> None:
    # Inference (the GELU in place on the first product), float64 and bfloat16 autocast: each the
    # residual plus the formula, the residual never rounded to half precision.
    args = inputs((3, 7, 16), 40, False, seed=14)
    args64 = [a.detach().double() if a is not None else None for a in args]
    residual = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(15))
    want = residual.double() + float64_mlp(*args64)
    with torch.inference_mode():
        out = gelu_mlp(*args, residual)
    assert rel_err(out, want) < 2e-6
    torch.testing.assert_close(gelu_mlp(*args64, residual.double()), want, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gelu_mlp(*args, residual)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), want, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_with_residual_is_the_residual_plus_the_product(bias: bool) -> None:
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(2, 9, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(12, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    residual = torch.randn(2, 9, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    out = linear(x, w, b, residual)
    want = residual + x @ w.T + (b if b is not None else 0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    leaves = [t for t in (x, w, b, residual) if t is not None]
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for g, e in zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(want, leaves, grad), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(linear(x, w, b), want - residual, rtol=1e-12, atol=1e-12)
