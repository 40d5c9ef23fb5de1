"""Our Triton kernels compiled on a GPU (skipped without CUDA): the interpreter tests'
checks (tests/ops/triton/test_triton_interpreter.py) at GPU-sized shapes and in bfloat16, which the interpreter
cannot run; that CUDA calls select the kernels by default and stay on the GPU; fla's backend
against the same reference where it is installed; a bf16 training step and generation on CUDA.

Tolerances (relative Frobenius error against float64 on the rounded inputs): float32 2e-3 (the
kernels' float32 products run in TF32), float16 5e-3, bfloat16 2e-2 (outputs and gradients are
rounded to bfloat16, unit roundoff 2^-8 ~ 3.9e-3).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from reference import F64, reference_gammas, reference_retention, rel_err

import yet_another_retnet.ops.retention as retention_module
from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.ops import backends, retention_chunkwise, retention_recurrent
from yet_another_retnet.ops.triton.chunkwise import SCHEDULE_ENV

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                                reason="needs a CUDA device and triton")

TOL = {torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CUDA = torch.device("cuda")


def make(batch, heads, length, dk, dv, dtype, seed=0):
    """Inputs rounded to ``dtype`` on CPU (the reference's copy) and on the GPU (with gradients)."""
    gen = torch.Generator().manual_seed(seed)
    cpu = [torch.randn(batch, heads, length, d, generator=gen, dtype=F64).to(dtype) for d in (dk, dk, dv)]
    s0 = torch.randn(batch, heads, dk, dv, generator=gen, dtype=F64).float()
    cpu.append(s0)
    gpu = [t.to(CUDA).requires_grad_() for t in cpu]
    cpu = [t.clone().requires_grad_() for t in cpu]
    return cpu, gpu


def grads(out, state, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=gen, dtype=F64).to(out.device)
    d_state = torch.randn(state.shape, generator=gen, dtype=F64).to(out.device)
    loss = (out.to(F64) * d_out).sum() + (state.to(F64) * d_state).sum()
    return torch.autograd.grad(loss, inputs)


SHAPES = [(2, 4, 1000, 64, 128, 64), (1, 2, 777, 128, 128, 64), (1, 2, 300, 256, 256, 100), (1, 3, 129, 32, 48, 16)]


# Every dtype through the default (split) schedule; the fused one in bfloat16 (each case compiles
# its own kernels, which the device check's time limit counts).
SCHEDULE_CASES = [("split", torch.float32), ("split", torch.bfloat16), ("split", torch.float16),
                  ("fused", torch.bfloat16)]


@pytest.mark.parametrize(("schedule", "dtype"), SCHEDULE_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_reference_on_cuda(schedule, dtype, shape, monkeypatch):
    monkeypatch.setenv(SCHEDULE_ENV, schedule)
    batch, heads, length, dk, dv, chunk = shape
    (q, k, v, s0), (gq, gk, gv, gs0) = make(batch, heads, length, dk, dv, dtype)
    decay = torch.linspace(0.9, 0.999, heads, dtype=F64)
    out, state = retention_chunkwise(gq, gk, gv, gs0, chunk, decay=decay, backend="triton")
    assert out.device.type == "cuda" and out.dtype == dtype and state.dtype == torch.float32
    ref_out, ref_state = reference_retention(q, k, v, decay, prev_state=s0)
    assert rel_err(out.cpu(), ref_out) < TOL[dtype]
    assert rel_err(state.cpu(), ref_state) < TOL[dtype]
    got = grads(out, state, [gq, gk, gv, gs0])
    want = grads(ref_out, ref_state, [q, k, v, s0])
    for name, g, w in zip(["q", "k", "v", "s0"], got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g.cpu(), w) < TOL[dtype], name


def test_cuda_calls_select_the_kernels_and_stay_on_the_gpu(monkeypatch):
    calls = []
    real = retention_module.chunk_retention_triton

    def spy(*args, **kwargs):
        calls.append(args[0].device)
        return real(*args, **kwargs)

    monkeypatch.setattr(retention_module, "chunk_retention_triton", spy)
    _, (q, k, v, s0) = make(1, 2, 100, 32, 32, torch.bfloat16)
    out, state = retention_chunkwise(q, k, v, s0, 32)
    assert calls == [q.device] and out.device == q.device and state.device == q.device
    monkeypatch.setenv(backends.ENV, "torch")  # the switch: the PyTorch form, still on the GPU
    out2, state2 = retention_chunkwise(q, k, v, s0, 32)
    assert len(calls) == 1 and out2.device == q.device
    assert rel_err(out2.float(), out.float()) < TOL[torch.bfloat16]
    assert rel_err(state2, state) < TOL[torch.bfloat16]
    # float64 has no kernel: the PyTorch form, on the GPU.
    monkeypatch.delenv(backends.ENV)
    out3, _ = retention_chunkwise(q.double(), k.double(), v.double(), s0.double(), 32)
    assert len(calls) == 1 and out3.device == q.device


def test_step_kernel_on_cuda():
    (q, k, v, s0), (gq, gk, gv, gs0) = make(4, 8, 5, 128, 256, torch.bfloat16)
    state = gs0.detach()
    outs = []
    with torch.no_grad():
        for t in range(q.shape[2]):
            o_t, state = retention_recurrent(gq[:, :, t], gk[:, :, t], gv[:, :, t], state)
            outs.append(o_t)
    ref_out, ref_state = reference_retention(q.detach(), k.detach(), v.detach(), reference_gammas(8),
                                             prev_state=s0.detach())
    assert rel_err(torch.stack(outs, 2).cpu(), ref_out) < TOL[torch.bfloat16]
    assert rel_err(state.cpu(), ref_state) < TOL[torch.bfloat16]


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="flash-linear-attention is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fla_backend_matches_reference(dtype):
    (q, k, v, s0), (gq, gk, gv, gs0) = make(2, 4, 300, 64, 128, dtype)
    out, state = retention_chunkwise(gq, gk, gv, gs0, 64, backend="fla")
    ref_out, ref_state = reference_retention(q, k, v, reference_gammas(4), prev_state=s0)
    assert rel_err(out.cpu(), ref_out) < TOL[dtype]
    assert rel_err(state.cpu(), ref_state) < TOL[dtype]
    got = grads(out, state, [gq, gk, gv, gs0])
    want = grads(ref_out, ref_state, [q, k, v, s0])
    for name, g, w in zip(["q", "k", "v", "s0"], got, want, strict=True):
        assert rel_err(g.cpu(), w) < TOL[dtype], name


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=97, d_model=128, num_heads=2, num_layers=2, ffn_dim=256, dropout=0.0,
                          chunk_size=64)
    return RetNet(config).to(device=CUDA, dtype=dtype)


def test_bf16_autocast_training_step_on_cuda(monkeypatch):
    """A bf16-autocast training step through the kernels: finite, on the GPU, and its gradients
    those of the PyTorch form."""
    ids = torch.randint(0, 97, (2, 300), device=CUDA)
    grads_by = {}
    for backend in ("auto", "torch"):
        monkeypatch.setenv(backends.ENV, backend)
        model = _model()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, mode="chunkwise", labels=ids).loss
        assert loss is not None and torch.isfinite(loss)
        loss.backward()
        grads_by[backend] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        assert all(g.device.type == "cuda" for g in grads_by[backend].values())
    for name, g in grads_by["torch"].items():
        assert rel_err(grads_by["auto"][name], g) < 5e-2, name


def test_generation_on_cuda_matches_a_parallel_forward():
    model = _model(torch.float32).eval()
    x = torch.randint(0, 97, (3, 200), device=CUDA)
    out = model.generate(x, max_new_tokens=8)
    assert out.device == x.device
    with torch.no_grad():
        logits = model(out, mode="parallel").logits
    # Greedy tokens: the argmax of a full forward (float32; ties are unlikely at this width).
    agree = (logits[:, 199:-1].argmax(-1) == out[:, 200:]).float().mean()
    assert agree > 0.9
