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
    assert "--limit must be > 0" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "model"), "--tasks", "tiny_mc", "--data", str(tmp_path)]) == 2
    assert "--data would be ignored" in capsys.readouterr().err


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown lm-eval tasks"):
        run_tasks(_model(), ByteTokenizer(), ["no_such_task"], include_path=_tasks(tmp_path), include_defaults=False)
