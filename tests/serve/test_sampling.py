"""The serving engine's sampler (``serve/sampling.py``): its tokens follow the distribution that
``generation.next_tokens`` samples from (the same shift, temperature and filters)."""

from __future__ import annotations

import pytest
import torch

from yet_another_retnet.generation import filter_logits
from yet_another_retnet.serve.sampling import adjust_logits, pick_token


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, None, None), (0.7, None, 0.8), (1.5, 3, None)])
def test_pick_token_samples_the_filtered_softmax(temperature: float, top_k: int | None,
                                                 top_p: float | None) -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 1.7, -30.0, 0.0, 1.0])
    expected = filter_logits(logits[None] / temperature, top_k, top_p).softmax(-1)[0].double()
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(logits.shape[0], dtype=torch.float64)
    for _ in range(draws):
        counts[pick_token(logits, temperature, top_k, top_p, gen)] += 1
    # Filtered-out tokens never come; the rest within 4 standard errors of their probability.
    assert bool((counts[expected == 0] == 0).all())
    error = (expected * (1 - expected) / draws).sqrt()
    assert bool(((counts / draws - expected).abs() <= 4 * error + 1e-12).all()), (counts / draws, expected)


def test_pick_token_is_the_argmax_at_temperature_zero_and_repeats_with_its_seed() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert pick_token(logits, 0.0, None, 0.5, None) == int(logits.argmax())
    runs = [[pick_token(logits, 1.0, None, None, torch.Generator().manual_seed(5)) for _ in range(3)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    gen = torch.Generator().manual_seed(5)
    assert len({pick_token(logits, 1.0, None, None, gen) for _ in range(50)}) > 10


def test_pick_token_refuses_logits_without_a_distribution() -> None:
    with pytest.raises(ValueError, match="logits"):
        pick_token(torch.tensor([0.0, float("nan"), 1.0]), 1.0, None, None, torch.Generator().manual_seed(0))


def test_pick_token_never_picks_a_filtered_token_at_the_top_of_the_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    # A draw that rounds up to the whole mass lands past the end: the last token with a
    # probability is taken, never the filtered-out ones after it.
    logits = torch.tensor([1.0, 2.0, 0.5, -40.0, -50.0])
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: torch.tensor(1.0))
    assert pick_token(logits, 1.0, 3, None, None) == 2
    assert pick_token(torch.tensor([1.0, 2.0, 0.5, 0.3]), 1.0, None, None, None) == 3


def test_adjust_logits_applies_openais_bias_and_penalties() -> None:
    logits = torch.tensor([1.0, 2.0, -0.5, 0.25, 3.0])
    assert adjust_logits(logits, {}, 0.0, 0.0, None) is logits  # nothing applies: untouched
    assert adjust_logits(logits, {1: 3}, 0.0, 0.0, {}) is logits
    got = adjust_logits(logits, {1: 3, 4: 1}, presence_penalty=0.5, frequency_penalty=0.25,
                        logit_bias={0: 10.0, 4: -100.0})
    want = [1.0 + 10.0, 2.0 - 3 * 0.25 - 0.5, -0.5, 0.25, 3.0 - 100.0 - 0.25 - 0.5]
    assert got.tolist() == want and logits.tolist() == [1.0, 2.0, -0.5, 0.25, 3.0]
