"""Chunk-major prompt prefill (``models/prefill.py``) against the layer-major form and float64."""

from __future__ import annotations

import pytest
import torch

from yet_another_retnet.models import RetNet, RetNetConfig
from yet_another_retnet.models import prefill as prefill_module
from yet_another_retnet.models.prefill import chunk_major_prefill, segment_length


@pytest.fixture(scope="module")
def model() -> RetNet:
    torch.manual_seed(0)
    return RetNet(RetNetConfig.from_preset("tiny", num_layers=3, chunk_size=16)).eval()


def test_segment_length_is_a_multiple_of_the_chunk() -> None:
    assert segment_length(1, 64) == 2048
    assert segment_length(16, 64) == 128
    assert segment_length(3, 64, tokens=1000) == 320
    assert segment_length(100, 64) == 64  # at least one chunk


@pytest.mark.parametrize("padded", [False, True])
def test_chunk_major_matches_float64_parallel_form(model: RetNet, padded: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 150), generator=gen)
    mask = torch.ones(2, 150, dtype=torch.bool)
    if padded:
        mask[1, :70] = False  # row 1's padding spans whole segments
    token_mask = mask if padded else None
    with torch.no_grad():
        done = chunk_major_prefill(model, ids, None, 16, token_mask, tokens=64)  # 32 positions a segment
        assert done is not None
        hidden, state = done
        logits = model._head(hidden)[:, -1]
        exact = model.double()(ids, attention_mask=mask.long() if padded else None, mode="parallel")
        model.float()
    assert (logits.double() - exact.logits[:, -1]).abs().max() < 1e-4
    for got, want in zip(state.memories, exact.state.memories, strict=True):
        assert (got.double() - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))
    assert torch.equal(state.position, exact.state.position)
    with torch.no_grad():  # inputs_embeds (transformers' generate) take the same segments
        embedded = chunk_major_prefill(model, model.embed_tokens(ids), None, 16, token_mask, tokens=64)
    assert embedded is not None and torch.equal(embedded[0], hidden)
    for a, b in zip(embedded[1].memories, state.memories, strict=True):
        assert torch.equal(a, b)


def test_generate_is_the_same_in_either_order(model: RetNet, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(prefill_module, "SEGMENT_TOKENS", 64)
    chunk_major = model.generate(ids, 12)
    state = model.prefill(ids).state
    monkeypatch.setattr(prefill_module, "SEGMENT_TOKENS", 1 << 30)  # one segment: layer-major
    assert torch.equal(model.generate(ids, 12), chunk_major)
    reference = model.prefill(ids).state
    for a, b in zip(state.memories, reference.memories, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_short_prompts_take_the_layer_major_path(model: RetNet) -> None:
    with torch.no_grad():
        assert chunk_major_prefill(model, torch.zeros(1, 64, dtype=torch.long), None, 16, tokens=64) is None


def test_bf16_products_prefill_is_float32_to_bf16_rounding(model: RetNet) -> None:
    from yet_another_retnet.ops import bf16_products as bf16

    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    original = bf16.mm_nt_bf16

    def counting(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    with torch.no_grad():
        exact = model.double().prefill(ids)
        model.float()
        reference = model.prefill(ids)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("yet_another_retnet.ops.matmul.mm_nt_bf16", counting)
            with bf16.bf16_products() as on:
                got = model.prefill(ids)
    if not on:
        assert not calls and torch.equal(got.logits, reference.logits)
        pytest.skip("no bf16 units on this CPU: the context changes nothing (checked)")
    assert calls  # the products did run in bf16 ...
    scale = float(exact.logits.abs().max())
    err_bf16 = float((got.logits.double() - exact.logits).abs().max())
    err_fp32 = float((reference.logits.double() - exact.logits).abs().max())
    assert err_fp32 < err_bf16 < 0.05 * scale  # ... to bf16 rounding, no more
    for a, b in zip(got.state.memories, exact.state.memories, strict=True):
        assert (a.double() - b).abs().max() < 0.05 * max(1.0, float(b.abs().max()))


def test_segments_that_carry_a_state_are_shorter_by_what_it_weighs() -> None:
    """At the 1.3B configuration a row's state (24 layers x 8 heads x 256 x 512 floats) weighs
    what ~341 tokens of activations do (six floats per column of the widest projection, 12,288),
    so the segments after the first hold 1,664 tokens; at d 768 with 4 layers, 14 tokens."""
    from yet_another_retnet.bench.common import retnet_config
    from yet_another_retnet.models.prefill import state_tokens

    big = RetNet(retnet_config("1.3b", vocab_size=32000), device="meta")
    state = 24 * 8 * 256 * 512
    assert state_tokens(big, 1) == state // (6 * 12288) == 341 and state_tokens(big, 2) == 2 * state // (6 * 12288)
    assert segment_length(1, 128, 2048 - state_tokens(big, 1)) == 1664
    small = RetNet(retnet_config("base", vocab_size=32000, num_layers=4), device="meta")
    assert state_tokens(small, 1) == 4 * 12 * 64 * 128 // (6 * 4608) == 14
