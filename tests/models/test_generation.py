"""Generation: prefill + recurrent decoding, greedy and sampled, padding, eos, streaming, bad input."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.generation import filter_logits

VOCAB = 29


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any) -> RetNet:
    fields: dict[str, Any] = {"vocab_size": VOCAB, "d_model": 16, "num_heads": 2, "num_layers": 2,
                              "ffn_dim": 24, "dropout": 0.0, "chunk_size": 3, "tie_embeddings": False}
    fields.update(overrides)
    torch.manual_seed(seed)
    model = RetNet(RetNetConfig(**fields)).to(dtype).eval()
    with torch.no_grad():
        # The default std (0.02) makes every logit nearly equal: ties would make argmax
        # comparisons depend on rounding. Larger weights give clear winners (and, untied, a
        # model that does not just repeat its last token).
        model.embed_tokens.weight.normal_(0, 1.0)
        if "lm_head.weight" in dict(model.named_parameters()):
            model.lm_head.weight.normal_(0, 1.0)
    return model


def prompt(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_equals_argmax_of_a_parallel_forward(device: torch.device) -> None:
    model = make_model().to(device)
    x = prompt(7, seed=1, batch=3).to(device)
    out = model.generate(x, max_new_tokens=12)
    assert out.shape == (3, 19) and out.dtype == x.dtype and out.device == x.device
    assert torch.equal(out[:, :7], x)
    logits = model(out, mode="parallel").logits
    assert torch.equal(logits[:, 6:-1].argmax(-1), out[:, 7:])


def test_decoding_is_one_recurrent_step_per_token_without_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    calls: list[dict[str, Any]] = []
    inner = model._forward

    def spy(input_ids: torch.Tensor, state: Any, mode: Any, *args: Any, **kwargs: Any) -> Any:
        out = inner(input_ids, state, mode, *args, **kwargs)
        calls.append({"length": input_ids.shape[1], "mode": mode, "grad": torch.is_grad_enabled(),
                      "state_bytes": out.state.nbytes(), "logits_grad": out.logits.requires_grad})
        return out

    steps: list[dict[str, Any]] = []
    inner_step = model.step_

    def step_spy(ids: torch.Tensor, state: Any) -> torch.Tensor:
        before = state.nbytes()
        logits = inner_step(ids, state)
        steps.append({"shape": tuple(ids.shape), "inference": logits.is_inference(), "grad_fn": logits.grad_fn,
                      "state_bytes": (before, state.nbytes())})
        return logits

    monkeypatch.setattr(model, "_forward", spy)
    monkeypatch.setattr(model, "step_", step_spy)
    x = prompt(10, seed=2, batch=2)
    out = model.generate(x, max_new_tokens=6)
    assert not out.requires_grad and out.grad_fn is None
    assert len(calls) == 1 and calls[0]["length"] == 10 and calls[0]["mode"] == "chunkwise"
    # then one in-place recurrent step a token (the last token needs none)
    assert [c["shape"] for c in steps] == [(2,)] * 5
    assert not any(c["grad"] or c["logits_grad"] for c in calls)
    assert all(c["inference"] and c["grad_fn"] is None for c in steps)
    assert {c["state_bytes"] for c in steps} == {(calls[0]["state_bytes"],) * 2}  # the state never grows


def test_long_prompt_prefill_crosses_chunks() -> None:
    model = make_model(chunk_size=4)
    x = prompt(23, seed=3)
    out = model.generate(x, max_new_tokens=5, chunk_size=4)
    logits = model(out, mode="parallel").logits
    assert torch.equal(logits[:, 22:-1].argmax(-1), out[:, 23:])


def left_pad(prompts: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    batch = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return batch, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_left_padded_batch_gives_each_row_its_own_output(dtype: torch.dtype) -> None:
    model = make_model(dtype=dtype)
    prompts = [prompt(n, seed=10 + n)[0] for n in (9, 2, 5, 1)]
    batch, mask = left_pad(prompts, pad=7)
    out = model.generate(batch, max_new_tokens=10, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=10)
        assert torch.equal(out[i, batch.shape[1]:], alone[0, len(p):]), i


def test_left_padded_sampling_is_reproducible_and_valid() -> None:
    model = make_model()
    batch, mask = left_pad([prompt(n, seed=20 + n)[0] for n in (6, 3)])
    kw: dict[str, Any] = {"max_new_tokens": 8, "attention_mask": mask, "do_sample": True, "top_p": 0.9}
    a = model.generate(batch, generator=torch.Generator().manual_seed(5), **kw)
    b = model.generate(batch, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


def test_rows_stop_at_eos_independently_and_are_padded() -> None:
    model = make_model()
    x = prompt(4, seed=4, batch=2)
    free = model.generate(x, max_new_tokens=10)[:, 4:]
    # An eos that row 0 emits at some step t0 and row 1 not before a later step (or never).
    eos, t0 = None, None
    for t in range(10):
        token = int(free[0, t])
        later = (free[1] == token).nonzero()
        if token not in free[0, :t].tolist() and (len(later) == 0 or int(later[0]) > t):
            eos, t0 = token, t
            break
    assert eos is not None and t0 is not None, "seed gives no usable eos; change the seed"
    pad = (eos + 1) % VOCAB
    out = model.generate(x, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad)[:, 4:]
    assert torch.equal(out[0, : t0 + 1], free[0, : t0 + 1])
    assert (out[0, t0 + 1:] == pad).all()
    row1_stop = (free[1] == eos).nonzero()
    end = int(row1_stop[0]) + 1 if len(row1_stop) else out.shape[1]
    assert torch.equal(out[1, :end], free[1, :end])
    assert (out[1, end:] == pad).all()
    # Everyone finished -> stop early; pad defaults to the eos id.
    both = model.generate(x[:1], max_new_tokens=10, eos_token_id=eos)
    assert both.shape[1] == 4 + t0 + 1


def test_sampling_with_a_seeded_generator_is_reproducible() -> None:
    model = make_model()
    x = prompt(5, seed=6, batch=2)
    kw: dict[str, Any] = {"max_new_tokens": 15, "do_sample": True, "temperature": 1.5}
    a = model.generate(x, generator=torch.Generator().manual_seed(11), **kw)
    b = model.generate(x, generator=torch.Generator().manual_seed(11), **kw)
    c = model.generate(x, generator=torch.Generator().manual_seed(12), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # 30 draws at temperature 1.5: identical by chance is ~impossible
    greedy = model.generate(x, max_new_tokens=15)
    top1 = model.generate(x, generator=torch.Generator().manual_seed(3), top_k=1, **kw)
    assert torch.equal(top1, greedy)
    tiny_p = model.generate(x, generator=torch.Generator().manual_seed(3), top_p=1e-6, **kw)
    assert torch.equal(tiny_p, greedy)  # the nucleus of a tiny top_p is the top token alone


def test_sampled_tokens_follow_the_distribution() -> None:
    """Many single-step samples: the frequencies match softmax(logits / T) over the top-k."""
    model = make_model(dtype=torch.float32)
    x = prompt(3, seed=7).expand(4000, 3)
    out = model.generate(x, max_new_tokens=1, do_sample=True, temperature=2.0, top_k=4,
                         generator=torch.Generator().manual_seed(0))
    logits = model(x[:1]).logits[0, -1] / 2.0
    top = torch.topk(logits, 4)
    probs = top.values.softmax(-1)
    counts = torch.stack([(out[:, -1] == t).sum() for t in top.indices]).float()
    assert int(counts.sum()) == 4000  # nothing outside the top 4
    assert torch.allclose(counts / 4000, probs, atol=0.03)


def test_filter_logits_against_hand_computation() -> None:
    logits = torch.log(torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]]))
    # Sorted: 0.40 (1), 0.30 (3), 0.15 (4), 0.10 (2), 0.05 (0); cumulative 0.40, 0.70, 0.85, 0.95.
    keep = torch.isfinite(filter_logits(logits, top_p=0.7))[0].tolist()
    assert keep == [False, True, False, True, False]  # 0.40 + 0.30 reach 0.7: nucleus {1, 3}
    keep = torch.isfinite(filter_logits(logits, top_p=0.71))[0].tolist()
    assert keep == [False, True, False, True, True]
    keep = torch.isfinite(filter_logits(logits, top_p=0.3))[0].tolist()
    assert keep == [False, True, False, False, False]  # the top token always survives
    keep = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert keep == [False, True, False, True, False]
    assert torch.equal(filter_logits(logits, top_p=1.0), logits)
    # top_k first, then top_p over the renormalised survivors (as in HF): top 3 of row 0 are
    # 0.40, 0.30, 0.15 -> 0.47, 0.35, 0.18; 0.47 + 0.35 >= 0.8, so 0.15 is dropped. Without
    # the renormalisation 0.40 + 0.30 < 0.8 would keep it.
    both = filter_logits(torch.cat([logits, logits.flip(-1)]), top_k=3, top_p=0.8)
    assert torch.isfinite(both).tolist() == [[False, True, False, True, False], [False, True, False, True, False]]
    survivors = filter_logits(logits, top_p=0.85)
    renorm = survivors.softmax(-1)[0]
    assert math.isclose(float(renorm[1]), 0.40 / 0.85, rel_tol=1e-6)


def test_stream_generate_matches_generate_and_leaks_no_grad_mode() -> None:
    model = make_model()
    x = prompt(6, seed=8, batch=2)
    expected = model.generate(x, max_new_tokens=9, do_sample=True, generator=torch.Generator().manual_seed(1))
    streamed = []
    assert torch.is_grad_enabled()
    for token in model.stream_generate(x, max_new_tokens=9, do_sample=True,
                                       generator=torch.Generator().manual_seed(1)):
        # Between yields the caller's thread is in its own mode: grad on, no inference mode.
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert token.shape == (2,) and not token.requires_grad
        # Not an inference tensor: the caller may edit it in place.
        assert not token.is_inference()
        streamed.append(token.clone())
        token.add_(0)
    assert torch.equal(torch.stack(streamed, 1), expected[:, 6:])
    # The caller keeps training meanwhile: autograd works between yields.
    stream = model.stream_generate(x, max_new_tokens=3)
    next(stream)
    loss = model(x, labels=x).loss
    assert loss is not None
    loss.backward()
    assert model.embed_tokens.weight.grad is not None
    assert len(list(stream)) == 2


def test_max_new_tokens_zero_returns_the_prompt() -> None:
    model = make_model()
    x = prompt(4, seed=9)
    assert torch.equal(model.generate(x, max_new_tokens=0), x)
    assert list(model.stream_generate(x, max_new_tokens=0)) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
     ({"max_new_tokens": 2.0}, ValueError, "max_new_tokens"),
     ({"do_sample": True, "top_p": 0.0}, ValueError, "top_p"),
     ({"do_sample": True, "top_p": 1.5}, ValueError, "top_p"),
     ({"do_sample": True, "top_k": 0}, ValueError, "top_k"),
     ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
     ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature"),
     ({"eos_token_id": VOCAB}, ValueError, "eos_token_id"),
     ({"pad_token_id": -1, "eos_token_id": 1}, ValueError, "pad_token_id"),
     ({"attention_mask": torch.ones(2, 4)}, ValueError, "attention_mask"),
     ({"attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}, ValueError, "attention_mask"),
     ({"attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])}, ValueError, "attention_mask"),
     ({"chunk_size": 0}, ValueError, "chunk_size")],
)
def test_bad_generation_arguments_name_the_argument(kwargs: dict[str, Any], error: type, name: str) -> None:
    model = make_model()
    args: dict[str, Any] = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error, match=name):
        model.generate(prompt(3, seed=1, batch=2), **args)
    with pytest.raises(error, match=name):
        next(model.stream_generate(prompt(3, seed=1, batch=2), **args))


def test_bad_prompts() -> None:
    model = make_model()
    with pytest.raises(IndexError, match="input_ids"):
        model.generate(torch.tensor([[1, VOCAB]]), max_new_tokens=2)
    with pytest.raises(TypeError, match="input_ids"):
        model.generate(torch.tensor([[1.0, 2.0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("overrides", [{}, {"pre_norm": False}, {"relative_position": False},
                                       {"value_factor": 2.0, "bias": True}])
def test_prefill_gives_a_full_forwards_last_logits_and_state(overrides: dict[str, Any]) -> None:
    model = make_model(**overrides)
    x = prompt(17, seed=20, batch=2)
    full = model(x, mode="parallel")
    out = model.prefill(x, chunk_size=4)
    assert out.logits.shape == (2, 1, VOCAB) and not out.logits.requires_grad
    torch.testing.assert_close(out.logits, full.logits[:, -1:], rtol=1e-10, atol=1e-10)
    for got, want in zip(out.state.memories, full.state.memories, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert out.state.position.tolist() == [17, 17]
    # From a state, and decoding on from the prefill's state gives the forward's next logits.
    head = model.prefill(x[:, :5])
    rest = model.prefill(x[:, 5:], state=head.state)
    torch.testing.assert_close(rest.logits, full.logits[:, -1:], rtol=1e-10, atol=1e-10)
    token = full.logits[:, -1].argmax(-1, keepdim=True)
    after = model(token, state=out.state).logits
    torch.testing.assert_close(after, model(torch.cat([x, token], 1), mode="parallel").logits[:, -1:],
                               rtol=1e-10, atol=1e-10)


def test_prefill_runs_the_last_layers_ffn_on_the_last_position_only() -> None:
    model = make_model(num_layers=3)
    seen: list[tuple[int, ...]] = []
    model.decoder.layers[-1].ffn.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    first: list[tuple[int, ...]] = []
    model.decoder.layers[0].ffn.register_forward_hook(lambda m, args, out: first.append(tuple(args[0].shape)))
    model.prefill(prompt(12, seed=21, batch=2))
    assert seen == [(2, 1, 16)] and first == [(2, 12, 16)]


def test_prefill_of_a_left_padded_batch_gives_each_row_its_own_state() -> None:
    model = make_model()
    prompts = [prompt(n, seed=30 + n)[0] for n in (8, 3, 1)]
    batch, mask = left_pad(prompts, pad=5)
    out = model.prefill(batch, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model(p[None], mode="parallel")
        torch.testing.assert_close(out.logits[i], alone.logits[0, -1:], rtol=1e-10, atol=1e-10)
        for got, want in zip(out.state.memories, alone.state.memories, strict=True):
            torch.testing.assert_close(got[i], want[0], rtol=1e-10, atol=1e-10)
        assert int(out.state.position[i]) == len(p)


def test_bad_prefill_inputs() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="input_ids"):
        model.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model.prefill(prompt(4, seed=1), attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(ValueError, match="left-padded"):  # the new tokens would follow the padding
        model.generate(prompt(4, seed=1), max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 1, 0]]))
    with pytest.raises(TypeError, match="state"):
        model.prefill(prompt(4, seed=1), state="nope")
    with pytest.raises(ValueError, match="chunk_size"):
        model.prefill(prompt(4, seed=1), chunk_size=0)


def test_prompts_of_embeddings_give_what_the_ids_give() -> None:
    """A prompt of embeddings (a soft prompt) prefilled, left-padded and from a state, gives the
    logits and state of the ids it embeds, and ``generate`` from it their new tokens."""
    model = make_model()
    prompts = [prompt(n, seed=40 + n)[0] for n in (9, 4)]
    batch, mask = left_pad(prompts, pad=5)
    embeds = model.embed_tokens(batch).detach()
    want, got = model.prefill(batch, attention_mask=mask), model.prefill(inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-12, atol=1e-12)
    for a, b in zip(got.state.memories, want.state.memories, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    rest = model.prefill(inputs_embeds=model.embed_tokens(prompt(3, seed=50, batch=2)).detach(), state=got.state)
    torch.testing.assert_close(rest.logits, model.prefill(prompt(3, seed=50, batch=2), state=want.state).logits,
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="inputs_embeds must hold at least one prompt token per row"):
        model.prefill(inputs_embeds=embeds[:, :0])
    # generate from embeddings: the new tokens the ids give (without a prompt to repeat).
    for settings in ({}, {"do_sample": True, "top_k": 5}):
        from_ids = model.generate(batch, 6, attention_mask=mask, generator=torch.Generator().manual_seed(3),
                                  **settings)
        from_embeds = model.generate(inputs_embeds=embeds, max_new_tokens=6, attention_mask=mask,
                                     generator=torch.Generator().manual_seed(3), **settings)
        assert torch.equal(from_embeds, from_ids[:, batch.shape[1]:]), settings
    assert model.generate(inputs_embeds=embeds, max_new_tokens=0).shape == (2, 0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got None"):
        model.generate(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model.prefill(batch, inputs_embeds=embeds)
