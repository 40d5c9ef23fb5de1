"""lm-evaluation-harness on RetNetLM: tasks defined from local jsonl files (no download), scores
checked against our own model's forward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.cli import main
from yet_another_retnet.harness import RetNetLM, run_tasks
from yet_another_retnet.training.data import ByteTokenizer

QUESTIONS = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"question": "def f(x): return", "choices": ["x", "None", "f(x)", "0"], "answer": 2},
]
TEXTS = [{"text": "retention is a recurrence with a decay"}, {"text": "short"},
         {"text": "a longer document that spans several windows of the rolling scorer\nand a second line"}]


def _model() -> RetNet:
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=256, d_model=32, num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0,
                          chunk_size=8)
    return RetNet(config).eval()


def _tasks(root: Path) -> Path:
    (root / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (root / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in TEXTS))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'texts.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{choices[0]}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def _reference_loglikelihood(model: RetNet, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = model(ids[:, :-1], mode="parallel").logits.double().log_softmax(-1)[0]
    n = len(context)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(continuation)))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_tasks_from_local_files_match_our_model(tmp_path: Path) -> None:
    model, tok = _model(), ByteTokenizer()
    results = run_tasks(model, tok, ["tiny_mc", "tiny_ppl", "tiny_gen"], batch_size=2,
                        include_path=_tasks(tmp_path), log_samples=True)
    samples = results["samples"]
    # multiple choice: every choice's log-likelihood equals our forward's, to 1e-5
    assert len(samples["tiny_mc"]) == len(QUESTIONS)
    for sample in samples["tiny_mc"]:
        q = sample["doc"]
        for choice, (ll, _greedy) in zip(q["choices"], sample["filtered_resps"], strict=True):
            expected = _reference_loglikelihood(model, tok.encode(q["question"]), tok.encode(" " + choice))
            assert abs(ll - expected) < 1e-5, (q, choice)
    # perplexity: the whole document after the end-of-text token
    eot = tok.encode("\n")[0]
    for sample in samples["tiny_ppl"]:
        doc = tok.encode(sample["doc"]["text"])
        ll = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
        assert abs(float(ll) - _reference_loglikelihood(model, [eot], doc)) < 1e-4
    assert results["results"]["tiny_ppl"]["word_perplexity,none"] > 1
    # generation: our greedy decoding, cut at the first newline
    for sample in samples["tiny_gen"]:
        prompt = torch.tensor([tok.encode(sample["doc"]["question"])])
        ours = model.generate(prompt, 6)[0, prompt.shape[1]:]
        assert sample["filtered_resps"][0] == tok.decode(ours).split("\n")[0]


def test_rolling_windows_carry_the_state() -> None:
    model, tok = _model(), ByteTokenizer()
    text = TEXTS[2]["text"]
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0), Instance("loglikelihood_rolling", {}, ("ab",), 1)]
    whole = RetNetLM(model, tok, batch_size=2, window=4096).loglikelihood_rolling(requests)
    windowed = RetNetLM(model, tok, batch_size=2, window=7).loglikelihood_rolling(requests)
    expected = _reference_loglikelihood(model, [tok.encode("\n")[0]], tok.encode(text))
    assert abs(whole[0] - expected) < 1e-4 and abs(windowed[0] - expected) < 1e-4
    with pytest.raises(ValueError, match="window"):
        RetNetLM(model, tok, window=0)


def _generate_requests(prompts: list[str], gen_kwargs: dict) -> list[Instance]:
    return [Instance("generate_until", {}, (prompt, dict(gen_kwargs)), i) for i, prompt in enumerate(prompts)]


def test_generation_stops_at_the_end_of_text_token() -> None:
    torch.manual_seed(0)
    model = RetNet(RetNetConfig(vocab_size=257, d_model=32, num_heads=2, num_layers=2, ffn_dim=64, dropout=0.0,
                                chunk_size=8)).eval()
    tok = ByteTokenizer(end_of_document=True)  # decode drops 256: no stop string can see it
    prompts = ["The sky is", "2 + 2 ="]
    first = torch.tensor([tok.encode(prompts[0])])
    free = model.generate(first, 12)[0, first.shape[1]:]
    with torch.no_grad():  # the end of text becomes the greedy choice 3 tokens into the first prompt
        model.lm_head.weight[256] = model.lm_head.weight[int(free[3])] * 1.05
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt)])
        new = model.generate(ids, 12)[0, ids.shape[1]:].tolist()
        end = new.index(256) if 256 in new else len(new)
        if prompt == prompts[0]:  # the test can fail: text follows the end of text
            assert end == 3 and any(t != 256 for t in new[end:]), new
        expected.append(tok.decode(new[:end]).split("Q:")[0])
    lm = RetNetLM(model, tok, batch_size=2, eot_token_id=256)  # the default too: see the test below
    assert lm.generate_until(_generate_requests(prompts, {"until": ["Q:"], "max_gen_toks": 12,
                                                          "do_sample": False})) == expected


def test_generation_arguments_read_as_lm_eval_reads_them() -> None:
    from lm_eval.models.utils import normalize_gen_kwargs

    model, tok = _model(), ByteTokenizer()
    lm = RetNetLM(model, tok, max_gen_toks=3)
    prompt = "2 + 2 ="
    ids = torch.tensor([tok.encode(prompt)])
    for alias in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        gen_kwargs = {"until": "Q:", alias: 9, "num_beams": 1, "repetition_penalty": 1.0}
        n = normalize_gen_kwargs(gen_kwargs, 3)["max_gen_toks"]  # lm-eval's own reading
        assert n == 9
        expected = tok.decode(model.generate(ids, n)[0, ids.shape[1]:]).split("Q:")[0]
        assert lm.generate_until(_generate_requests([prompt], gen_kwargs)) == [expected], alias
    for unsupported in ({"num_beams": 4}, {"repetition_penalty": 1.3}, {"max_length": 40}):
        with pytest.raises(ValueError, match=f"unsupported generation arguments.*{next(iter(unsupported))}"):
            lm.generate_until(_generate_requests([prompt], {"until": ["Q:"], **unsupported}))


def test_end_of_text_is_the_tokenizers_own(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from yet_another_retnet.training.data import HFTokenizer

    model = RetNet(RetNetConfig(vocab_size=257, d_model=32, num_heads=2, num_layers=1, ffn_dim=64, dropout=0.0)).eval()
    vocab = {"a": 0, "b": 1, "\n": 2, "<|endoftext|>": 3, "</s>": 4}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    raw.save(str(tmp_path / "tokenizer.json"))
    lm = RetNetLM(model, ByteTokenizer(end_of_document=True))
    assert lm.eot_token_id == lm.prefix_token_id == 256
    assert RetNetLM(model, HFTokenizer(tmp_path / "tokenizer.json")).eot_token_id == 3  # the first known name
    assert RetNetLM(model, HFTokenizer(tmp_path / "tokenizer.json", eos_token_id=4)).eot_token_id == 4  # declared
    assert RetNetLM(model, ByteTokenizer()).eot_token_id == 10  # none: the newline
    # A document is scored after the end-of-document token it followed in training.
    tok = ByteTokenizer(end_of_document=True)
    got = RetNetLM(model, tok).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("short",), 0)])
    assert abs(got[0] - _reference_loglikelihood(model, [256], tok.encode("short"))) < 1e-4


def test_cli_eval_tasks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _model().save_pretrained(tmp_path / "model")
    ByteTokenizer().save(tmp_path / "model")
    tasks = _tasks(tmp_path)
    assert main(["eval", str(tmp_path / "model"), "--tasks", "tiny_mc", "--include-path", str(tasks),
                 "--json", "--device", "cpu", "--output", str(tmp_path / "out.json")]) == 0
    table = json.loads(capsys.readouterr().out)
    assert 0.0 <= table["tiny_mc"]["acc,none"] <= 1.0
    assert json.loads((tmp_path / "out.json").read_text())["results"] == table
    assert main(["eval", str(tmp_path / "model"), "--tasks", "tiny_mc", "--limit", "0"]) == 2
    assert "--limit must be a finite number > 0" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "model"), "--tasks", "tiny_mc", "--data", str(tmp_path)]) == 2
    assert "--data would be ignored" in capsys.readouterr().err


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown lm-eval tasks"):
        run_tasks(_model(), ByteTokenizer(), ["no_such_task"], include_path=_tasks(tmp_path), include_defaults=False)
