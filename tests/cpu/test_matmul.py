"""ops/cpu/matmul.py: the float32 products on either CPU backend against a float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from yet_another_retnet.ops import matmul

HAS_ONEDNN = hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available()
BACKENDS = ["aten", pytest.param("onednn", marks=pytest.mark.skipif(not HAS_ONEDNN, reason="no oneDNN linear op"))]


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(matmul, "_choice", request.param)
    return str(request.param)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).abs().max() / want.detach().abs().max())


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("out_dim", [96, 640])  # narrower and wider than the input
def test_linear_and_its_gradients_match_float64(backend: str, bias: bool, residual: bool, out_dim: int) -> None:
    gen = torch.Generator().manual_seed(out_dim + 2 * bias + residual)
    x = torch.randn(3, 100, 320, generator=gen)  # 300 rows: above MIN_MACS for both widths
    w = torch.randn(out_dim, 320, generator=gen) / 320**0.5
    b = torch.randn(out_dim, generator=gen) if bias else None
    r = torch.randn(3, 100, out_dim, generator=gen) if residual else None
    leaves = [t for t in (x, w, b, r) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = matmul.linear(x, w, b, r)
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    xd, wd = ref_leaves[0], ref_leaves[1]
    bd = ref_leaves[2] if bias else None
    want_out = F.linear(xd, wd, bd) + (ref_leaves[-1] if residual else 0)
    want = torch.autograd.grad(want_out, ref_leaves, grad.double())
    assert out.shape == (3, 100, out_dim) and out.dtype == torch.float32
    assert _rel_err(out, want_out) < 1e-5
    for g, e, t in zip(got, want, leaves, strict=True):
        assert g.shape == t.shape
        assert _rel_err(g, e) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize(("n", "k"), [(1024, 256), (256, 512), (384, 384)])
def test_grad_weight_in_either_orientation(backend: str, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * k)
    g, x = torch.randn(700, n, generator=gen), torch.randn(700, k, generator=gen)
    got = matmul.grad_weight(g, x)
    assert got.shape == (n, k)
    assert _rel_err(got, g.double().t() @ x.double()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_mm_nt_with_transposed_operands_bias_and_addend(backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(256, 300, generator=gen).t()  # (300, 256), a transposed view
    b = torch.randn(512, 256, generator=gen)
    bias, add = torch.randn(512, generator=gen), torch.randn(300, 512, generator=gen)
    got = matmul.mm_nt(a, b, bias, add)
    want = add.double() + a.double() @ b.double().t() + bias.double()
    assert _rel_err(got, want) < 1e-5
    assert _rel_err(matmul.mm_nt(a, b.t().contiguous().t()), a.double() @ b.double().t()) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_double_backward_goes_through_the_plain_product(backend: str) -> None:
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(128, 256, generator=gen), torch.randn(384, 256, generator=gen) / 16,
              torch.randn(128, 384, generator=gen)]

    def second_order(linear: object, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        x, w, r = (t.to(dtype).requires_grad_(True) for t in inputs)
        out = linear(x, w, None, r)  # type: ignore[operator]
        (gx,) = torch.autograd.grad(out.square().sum(), [x], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, w, r])

    def plain(x: torch.Tensor, w: torch.Tensor, b: None, r: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w) + r

    for g, e in zip(second_order(matmul.linear, torch.float32), second_order(plain, torch.float64), strict=True):
        assert _rel_err(g, e) < 1e-5


def test_small_products_and_other_dtypes_stay_on_aten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matmul, "_choice", "onednn")
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(2, 64, generator=gen), torch.randn(32, 64, generator=gen)  # far below MIN_MACS
    assert torch.equal(matmul.linear(x, w), F.linear(x, w))
    xd, wd = torch.randn(300, 320, dtype=torch.float64), torch.randn(640, 320, dtype=torch.float64)
    assert torch.equal(matmul.linear(xd, wd), F.linear(xd, wd))


@pytest.mark.skipif(not HAS_ONEDNN, reason="no oneDNN linear op")
def test_a_training_step_agrees_across_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    from yet_another_retnet.models.config import RetNetConfig
    from yet_another_retnet.models.retnet import RetNet

    config = RetNetConfig(vocab_size=128, d_model=128, num_heads=4, num_layers=2, ffn_dim=256,
                          value_factor=1.0, dropout=0.0, ffn="mlp")
    tokens = torch.randint(0, 128, (2, 160), generator=torch.Generator().manual_seed(11))
    results = {}
    for name in ("aten", "onednn"):
        monkeypatch.setattr(matmul, "_choice", name)
        torch.manual_seed(0)
        model = RetNet(config)
        loss = model(tokens, mode="chunkwise", chunk_size=32, labels=tokens).loss
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    (loss_a, grads_a), (loss_o, grads_o) = results["aten"], results["onednn"]
    torch.testing.assert_close(loss_o, loss_a, rtol=1e-5, atol=1e-6)
    for go, ga in zip(grads_o, grads_a, strict=True):
        torch.testing.assert_close(go, ga, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize(("value", "expect"), [("aten", "aten"), ("bogus", "YARETNET_CPU_MATMUL must be")])
def test_the_environment_variable_picks_or_is_refused(value: str, expect: str) -> None:
    code = "from yet_another_retnet.ops import matmul; print(matmul.cpu_backend())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "YARETNET_CPU_MATMUL": value})
    out = done.stdout if done.returncode == 0 else done.stderr
    assert expect in out
    if value == "bogus":
        assert "ValueError" in done.stderr and "'bogus'" in done.stderr


@pytest.mark.skipif(not HAS_ONEDNN, reason="no oneDNN linear op")
def test_the_onednn_backend_runs_every_product_of_a_linear_on_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.profiler import profile

    monkeypatch.setattr(matmul, "_choice", "onednn")
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(300, 320, generator=gen, requires_grad=True)
    w = torch.randn(640, 320, generator=gen, requires_grad=True)
    r = torch.randn(300, 640, generator=gen, requires_grad=True)
    with profile() as prof:
        matmul.linear(x, w, None, r).sum().backward()
    names = [e.key for e in prof.key_averages()]
    assert sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise") >= 2  # dx, dw
    assert any("binary" in n or n == "mkldnn::_linear_pointwise" for n in names)
    assert not any(n in ("aten::mm", "aten::addmm") for n in names)


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (37, 53), (64, 16), (130, 300), (2048, 256)])
def test_the_transposed_copy_is_exact(rows: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(rows, cols, generator=gen)
    got = matmul._transposed(x)
    assert got.is_contiguous() and torch.equal(got, x.t())
    wide = torch.randn(rows, cols + 5, generator=gen)[:, 2:cols + 2]  # rows at a longer stride
    assert torch.equal(matmul._transposed(wide), wide.t())
    assert torch.equal(matmul._transposed(x.t()), x)  # a transposed view: columns at a stride
