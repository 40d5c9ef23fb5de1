"""The three functional forms of retention against an independent float64 loop, and each other.

The reference (tests/reference.py) steps the recurrence one token at a time in float64 and
imports nothing from the package. Every form, every chunk size, with and without an initial
state, must match it to ~1e-10 in float64.
"""

from __future__ import annotations

import pytest
import torch
from conftest import float32_tol
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import F64, reference_gammas, reference_retention, rel_err

from yet_another_retnet.ops import (
    decay_gammas,
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)

TOL64 = 1e-10


def make_qkv(batch, heads, length, dk, dv, dtype=F64, seed=0, state=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dk, generator=gen, dtype=F64).to(dtype)
    k = torch.randn(batch, heads, length, dk, generator=gen, dtype=F64).to(dtype)
    v = torch.randn(batch, heads, length, dv, generator=gen, dtype=F64).to(dtype)
    s0 = torch.randn(batch, heads, dk, dv, generator=gen, dtype=F64).to(dtype) if state else None
    return q, k, v, s0


def run_recurrent(q, k, v, prev_state=None, **kw):
    """Step the recurrent form through the length dim; returns (out, state)."""
    outs, state = [], prev_state
    for t in range(q.shape[2]):
        out, state = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], state, **kw)
        outs.append(out)
    return torch.stack(outs, dim=2), state


def decay_arg(kind, heads):
    """The decay argument for the ops, and the gammas the reference should use."""
    if kind == "custom":
        gen = torch.Generator().manual_seed(123)
        gammas = 0.5 + 0.5 * torch.rand(heads, generator=gen, dtype=F64)
        return gammas, gammas
    return kind, reference_gammas(heads, kind)


# ------------------------------------------------------------------------------------------
# Every form against the float64 reference
# ------------------------------------------------------------------------------------------

SHAPES = [(1, 1, 17, 4, 4), (2, 3, 37, 6, 10)]  # (batch, heads, length, dk, dv): dk != dv


@pytest.mark.parametrize("shape", SHAPES, ids=["1head", "3heads-dk!=dv"])
@pytest.mark.parametrize("decay", ["eq8", "log-spaced", "custom"])
@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "prev_state"])
def test_all_forms_match_reference_float64(shape, decay, with_state, device):
    b, h, length, dk, dv = shape
    q, k, v, s0 = make_qkv(b, h, length, dk, dv, state=with_state, seed=length + h)
    dec, gammas = decay_arg(decay, h)
    ref_out, ref_state = reference_retention(q, k, v, gammas, prev_state=s0)
    if device.type != "cpu":  # the forms on the device, results compared on CPU
        ref_out, ref_state = ref_out.to(device), ref_state.to(device)
        q, k, v = q.to(device), k.to(device), v.to(device)
        s0 = None if s0 is None else s0.to(device)
        dec = dec.to(device) if isinstance(dec, torch.Tensor) else dec

    out, weights = retention_parallel(q, k, v, decay=dec, prev_state=s0)
    assert weights is None
    assert out.dtype == F64 and out.shape == (b, h, length, dv)
    assert rel_err(out, ref_out) <= TOL64

    out, state = run_recurrent(q, k, v, s0, decay=dec)
    assert rel_err(out, ref_out) <= TOL64
    assert rel_err(state, ref_state) <= TOL64

    # chunk 1, a chunk that does not divide the length, exactly the length, longer, and None.
    for chunk in (1, 5, length, length + 13, None):
        out, state = retention_chunkwise(q, k, v, s0, chunk, decay=dec)
        assert out.shape == (b, h, length, dv) and state.shape == (b, h, dk, dv)
        assert rel_err(out, ref_out) <= TOL64, chunk
        assert rel_err(state, ref_state) <= TOL64, chunk


def test_custom_scale_in_every_form():
    q, k, v, s0 = make_qkv(2, 2, 19, 4, 6, state=True, seed=5)
    gammas = reference_gammas(2)
    ref_out, ref_state = reference_retention(q, k, v, gammas, scale=0.37, prev_state=s0)
    out, _ = retention_parallel(q, k, v, scale=0.37, prev_state=s0)
    assert rel_err(out, ref_out) <= TOL64
    out, state = run_recurrent(q, k, v, s0, scale=0.37)
    assert rel_err(out, ref_out) <= TOL64 and rel_err(state, ref_state) <= TOL64
    out, state = retention_chunkwise(q, k, v, s0, 4, scale=0.37)
    assert rel_err(out, ref_out) <= TOL64 and rel_err(state, ref_state) <= TOL64
    # The default scale really is dk ** -0.5 (a wrong default would pass the above).
    out_default, _ = retention_parallel(q, k, v, prev_state=s0)
    out_explicit, _ = retention_parallel(q, k, v, scale=4**-0.5, prev_state=s0)
    torch.testing.assert_close(out_default, out_explicit, rtol=0, atol=0)
    assert rel_err(out_default, ref_out) > 1e-3


def test_decay_schedules_are_the_papers():
    torch.testing.assert_close(decay_gammas(8, "eq8"), reference_gammas(8, "eq8"), rtol=0, atol=1e-15)
    torch.testing.assert_close(
        decay_gammas(6, "log-spaced"), reference_gammas(6, "log-spaced"), rtol=0, atol=1e-15
    )
    assert decay_gammas(8).dtype == F64
    assert decay_gammas(8)[7].item() == 1 - 2**-12


def test_parallel_weights_are_decayed_scores():
    q, k, v, _ = make_qkv(1, 2, 9, 4, 3, seed=11)
    gammas = reference_gammas(2)
    _, weights = retention_parallel(q, k, v, need_weights=True)
    assert weights is not None and weights.shape == (1, 2, 9, 9)
    n = torch.arange(9)
    dist = (n[:, None] - n[None, :]).to(F64)
    expected = (q @ k.transpose(-1, -2)) * 4**-0.5 * gammas.view(2, 1, 1) ** dist.clamp(min=0)
    expected = torch.where(dist >= 0, expected, torch.zeros((), dtype=F64))
    assert rel_err(weights, expected) <= TOL64
    assert bool((weights.triu(1) == 0).all())


def test_float32_long_sequence_against_float64(device):
    """Float32 inputs at length 2048: within 1e-5 of the float64 reference, every form (on CUDA,
    where the chunkwise form takes our Triton kernels, within their TF32 bound)."""
    b, h, length, dk, dv = 1, 4, 2048, 16, 16
    q, k, v, s0 = make_qkv(b, h, length, dk, dv, dtype=torch.float32, seed=3, state=True)
    gammas = reference_gammas(h)
    ref_out, ref_state = reference_retention(q, k, v, gammas, prev_state=s0)
    if device.type != "cpu":
        return _float32_long_sequence_on(device, q, k, v, s0, ref_out, ref_state)

    out, _ = retention_parallel(q, k, v, prev_state=s0)
    assert out.dtype == torch.float32
    assert rel_err(out, ref_out) <= 1e-5
    out, state = retention_chunkwise(q, k, v, s0, 128)
    assert state.dtype == torch.float32
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(state, ref_state) <= 1e-5
    out, state = run_recurrent(q, k, v, s0)
    assert rel_err(out, ref_out) <= 1e-5 and rel_err(state, ref_state) <= 1e-5


# ------------------------------------------------------------------------------------------
# Handing the state on
# ------------------------------------------------------------------------------------------



def _float32_long_sequence_on(device, q, k, v, s0, ref_out, ref_state):
    q, k, v, s0 = q.to(device), k.to(device), v.to(device), s0.to(device)
    tol = float32_tol(device, 1e-5)
    out, _ = retention_parallel(q, k, v, prev_state=s0)
    assert rel_err(out.cpu(), ref_out) <= tol
    out, state = retention_chunkwise(q, k, v, s0, 128)
    assert out.device == q.device and state.device == q.device and state.dtype == torch.float32
    assert rel_err(out.cpu(), ref_out) <= tol and rel_err(state.cpu(), ref_state) <= tol
    out, state = run_recurrent(q[:, :, :64], k[:, :, :64], v[:, :, :64], s0)
    ref64 = reference_retention(q[:, :, :64].cpu(), k[:, :, :64].cpu(), v[:, :, :64].cpu(),
                                reference_gammas(q.shape[1]), prev_state=s0.cpu())
    assert rel_err(out.cpu(), ref64[0]) <= tol and rel_err(state.cpu(), ref64[1]) <= tol


def test_chunk_by_chunk_equals_one_call():
    q, k, v, s0 = make_qkv(2, 3, 50, 4, 6, seed=21, state=True)
    whole, whole_state = retention_chunkwise(q, k, v, s0, 8)
    pieces, state, start = [], s0, 0
    for size, chunk in ((3, 8), (8, 8), (1, 4), (20, 7), (0, 3), (18, 64)):
        sl = slice(start, start + size)
        out, state = retention_chunkwise(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, chunk)
        pieces.append(out)
        start += size
    assert start == 50
    assert rel_err(torch.cat(pieces, dim=2), whole) <= TOL64
    assert rel_err(state, whole_state) <= TOL64


def test_parallel_continues_a_chunkwise_state():
    q, k, v, _ = make_qkv(1, 2, 30, 4, 4, seed=8)
    ref_out, _ = reference_retention(q, k, v, reference_gammas(2))
    _, state = retention_chunkwise(q[:, :, :12], k[:, :, :12], v[:, :, :12], None, 5)
    out, _ = retention_parallel(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], prev_state=state)
    assert rel_err(out, ref_out[:, :, 12:]) <= TOL64


def test_zero_length_chunk_keeps_state():
    q, k, v, s0 = make_qkv(1, 2, 0, 4, 3, state=True)
    out, state = retention_chunkwise(q, k, v, s0, 4)
    assert out.shape == (1, 2, 0, 3)
    torch.testing.assert_close(state, s0, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    dk=st.integers(1, 6),
    dv=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 12), min_size=1, max_size=4),
    chunks=st.lists(st.integers(1, 16), min_size=4, max_size=4),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_any_split_any_chunks(batch, heads, dk, dv, cuts, chunks, with_state, seed):
    """Any split of the sequence into calls, any chunk size per call, any form per call."""
    length = sum(cuts)
    q, k, v, s0 = make_qkv(batch, heads, length, dk, dv, seed=seed, state=with_state)
    ref_out, ref_state = reference_retention(q, k, v, reference_gammas(heads), prev_state=s0)
    pieces, state, start = [], s0, 0
    for i, size in enumerate(cuts):
        sl = slice(start, start + size)
        qs, ks, vs = q[:, :, sl], k[:, :, sl], v[:, :, sl]
        if i % 2 == 0 or size == 0:
            out, state = retention_chunkwise(qs, ks, vs, state, chunks[i])
        else:
            out, state = run_recurrent(qs, ks, vs, state)
        pieces.append(out)
        start += size
    assert rel_err(torch.cat(pieces, dim=2), ref_out) <= TOL64
    assert rel_err(state, ref_state) <= TOL64
    if length:
        out, _ = retention_parallel(q, k, v, prev_state=s0)
        assert rel_err(out, ref_out) <= TOL64


# ------------------------------------------------------------------------------------------
# Half precision
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_chunkwise_65k(dtype):
    """65,536 tokens in bf16/fp16: finite, within 2e-2 of float64, and head 8 really decays.

    Head 8's gamma is 1 - 2^-12, which bfloat16 rounds to exactly 1.0. Had it been rounded, head
    8 would sum every token with weight 1: its output would match the *undecayed* float64 result.
    """
    assert torch.tensor(1 - 2**-12, dtype=torch.bfloat16).item() == 1.0  # the trap
    b, h, length, dk, dv = 1, 8, 65536, 8, 8
    q, k, v, _ = make_qkv(b, h, length, dk, dv, dtype=dtype, seed=2)
    out, state = retention_chunkwise(q, k, v, None, 128)
    assert out.dtype == dtype and state.dtype == torch.float32
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(state).all())
    ref_out, ref_state = retention_chunkwise(q.to(F64), k.to(F64), v.to(F64), None, 64)
    assert rel_err(out, ref_out) <= 2e-2
    assert rel_err(state, ref_state) <= 2e-2
    head8 = slice(7, 8)
    no_decay, _ = retention_chunkwise(
        q[:, head8].to(F64), k[:, head8].to(F64), v[:, head8].to(F64), None, 64,
        decay=torch.ones(1, dtype=F64),
    )
    assert rel_err(out[:, head8], ref_out[:, head8]) <= 2e-2
    assert rel_err(out[:, head8], no_decay) > 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_recurrent_and_parallel(dtype):
    b, h, dk, dv = 1, 8, 8, 8
    gammas = reference_gammas(h)
    # Recurrent: 2,048 python-level steps (65k would take minutes).
    q, k, v, _ = make_qkv(b, h, 2048, dk, dv, dtype=dtype, seed=4)
    out, state = run_recurrent(q, k, v)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    ref_out, ref_state = reference_retention(q, k, v, gammas)
    assert rel_err(out, ref_out) <= 2e-2 and rel_err(state, ref_state) <= 2e-2
    # Parallel: 4,096 tokens (the (L, L) score matrix per head).
    q, k, v, _ = make_qkv(b, h, 4096, dk, dv, dtype=dtype, seed=6)
    out, _ = retention_parallel(q, k, v)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    ref_out, _ = retention_chunkwise(q.to(F64), k.to(F64), v.to(F64), None, 64)
    assert rel_err(out, ref_out) <= 2e-2


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


def _grads(fn, q, k, v, s0):
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, s0)]
    gen = torch.Generator().manual_seed(99)
    out, state = fn(*leaves)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=F64)).sum()
    if state is not None:
        loss = loss + (state * torch.randn(state.shape, generator=gen, dtype=F64)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return grads


def test_gradients_equal_across_forms_float64():
    q, k, v, s0 = make_qkv(2, 3, 13, 4, 6, seed=31, state=True)
    gammas = reference_gammas(3)
    # Output and final state both feed the loss: gradients flow through states too.
    forms = {
        "reference": lambda q, k, v, s: reference_retention(q, k, v, gammas, prev_state=s),
        "recurrent": lambda q, k, v, s: run_recurrent(q, k, v, s),
        "chunk1": lambda q, k, v, s: retention_chunkwise(q, k, v, s, 1),
        "chunk4": lambda q, k, v, s: retention_chunkwise(q, k, v, s, 4),
        "chunk_all": lambda q, k, v, s: retention_chunkwise(q, k, v, s, None),
    }
    expected = _grads(forms.pop("reference"), q, k, v, s0)
    for name, fn in forms.items():
        for g, e, what in zip(_grads(fn, q, k, v, s0), expected, "qkvs", strict=True):
            assert rel_err(g, e) <= 1e-9, (name, what)
    # The parallel form returns no state: compare the output-only gradient.
    out_only = {
        "reference": lambda q, k, v, s: (reference_retention(q, k, v, gammas, prev_state=s)[0], None),
        "parallel": lambda q, k, v, s: (retention_parallel(q, k, v, prev_state=s)[0], None),
        "chunk5": lambda q, k, v, s: (retention_chunkwise(q, k, v, s, 5)[0], None),
    }
    expected = _grads(out_only.pop("reference"), q, k, v, s0)
    for name, fn in out_only.items():
        for g, e, what in zip(_grads(fn, q, k, v, s0), expected, "qkvs", strict=True):
            assert rel_err(g, e) <= 1e-9, (name, what)


@pytest.mark.parametrize("form", ["parallel", "recurrent", "chunkwise"])
def test_gradcheck(form):
    q, k, v, s0 = make_qkv(1, 2, 5, 2, 3, seed=41, state=True)
    inputs = tuple(x.clone().requires_grad_(True) for x in (q, k, v, s0))
    if form == "parallel":
        def fn(q, k, v, s):
            return retention_parallel(q, k, v, prev_state=s)[0]
    elif form == "recurrent":
        def fn(q, k, v, s):
            return run_recurrent(q, k, v, s)
    else:
        def fn(q, k, v, s):
            return retention_chunkwise(q, k, v, s, 2)
    assert torch.autograd.gradcheck(fn, inputs)


# ------------------------------------------------------------------------------------------
# Bad input fails loudly, naming the argument
# ------------------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    q, k, v, s0 = make_qkv(2, 3, 8, 4, 5, state=True)
    with pytest.raises(ValueError, match=r"\bq\b.*dimensions"):
        retention_parallel(q[0], k, v)
    with pytest.raises(ValueError, match=r"\bk\b.*dimensions"):
        retention_chunkwise(q, k[0], v)
    with pytest.raises(ValueError, match=r"\bk must have the shape of q"):
        retention_chunkwise(q, k[:, :2], v)
    with pytest.raises(ValueError, match=r"\bk must have the shape of q"):
        retention_parallel(q, k[:1], v)
    with pytest.raises(ValueError, match=r"\bv must match q"):
        retention_parallel(q, k, v[:, :, :7])
    with pytest.raises(ValueError, match=r"\bv must match q"):
        retention_recurrent(q[:, :, 0], k[:, :, 0], v[:1, :, 0])
    with pytest.raises(ValueError, match=r"\bq\b.*3 dimensions"):
        retention_recurrent(q, k, v)
    # States of the wrong shape, batch, heads or dims.
    for bad in (s0[:1], s0[:, :2], s0[:, :, :3], s0[..., :4], s0[0]):
        with pytest.raises(ValueError, match="prev_state"):
            retention_chunkwise(q, k, v, bad, 4)
        with pytest.raises(ValueError, match="prev_state"):
            retention_parallel(q, k, v, prev_state=bad)
        with pytest.raises(ValueError, match="prev_state"):
            retention_recurrent(q[:, :, 0], k[:, :, 0], v[:, :, 0], bad)
    with pytest.raises(ValueError, match="chunk_size"):
        retention_chunkwise(q, k, v, None, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        retention_chunkwise(q, k, v, None, -3)
    with pytest.raises(TypeError, match="chunk_size"):
        retention_chunkwise(q, k, v, None, 2.5)  # type: ignore[arg-type]
    # Integer tensors.
    with pytest.raises(TypeError, match=r"\bq\b.*floating"):
        retention_parallel(q.long(), k, v)
    with pytest.raises(TypeError, match=r"\bv\b.*floating"):
        retention_chunkwise(q, k, v.int(), None, 2)
    with pytest.raises(TypeError, match=r"prev_state.*floating"):
        retention_chunkwise(q, k, v, s0.long(), 2)
    with pytest.raises(TypeError, match="dtype"):
        retention_parallel(q, k.float(), v)
    with pytest.raises(TypeError, match=r"\bq\b.*Tensor"):
        retention_parallel([1.0], k, v)  # type: ignore[arg-type]
    # Decay and scale.
    with pytest.raises(ValueError, match="decay"):
        retention_parallel(q, k, v, decay=torch.full((2,), 0.9, dtype=F64))
    with pytest.raises(ValueError, match="decay"):
        retention_parallel(q, k, v, decay="linear")
    with pytest.raises(ValueError, match="decay"):
        retention_parallel(q, k, v, decay=torch.full((3,), 1.5, dtype=F64))
    with pytest.raises(TypeError, match="scale"):
        retention_parallel(q, k, v, scale="big")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# The ops benchmark runs, and records what it skips instead of crashing
# ------------------------------------------------------------------------------------------


def test_ops_benchmark_smoke(tmp_path):
    import json

    from yet_another_retnet.bench import ops as bench_ops

    rc = bench_ops.main([
        "--lengths", "48", "--repeats", "1", "--threads", "1", "--chunk-size", "16",
        "--max-memory-gb", "1e-6", "--max-recurrent-length", "16", "--out", str(tmp_path),
    ])
    assert rc == 0
    data = json.loads((tmp_path / "ops.json").read_text())
    by_form = {r["form"]: r for r in data["results"]}
    assert set(by_form) == {"parallel", "chunkwise", "recurrent"}
    assert "max-memory-gb" in by_form["parallel"]["skipped"]
    assert "max-recurrent-length" in by_form["recurrent"]["skipped"]
    chunk = by_form["chunkwise"]
    assert chunk["forward_ms"] > 0 and chunk["forward_backward_ms"] > 0
    # fwd+bwd keeps q, k, v gradients (3 x 48 x 8 x 64 float32) alive at the end: the tensor
    # peak cannot be below them.
    assert chunk["peak_forward_backward_mib"] >= 3 * 48 * 8 * 64 * 4 / 2**20
    assert data["machine"]["torch"] == torch.__version__
    assert data["checks"]["chunkwise_beats_parallel_from_2048"] is None
    assert "| chunkwise | 48 |" in (tmp_path / "ops.md").read_text()
