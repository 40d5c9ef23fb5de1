"""Packed documents with a reset mask: each document behaves as if it ran alone.

Against the float64 recurrence (tests/reference.py) per document for the three retention forms,
and at the model level (every mode, float64 and the float32 CPU kernels) against each document
run on its own.
"""

from __future__ import annotations

import pytest
import torch
from reference import reference_gammas, reference_retention

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.ops import chunk_kernels
from yet_another_retnet.ops._extension import HAS_REGISTER_AUTOGRAD
from yet_another_retnet.ops._extension import load as load_extension
from yet_another_retnet.ops.retention import (
    retention_chunkwise,
    retention_parallel,
    retention_recurrent,
)
from yet_another_retnet.ops.segments import document_positions, pack, segment_layout, unpack

F64 = torch.float64


def packed_batch(batch: int = 2, length: int = 23, seed: int = 0) -> torch.Tensor:
    """A reset mask with documents of assorted lengths (one of them a single token)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[0, [0, 5, 6, 15]] = True  # row 0 starts with a document; a one-token document at 5
    mask[1, [9, 10, 20]] = True  # row 1 starts mid-document
    return mask


def documents(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of every document piece in ``mask``."""
    out = []
    for row in range(mask.shape[0]):
        starts = sorted({0, *mask[row].nonzero().flatten().tolist()})
        ends = [*starts[1:], mask.shape[1]]
        out += [(row, a, b) for a, b in zip(starts, ends, strict=True)]
    return out


def test_layout_round_trip_and_positions() -> None:
    mask = packed_batch()
    seg = segment_layout(mask)
    x = torch.randn(2, 23, 3)
    assert torch.equal(unpack(pack(x, seg), seg, 2, 23), x)
    assert len(seg.lengths) == len(documents(mask))
    pos = document_positions(mask)
    for row, a, b in documents(mask):
        assert pos[row, a:b].tolist() == list(range(b - a))


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_retention_forms_reset_to_the_reference_per_document(form: str) -> None:
    torch.manual_seed(0)
    heads, dk, dv = 3, 4, 6
    mask = packed_batch()
    q, k = torch.randn(2, heads, 23, dk, dtype=F64), torch.randn(2, heads, 23, dk, dtype=F64)
    v = torch.randn(2, heads, 23, dv, dtype=F64)
    gammas = reference_gammas(heads)
    if form == "parallel":
        out, _ = retention_parallel(q, k, v, decay=gammas, reset_mask=mask)
    elif form == "chunkwise":
        out, state = retention_chunkwise(q, k, v, chunk_size=4, decay=gammas, reset_mask=mask)
    else:
        steps, running = [], None
        for t in range(23):
            o, running = retention_recurrent(q[:, :, t], k[:, :, t], v[:, :, t], running, decay=gammas,
                                             reset=mask[:, t])
            steps.append(o)
        out = torch.stack(steps, dim=2)
    for row, a, b in documents(mask):
        sl = (slice(row, row + 1), slice(None), slice(a, b))
        expected, final = reference_retention(q[sl], k[sl], v[sl], gammas)
        torch.testing.assert_close(out[sl], expected, rtol=1e-12, atol=1e-12)
        if form == "chunkwise" and b == 23:  # the state returned is the row's last document's
            torch.testing.assert_close(state[row:row + 1], final, rtol=1e-12, atol=1e-12)
    # Without the mask the documents would see each other: the test can tell.
    plain, _ = retention_parallel(q, k, v, decay=gammas)
    assert not torch.allclose(plain, out)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_retention_forms_reset_with_a_state_from_the_previous_window(form: str, dtype: torch.dtype) -> None:
    """A window continuing a state: the state reaches only each row's first document (row 0
    starts a document at position 0, so its state is dropped; row 1 continues it)."""
    torch.manual_seed(3)
    heads, dk, dv = 3, 4, 6
    mask = packed_batch()
    q, k = torch.randn(2, heads, 23, dk, dtype=F64), torch.randn(2, heads, 23, dk, dtype=F64)
    v = torch.randn(2, heads, 23, dv, dtype=F64)
    gammas = reference_gammas(heads)
    # The state the previous window left: the reference's state after 11 tokens.
    _, prev = reference_retention(torch.randn(2, heads, 11, dk, dtype=F64), torch.randn(2, heads, 11, dk, dtype=F64),
                                  torch.randn(2, heads, 11, dv, dtype=F64), gammas)
    qc, kc, vc, pc = q.to(dtype), k.to(dtype), v.to(dtype), prev.to(dtype)
    if form == "parallel":
        out, _ = retention_parallel(qc, kc, vc, decay=gammas, prev_state=pc, reset_mask=mask)
    elif form == "chunkwise":
        out, state = retention_chunkwise(qc, kc, vc, pc, chunk_size=4, decay=gammas, reset_mask=mask)
    else:
        steps, running = [], pc
        for t in range(23):
            o, running = retention_recurrent(qc[:, :, t], kc[:, :, t], vc[:, :, t], running, decay=gammas,
                                             reset=mask[:, t])
            steps.append(o)
        out = torch.stack(steps, dim=2)
    tol = 1e-12 if dtype == F64 else 2e-5
    for row, a, b in documents(mask):
        sl = (slice(row, row + 1), slice(None), slice(a, b))
        carried = a == 0 and not bool(mask[row, 0])
        expected, final = reference_retention(q[sl], k[sl], v[sl], gammas,
                                              prev_state=prev[row:row + 1] if carried else None)
        torch.testing.assert_close(out[sl].to(F64), expected, rtol=tol, atol=tol)
        if form == "chunkwise" and b == 23:
            torch.testing.assert_close(state[row:row + 1].to(F64), final, rtol=tol, atol=tol)
    # A row without resets continues the state through the whole window, state included.
    whole = torch.zeros_like(mask)
    if form == "chunkwise":
        out, state = retention_chunkwise(qc, kc, vc, pc, chunk_size=4, decay=gammas, reset_mask=whole)
        expected, final = reference_retention(q, k, v, gammas, prev_state=prev)
        torch.testing.assert_close(out.to(F64), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(state.to(F64), final, rtol=tol, atol=tol)
    # The state matters (row 1's first document sees it), so the test can tell.
    alone, _ = retention_parallel(qc, kc, vc, decay=gammas, reset_mask=mask)
    assert not torch.allclose(alone[1, :, :9], out[1, :, :9])


def test_layout_carrying_a_state_left_aligns_the_continued_segments() -> None:
    mask = packed_batch()
    seg = segment_layout(mask, carry_state=True)
    x = torch.randn(2, 23, 3)
    assert torch.equal(unpack(pack(x, seg), seg, 2, 23), x)
    assert seg.carried.tolist() == [False] * 4 + [True] + [False] * 3  # row 1's first only
    assert bool(seg.valid[4, :9].all()) and not bool(seg.valid[4, 9:].any())  # padding after it
    assert torch.equal(segment_layout(mask).valid, segment_layout(mask, carry_state=False).valid)


def tiny_model(dtype: torch.dtype, d_model: int = 32, chunk_size: int = 4) -> RetNet:
    torch.manual_seed(1)
    config = RetNetConfig(vocab_size=50, d_model=d_model, num_layers=2, num_heads=2, ffn_dim=64, dropout=0.0,
                          chunk_size=chunk_size)
    return RetNet(config).to(dtype).eval()


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_model_reset_equals_each_document_alone(mode: str) -> None:
    model = tiny_model(F64)
    mask = packed_batch()
    ids = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(ids, mode=mode, reset_mask=mask)
        for row, a, b in documents(mask):
            alone = model(ids[row:row + 1, a:b], mode=mode)
            torch.testing.assert_close(out.logits[row:row + 1, a:b], alone.logits, rtol=1e-10, atol=1e-10)
            if b == 23:
                for m_packed, m_alone in zip(out.state.memories, alone.state.memories, strict=True):
                    torch.testing.assert_close(m_packed[row:row + 1], m_alone, rtol=1e-10, atol=1e-10)
                assert int(out.state.position[row]) == b - a
        plain = model(ids, mode=mode).logits
    assert not torch.allclose(plain, out.logits)


def test_model_reset_loss_and_gradients_flow() -> None:
    model = tiny_model(F64).train()
    mask = packed_batch()
    ids = torch.randint(0, 50, (2, 23), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt: not scored
    out = model(ids, labels=labels, reset_mask=mask)
    assert out.loss is not None
    out.loss.backward()
    grad = model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="reset_mask must have shape"):
        model(ids, reset_mask=mask[:, :5])
    with pytest.raises(ValueError, match="empty state"):
        model(ids, state=model(ids).state, reset_mask=mask)


@pytest.mark.skipif(not load_extension(), reason="the CPU extension is not built here")
def test_float32_reset_runs_on_the_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    if not HAS_REGISTER_AUTOGRAD:
        pytest.skip(f"torch {torch.__version__}: the CPU chunk kernels need torch.library.register_autograd (2.4)")
    """The packed float32 batch goes through the chunk kernels (not the plain path) and
    matches each document alone to float32 rounding."""
    # The kernels' tiles are 32 wide: key dim 32, value dim 64, chunks of 32.
    model = tiny_model(torch.float32, d_model=64, chunk_size=32)
    mask = torch.zeros(2, 96, dtype=torch.bool)
    mask[0, [32, 64]] = True
    mask[1, [40, 41]] = True
    ids = torch.randint(0, 50, (2, 96), generator=torch.Generator().manual_seed(5))
    calls: list[bool] = []
    check = chunk_kernels.supports

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(check(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(chunk_kernels, "supports", spy)
    with torch.no_grad():
        out = model(ids, mode="chunkwise", reset_mask=mask).logits
    # Whole chunks take the kernels (a shorter last chunk takes the products, as unpacked inputs do).
    assert any(calls), "the packed documents did not run on the CPU chunk kernels"
    reference = tiny_model(F64, d_model=64, chunk_size=32)
    with torch.no_grad():
        for row, a, b in documents(mask):
            alone = reference(ids[row:row + 1, a:b], mode="chunkwise").logits
            torch.testing.assert_close(out[row:row + 1, a:b].double(), alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_layer_reset_matches_the_float64_reference_per_document(mode: str) -> None:
    from reference import reference_msr

    from yet_another_retnet.layers.retention import MultiScaleRetention

    torch.manual_seed(2)
    layer = MultiScaleRetention(16, 2).to(F64)
    mask = packed_batch()
    x = torch.randn(2, 23, 16, dtype=F64)
    y, state, _ = layer.retain(x, x, x, None, mode, chunk_size=4, reset_mask=mask)
    for row, a, b in documents(mask):
        expected, memory = reference_msr(layer, x[row:row + 1, a:b])  # positions from 0, empty state
        torch.testing.assert_close(y[row:row + 1, a:b], expected, rtol=1e-10, atol=1e-10)
        if b == 23:
            torch.testing.assert_close(state.memory[row:row + 1], memory, rtol=1e-10, atol=1e-10)
