"""yet_another_retnet.hf against transformers' own machinery: Auto classes, generate (greedy,
sampling, beam search, scores, streamers), Trainer, save/load in both directions, bad input.

transformers' generation loop drives the model here; our ``generate`` is only the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

import yet_another_retnet.hf as yhf
from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.generation import GenerationMixin as OurGenerationMixin
from yet_another_retnet.hf import RetNetCache, YaRetNetConfig, YaRetNetForCausalLM
from yet_another_retnet.hf.compat import CACHE_KWARG


def _config(**overrides: object) -> RetNetConfig:
    base = {"vocab_size": 32, "d_model": 32, "num_heads": 2, "num_layers": 2, "ffn_dim": 64, "dropout": 0.0}
    return RetNetConfig(**{**base, **overrides})  # type: ignore[arg-type]


def _model(seed: int = 0, **overrides: object) -> RetNet:
    torch.manual_seed(seed)
    model = RetNet(_config(**overrides)).eval()
    with torch.no_grad():  # larger logits: fewer near-ties in argmax and beam comparisons
        model.lm_head.weight.mul_(20.0)
    return model


def _ours(model: RetNet, *args: object, **kwargs: object) -> torch.Tensor:
    return model.generate(*args, **kwargs)  # type: ignore[arg-type]


def _theirs(hf: YaRetNetForCausalLM, *args: object, **kwargs: object) -> object:
    """transformers' generate, with our own loop made to raise: transformers' loop must run."""

    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("our own generation loop was called")

    saved = OurGenerationMixin.generate, OurGenerationMixin.stream_generate, OurGenerationMixin.prefill
    OurGenerationMixin.generate = OurGenerationMixin.stream_generate = OurGenerationMixin.prefill = refuse  # type: ignore[method-assign,assignment]
    try:
        return hf.generate(*args, **kwargs)
    finally:
        OurGenerationMixin.generate, OurGenerationMixin.stream_generate, OurGenerationMixin.prefill = saved  # type: ignore[method-assign]


# ---------------------------------------------------------------------------------------------
# One directory, both worlds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "bias": True, "ffn": "glu",
                                            "block_norm": "rmsnorm", "head_norm": "rmsnorm",
                                            "embedding_norm": True, "decay": "log-spaced"}])
def test_our_directory_loads_with_auto_classes_and_back(tmp_path: Path, overrides: dict) -> None:
    model = _model(**overrides)
    model.save_pretrained(tmp_path / "ours")
    assert AutoConfig.from_pretrained(tmp_path / "ours").model_type == "yaretnet"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert isinstance(hf, YaRetNetForCausalLM)
    assert set(hf.state_dict()) == set(model.state_dict())
    assert (hf.lm_head.weight is hf.embed_tokens.weight) == model.config.tie_embeddings
    ids = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(hf(ids).logits, expected)
    hf.save_pretrained(tmp_path / "theirs")
    back = RetNet.from_pretrained(tmp_path / "theirs")
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(ids).logits, expected)


def test_every_config_field_round_trips(tmp_path: Path) -> None:
    changed = {"vocab_size": 40, "d_model": 48, "num_heads": 3, "num_layers": 3, "ffn_dim": 80,
               "value_factor": 1.0, "dropout": 0.05, "activation_dropout": 0.02, "ffn": "glu",
               "activation": "swish", "gate_activation": "gelu", "block_norm": "rmsnorm",
               "head_norm": "rmsnorm", "norm_eps": 1e-5, "bias": True, "tie_embeddings": False,
               "decay": "log-spaced", "chunk_size": 16, "embed_scale": 2.0, "embedding_norm": True,
               "residual_scale": 1.5, "pre_norm": False, "relative_position": True, "init_std": 0.01}
    fields = {f.name for f in dataclasses.fields(RetNetConfig)}
    config = RetNetConfig(**{k: v for k, v in changed.items() if k in fields})
    for f in dataclasses.fields(RetNetConfig):  # a field added later still round-trips
        assert getattr(YaRetNetConfig.from_retnet_config(config), f.name) == getattr(config, f.name)
    hf_config = YaRetNetConfig.from_retnet_config(config, eos_token_id=3, pad_token_id=0)
    hf_config.save_pretrained(tmp_path)
    assert YaRetNetConfig.from_pretrained(tmp_path).to_retnet_config() == config
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "yaretnet" and data["eos_token_id"] == 3
    assert RetNetConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="unknown RetNetConfig fields"):
        RetNetConfig.from_dict({**data, "hidden_act": "silu"})


def test_tokenizer_files_travel(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from yet_another_retnet.training.data import HFTokenizer, load_tokenizer

    model = _model()
    model.save_pretrained(tmp_path / "ours")
    vocab = {f"w{i}": i for i in range(32)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "ours" / "tokenizer.json"))
    HFTokenizer(tmp_path / "ours" / "tokenizer.json").save(tmp_path / "ours")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "theirs")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "theirs" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes()
    assert load_tokenizer(tmp_path / "theirs").encode("w3 w5") == [3, 5]
    # transformers reads it too, and what its tokenizer writes reads back with ours
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(tmp_path / "theirs")
    assert theirs("w3 w5")["input_ids"] == [3, 5]
    theirs.save_pretrained(tmp_path / "tokenizer")
    assert load_tokenizer(tmp_path / "tokenizer").encode("w3 w5") == [3, 5]


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def _left_padded(pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = [6, 3, 5]
    ids = torch.full((3, 6), pad, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, 6 - n:] = torch.randint(1, 32, (n,), generator=g)
        mask[row, 6 - n:] = 1
    return ids, mask


def test_greedy_equals_ours_left_padded_with_eos() -> None:
    model = _model()
    hf = YaRetNetForCausalLM.from_retnet(model)
    ids, mask = _left_padded()
    free = _ours(model, ids, 12, attention_mask=mask)
    eos = int(free[1, 6 + 2])  # row 1 ends after 3 new tokens, the others later or never
    expected = _ours(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    got = _theirs(hf, ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    assert torch.equal(got, expected)
    assert bool((got[1, 6 + 3:] == 0).all())


def test_sampling_equals_ours_seeded() -> None:
    model = _model(seed=1)
    with torch.no_grad():
        model.lm_head.weight.div_(20.0)  # a flat distribution: every draw matters
    hf = YaRetNetForCausalLM.from_retnet(model)
    ids, mask = _left_padded()
    for options in ({"temperature": 1.0, "top_k": 0, "top_p": 1.0},
                    {"temperature": 0.7, "top_k": 8, "top_p": 0.9}):
        ours_options = {k: (None if k == "top_k" and v == 0 else v) for k, v in options.items()}
        expected = _ours(model, ids, 10, do_sample=True, attention_mask=mask,
                         generator=torch.Generator().manual_seed(7), **ours_options)
        torch.manual_seed(7)  # transformers draws from the global generator
        got = _theirs(hf, ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0,
                          **options)
        assert torch.equal(got, expected), options


def test_beam_search_with_every_continuation_equals_exhaustive_search() -> None:
    vocab, steps = 6, 3
    model = _model(seed=2, vocab_size=vocab)
    hf = YaRetNetForCausalLM.from_retnet(model)
    prompt = torch.tensor([[1, 4, 2, 5]])
    beams = vocab ** (steps - 1)  # every prefix stays in the beam until the last step
    out = _theirs(hf, prompt, max_new_tokens=steps, num_beams=beams, do_sample=False, length_penalty=0.0,
                      early_stopping=True, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    # Exhaustive: score every continuation with our parallel forward.
    tails = torch.tensor(list(itertools.product(range(vocab), repeat=steps)))
    seqs = torch.cat([prompt.expand(len(tails), -1), tails], dim=1)
    with torch.no_grad():
        logp = model(seqs, mode="parallel").logits.double().log_softmax(-1)
    n = prompt.shape[1]
    scores = logp[:, n - 1:-1].gather(-1, seqs[:, n:, None]).squeeze(-1).sum(-1)
    best = int(scores.argmax())
    top2 = scores.topk(2).values
    assert float(top2[0] - top2[1]) > 1e-3  # no near-tie to make the comparison fragile
    assert torch.equal(out.sequences[0], seqs[best])
    assert abs(float(out.sequences_scores[0]) - float(scores[best])) < 1e-4


class _Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.ended = True


def test_output_scores_and_streamer() -> None:
    model = _model(seed=4)
    hf = YaRetNetForCausalLM.from_retnet(model)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    streamer = _Collect()
    out = _theirs(hf, prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                      output_scores=True, streamer=streamer, pad_token_id=0)
    new = out.sequences[0, prompt.shape[1]:]
    assert torch.equal(out.sequences, _ours(model, prompt, 6))
    assert len(out.scores) == 6
    with torch.no_grad():  # the scores are the logits of a parallel forward over the sequence
        logits = model(out.sequences[:, :-1], mode="parallel").logits[0, prompt.shape[1] - 1:]
    torch.testing.assert_close(torch.cat(out.scores), logits, atol=1e-4, rtol=1e-4)
    assert streamer.ended and torch.equal(streamer.chunks[0].flatten(), prompt[0])
    assert torch.equal(torch.cat([c.flatten() for c in streamer.chunks[1:]]), new)


def test_forward_matches_ours_and_cache_continues() -> None:
    model = _model(seed=5)
    hf = YaRetNetForCausalLM.from_retnet(model)
    ids = torch.randint(0, 32, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids, labels=ids)
        full = hf(ids, labels=ids)
        torch.testing.assert_close(full.loss, ours.loss)
        first = hf(ids[:, :6], use_cache=True)
        cache = first[CACHE_KWARG]
        assert isinstance(cache, RetNetCache) and cache.get_seq_length() == 6
        # transformers' convention: the mask of the whole sequence with only the new tokens
        rest = hf(ids[:, 6:], attention_mask=torch.ones(2, 10, dtype=torch.long), **{CACHE_KWARG: cache})
        torch.testing.assert_close(rest.logits, full.logits[:, 6:], atol=1e-5, rtol=1e-5)
        assert cache.get_seq_length() == 10
        assert hf(ids, logits_to_keep=1).logits.shape == (2, 1, 32)


def test_trainer_loss_scaling_with_num_items_in_batch() -> None:
    model = _model(seed=6)
    hf = YaRetNetForCausalLM.from_retnet(model)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        logits = model(ids).logits
        total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100, reduction="sum")
        loss = hf(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(loss, total / 40)


def test_generate_continues_from_a_passed_cache() -> None:
    model = _model(seed=8)
    hf = YaRetNetForCausalLM.from_retnet(model)
    ids = torch.randint(1, 32, (2, 9), generator=torch.Generator().manual_seed(4))  # no pad (0) in it
    expected = _ours(model, ids, 6)
    # The cache after the first 5 tokens, under either name; generate is given the whole prompt
    # and reads only the 4 tokens the cache has not.
    for name in ("cache", "past_key_values"):
        with torch.no_grad():
            cache = hf(ids[:, :5], use_cache=True)[CACHE_KWARG]
        got = _theirs(hf, ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **{name: cache})
        assert torch.equal(got, expected), name
        assert cache.get_seq_length() == 9 + 6 - 1  # the last token is returned, not read
    # transformers' chunked prefill into an empty cache: each call gets one chunk of the prompt
    got = _theirs(hf, ids, max_new_tokens=6, do_sample=False, pad_token_id=0, prefill_chunk_size=4,
                  **{CACHE_KWARG: RetNetCache()})
    assert torch.equal(got, expected)


@pytest.mark.parametrize("overrides", [{}, {"relative_position": True}])
def test_packed_documents_run_as_if_alone(overrides: dict) -> None:
    from transformers import DataCollatorWithFlattening
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = _model(seed=7, **overrides)
    hf = YaRetNetForCausalLM.from_retnet(model)
    g = torch.Generator().manual_seed(2)
    docs = [torch.randint(1, 32, (n,), generator=g).tolist() for n in (5, 3, 7)]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs], return_tensors="pt")
    assert batch["position_ids"].tolist() == [[*range(5), *range(3), *range(7)]] and "attention_mask" not in batch
    with torch.no_grad():
        packed = hf(**batch)
        alone = torch.cat([model(torch.tensor([d])).logits for d in docs], dim=1)
    torch.testing.assert_close(packed.logits, alone, atol=1e-5, rtol=1e-5)
    # the collator's labels separate the documents (-100 at each start): transformers' own loss
    torch.testing.assert_close(packed.loss, ForCausalLMLoss(alone, batch["labels"], 32), atol=1e-5, rtol=1e-5)


def test_position_ids_the_model_counts_are_accepted_others_refused() -> None:
    hf = YaRetNetForCausalLM.from_retnet(_model(seed=7))
    ids, mask = _left_padded(pad=1)
    # transformers' own positions for left padding: cumsum of the mask - 1, padding set to 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        plain = hf(ids, attention_mask=mask).logits
        torch.testing.assert_close(hf(ids, attention_mask=mask, position_ids=positions).logits, plain)
        cache = hf(ids[:, :4], use_cache=True)[CACHE_KWARG]  # no padding: 4 tokens a row
        rest = hf(ids[:, 4:], position_ids=torch.tensor([[4, 5]]), **{CACHE_KWARG: cache}).logits
        torch.testing.assert_close(rest, hf(ids).logits[:, 4:], atol=1e-5, rtol=1e-5)
        bad = [({"attention_mask": mask, "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}, ids),  # padding
               ({"position_ids": torch.tensor([[3, 4, 5, 6, 7, 8]])}, ids),  # not from 0
               ({"position_ids": torch.tensor([[0, 1, 3, 4, 0, 1]])}, ids),  # a gap
               ({"position_ids": torch.tensor([[0, 0]]), CACHE_KWARG: hf(ids, use_cache=True)[CACHE_KWARG]},
                ids[:, :2])]  # a reset after a cache
        for kwargs, inputs in bad:
            with pytest.raises(ValueError, match="position_ids"):
                hf(inputs, **kwargs)


def test_resized_embeddings_take_new_ids(tmp_path: Path) -> None:
    model = _model(seed=9)
    hf = YaRetNetForCausalLM.from_retnet(model)
    hf.resize_token_embeddings(40)
    assert hf.config.vocab_size == 40 and hf.retnet.config.vocab_size == 40
    resized = RetNet(_config(vocab_size=40)).eval()  # the same weights in a RetNet built for 40 ids
    resized.load_state_dict(hf.state_dict())
    ids = torch.tensor([[3, 35, 39, 1, 36]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, resized(ids).logits)
    got = _theirs(hf, ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, _ours(resized, ids, 4))
    hf.save_pretrained(tmp_path)
    assert RetNet.from_pretrained(tmp_path).config.vocab_size == 40


def test_loss_with_num_items_in_batch_equals_transformers_loss() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = _model(seed=6)
    hf = YaRetNetForCausalLM.from_retnet(model).train()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
    scored = ids.clone()
    scored[0, :3] = -100
    for labels in (scored, torch.full_like(ids, -100)):  # the second: a micro-batch with nothing scored
        hf.zero_grad()
        loss = hf(ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        with torch.no_grad():
            expected = ForCausalLMLoss(model(ids).logits, labels, 32, num_items_in_batch=torch.tensor(40))
        torch.testing.assert_close(loss, expected)
        loss.backward()
        assert all(bool(p.grad.isfinite().all()) for p in hf.parameters() if p.grad is not None)
    assert float(loss.detach()) == 0.0


def test_attentions_and_hidden_states_are_refused_not_ignored() -> None:
    hf = YaRetNetForCausalLM.from_retnet(_model())
    ids = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        for name in ("output_attentions", "output_hidden_states"):
            with pytest.raises(ValueError, match=name):
                hf(ids, **{name: True})
            assert hf(ids, **{name: False}).logits.shape == (1, 5, 32)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def test_trainer_trains_and_result_loads_in_both_worlds(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    hf = YaRetNetForCausalLM(YaRetNetConfig.from_retnet_config(_config(num_layers=1)))
    period = torch.tensor([1, 5, 2, 7, 3, 9, 4, 11])

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = period.roll(-(i % 8)).repeat(3)[:16]
            return {"input_ids": ids, "labels": ids}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=30,
                             learning_rate=5e-3, logging_steps=5, save_strategy="no", report_to=[],
                             use_cpu=True, gradient_accumulation_steps=2, seed=0, disable_tqdm=True)
    trainer = Trainer(model=hf, args=args, train_dataset=Data(), eval_dataset=torch.utils.data.Subset(Data(), range(8)))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.evaluate()["eval_loss"] < losses[0]
    trainer.save_model(str(tmp_path / "final"))
    ids = period.repeat(2)[None]
    ours = RetNet.from_pretrained(tmp_path / "final")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        assert torch.equal(ours(ids).logits, hf.eval()(ids).logits)


def _right_padding_collator() -> object:
    """transformers' causal-LM collator over a word-level tokenizer that pads on the right (its
    default side): padding 0 in ``attention_mask``, -100 in ``labels``."""
    import tokenizers
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(32)}, unk_token="w1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", padding_side="right")
    return DataCollatorForLanguageModeling(fast, mlm=False)


def test_right_padded_batches_from_transformers_collator_give_each_row_its_own_answer() -> None:
    model = _model(seed=9)
    hf = YaRetNetForCausalLM.from_retnet(model)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 32, (n,), generator=g) for n in (7, 3, 5)]  # no pad id (0) inside
    batch = _right_padding_collator()([{"input_ids": r.tolist()} for r in rows])  # type: ignore[operator]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    with torch.no_grad():
        out = hf(**batch, use_cache=True)
        scored = total = 0.0
        for i, r in enumerate(rows):
            alone = model(r[None], labels=r[None])
            torch.testing.assert_close(out.logits[i, : len(r)], alone.logits[0], rtol=1e-5, atol=1e-5)
            state = out[CACHE_KWARG].state  # the state after the row's last real token
            assert int(state.position[i]) == len(r)
            for got, want in zip(state.memories, alone.state.memories, strict=True):
                torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)
            total += float(alone.loss) * (len(r) - 1)
            scored += len(r) - 1
    # The collator's labels are the ids with -100 on the padding: each row scores its own next
    # tokens, so the batch's mean is that of the rows' own losses.
    assert abs(float(out.loss) - total / scored) < 1e-5


def test_trainer_trains_on_right_padded_batches(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    hf = YaRetNetForCausalLM(YaRetNetConfig.from_retnet_config(_config(num_layers=1)))
    period = [1, 5, 2, 7, 3, 9, 4, 11]

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> dict[str, list[int]]:  # lengths 6 to 16
            return {"input_ids": (period[i % 8:] + period * 2)[: 6 + i % 11]}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=30,
                             learning_rate=5e-3, logging_steps=5, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=hf, args=args, train_dataset=Data(), eval_dataset=torch.utils.data.Subset(Data(), range(8)),
                      data_collator=_right_padding_collator())
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.evaluate()["eval_loss"] < losses[0]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_config_of_another_model_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_type"):
        YaRetNetConfig(model_type="llama")
    _model().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "retnet"}))
    with pytest.raises(ValueError, match="model_type"):
        RetNet.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type"):
        YaRetNetForCausalLM.from_pretrained(tmp_path)


def test_missing_weight_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["decoder.layers.1.ffn.fc2.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['decoder.layers.1.ffn.fc2.weight'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_cache_from_another_batch_or_kind_is_refused() -> None:
    hf = YaRetNetForCausalLM.from_retnet(_model())
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        cache = hf(ids, use_cache=True)[CACHE_KWARG]
        with pytest.raises(ValueError, match="cache holds the state of 2 sequences but input_ids has 3 rows"):
            hf(torch.randint(0, 32, (3, 1)), **{CACHE_KWARG: cache})
        from transformers import DynamicCache

        other = DynamicCache()
        other.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
        with pytest.raises(TypeError, match="RetNetCache"):
            hf(ids, **{CACHE_KWARG: other})
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(3)
    with pytest.raises(IndexError):
        cache.reorder_cache(torch.tensor([0, 2]))
    assert yhf.MODEL_TYPE == "yaretnet"


def test_inputs_embeds_in_forward_and_generate() -> None:
    """transformers' ``inputs_embeds``: forward gives what the ids give; ``generate`` from
    embeddings (left-padded, greedy and seeded sampling) gives the tokens generating from the ids
    gives, without the prompt, as transformers returns them."""
    model = _model(seed=7, embedding_norm=True, embed_scale=1.5)
    hf = YaRetNetForCausalLM.from_retnet(model)
    ids, mask = _left_padded()
    embeds = hf.get_input_embeddings()(ids)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, labels=ids)
        got = hf(inputs_embeds=embeds, attention_mask=mask, labels=ids)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(got.loss, want.loss)
        assert got[CACHE_KWARG].get_seq_length() == 6
    for settings in ({"do_sample": False}, {"do_sample": True, "top_k": 8}):
        torch.manual_seed(11)
        from_ids = _theirs(hf, ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0, **settings)
        torch.manual_seed(11)
        from_embeds = _theirs(hf, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=10, pad_token_id=0,
                              **settings)
        assert torch.equal(from_embeds, from_ids[:, 6:]), settings
    # A later step without the cache of the embeddings has only the sampled tokens: refused, not
    # run as a prompt of its own.
    with pytest.raises(ValueError, match="inputs_embeds needs use_cache=True"):
        hf.prepare_inputs_for_generation(ids[:, :2], attention_mask=mask, inputs_embeds=embeds, is_first_iteration=False)
    with pytest.raises(ValueError, match="inputs_embeds needs use_cache=True"):  # as transformers 4.x calls it
        hf.prepare_inputs_for_generation(ids[:, :2], attention_mask=mask, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        hf(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"inputs_embeds must be a \(batch, length, d_model\) tensor"):
        hf(inputs_embeds=embeds[0])
