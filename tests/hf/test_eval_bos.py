"""``retnet eval`` with a tokenizer that wants ``<s>`` first (as fla-hub's checkpoints bring):
RetNetLM scores and generates exactly as lm-eval's own Hugging Face model (``HFLM``) does on the
same weights (through our ``AutoModelForCausalLM`` class) and the same tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.harness import RetNetLM
from yet_another_retnet.hf import YaRetNetForCausalLM
from yet_another_retnet.training.data import HFTokenizer

TEXT = ("retention is a recurrence with a decay. the state carries what came before.\n"
        "a question: what is two and two? four. the sky is blue, grass is green.\n") * 4


def _tokenizer(path: Path) -> tuple[Path, int, int]:
    """A small byte-level BPE whose post-processor puts <s> first (as a Llama-style one does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tok.save(str(path))
    return path, bos, eos


def _requests(kind: str, args: list[tuple[object, ...]]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LOGLIKELIHOOD = [("the sky is", " blue"), ("the sky is", " green"), ("a question: what is two and two?", " four."),
                 ("", "retention is a recurrence"), ("<s>the state", " carries")]
ROLLING = [("retention is a recurrence with a decay.",), ("short",), (TEXT[:300],)]
GENERATE = [("the sky is", {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}),
            ("a question:", {"until": ["."], "max_gen_toks": 8, "do_sample": False})]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[RetNetLM, HFLM, RetNet, HFTokenizer]:
    from transformers import PreTrainedTokenizerFast

    path, bos, eos = _tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    ours_tok = HFTokenizer(path, bos_token_id=bos, eos_token_id=eos, add_bos=True)
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=ours_tok.vocab_size, d_model=32, num_heads=2, num_layers=2, ffn_dim=64,
                          dropout=0.0, chunk_size=8)
    model = RetNet(config).double().eval()
    theirs_tok = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>")
    assert theirs_tok("the sky")["input_ids"][0] == bos  # the tokenizer wants <s>, as fla-hub's do
    hflm = HFLM(pretrained=YaRetNetForCausalLM.from_retnet(model), tokenizer=theirs_tok, backend="causal",
                batch_size=2, device="cpu", max_length=4096)
    return RetNetLM(model, ours_tok, batch_size=2), hflm, model, ours_tok


def test_scores_and_generations_equal_lm_evals_hf_model_with_bos(pair) -> None:  # type: ignore[no-untyped-def]
    ours, hflm, _, _ = pair
    assert ours.prefix_token_id == hflm.prefix_token_id
    for text in ("the sky is", "<s>the state"):
        assert ours.tok_encode(text) == hflm.tok_encode(text)
    assert ours.tok_encode("the sky", add_special_tokens=False) == hflm.tok_encode("the sky", add_special_tokens=False)
    got = ours.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    want = hflm.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    for (g, g_greedy), (w, w_greedy) in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-6, abs=1e-6) and g_greedy == w_greedy, (got, want)
    got_rolling = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", ROLLING))
    want_rolling = hflm.loglikelihood_rolling(_requests("loglikelihood_rolling", ROLLING))
    assert got_rolling == pytest.approx(want_rolling, rel=1e-6, abs=1e-6)
    assert ours.generate_until(_requests("generate_until", GENERATE)) == \
        hflm.generate_until(_requests("generate_until", GENERATE))


def test_without_bos_the_scores_differ_and_bad_settings_are_refused(pair) -> None:  # type: ignore[no-untyped-def]
    _, hflm, model, tok = pair
    plain = RetNetLM(model, tok, batch_size=2, add_bos_token=False)
    assert plain.tok_encode("the sky") == tok.encode("the sky") and plain.prefix_token_id == plain.eot_token_id
    got = plain.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD[:2]))
    want = hflm.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD[:2]))
    assert got[0][0] != pytest.approx(want[0][0], rel=1e-6)  # <s> matters: the comparison above can fail
    with pytest.raises(ValueError, match="add_bos_token"):
        RetNetLM(model, HFTokenizer(tok.path), add_bos_token=True)  # no bos_token_id known
    with pytest.raises(ValueError, match="add_bos_token"):
        RetNetLM(model, tok, add_bos_token="yes")  # type: ignore[arg-type]


def test_generation_stops_at_eos_as_lm_evals_hf_model(pair) -> None:  # type: ignore[no-untyped-def]
    import copy

    ours, hflm, model, tok = pair
    prompts = ["the sky is", "a question:"]
    rigged = copy.deepcopy(model)
    ids = torch.tensor([ours.tok_encode(prompts[0])])
    free = rigged.generate(ids, 10)[0, ids.shape[1]:]
    with torch.no_grad():  # </s> becomes the greedy choice 3 tokens into the first prompt
        rigged.lm_head.weight[tok.eos_token_id] = rigged.lm_head.weight[int(free[3])] * 1.05
    new = rigged.generate(ids, 10)[0, ids.shape[1]:].tolist()
    assert new.index(tok.eos_token_id) == 3 and new[4:] != [tok.eos_token_id] * 6  # text would follow it
    # with the eos id in the model's config, as a converted checkpoint has it (transformers' generate
    # stops a row there; lm-eval's stop strings end a batch only when every row has one)
    theirs = HFLM(pretrained=YaRetNetForCausalLM.from_retnet(rigged, eos_token_id=tok.eos_token_id),
                  tokenizer=hflm.tokenizer, backend="causal", batch_size=2, device="cpu", max_length=4096)
    requests = [(p, {"until": ["Q:"], "max_gen_toks": 10, "do_sample": False}) for p in prompts]
    got = RetNetLM(rigged, tok, batch_size=2).generate_until(_requests("generate_until", requests))
    assert got == theirs.generate_until(_requests("generate_until", requests))
    assert got[0] == tok.decode(new[:3])
