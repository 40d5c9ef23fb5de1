"""Training under faults: a step that goes non-finite never reaches a checkpoint, metrics.jsonl
stays valid JSON, --stop-after logs what an uninterrupted run logs, each rank's CUDA generator is
restored (or a note says why not), and a resumed run continues its TensorBoard and W&B logs.

Every run is tiny (a 2-layer d-32 model, 16-token sequences, a few steps).
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CPU_FP16, TINY
from safetensors.torch import load_file

from yet_another_retnet.cli import main
from yet_another_retnet.training import trainer
from yet_another_retnet.training.checkpoint import load_checkpoint
from yet_another_retnet.training.progress import read_metrics


def _train(out: Path, corpus: Path, *extra: str) -> int:
    return main(["train", "--data", str(corpus), "--out", str(out), *TINY, *extra])


class _InfGrad(torch.autograd.Function):
    """The identity forward (a finite loss), an infinite gradient backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


def _poison_step(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """The training loss of optimizer step ``at`` (one micro-batch per step) gets inf gradients."""
    calls = {"n": 0}
    real = trainer.lm_loss

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return _InfGrad.apply(loss) if calls["n"] == at else loss  # type: ignore[no-any-return]

    monkeypatch.setattr(trainer, "lm_loss", poisoned)


def _all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def test_inf_gradients_stop_an_fp32_run_before_the_update(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The loss of step 3 is finite but its gradients are not: the run stops at step 3 with a
    clear error (no advice to use fp32 in an fp32 run), and the step-2 checkpoint stays the last."""
    out = tmp_path / "run"
    _poison_step(monkeypatch, at=3)
    capsys.readouterr()
    assert _train(out, corpus_file, "--max-steps", "6", "--save-interval", "1", "--eval-interval", "6") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("retnet: error: the gradient norm became") and "at step 3" in err, err
    assert "fp32" not in err, err
    state = load_checkpoint(out)
    assert state["step"] == 2
    assert _all_finite(state["model"]) and _all_finite(load_file(str(out / "model.safetensors")))


def test_non_finite_weights_are_never_saved(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    real = trainer._optimizer_step

    def corrupting(run: Any, state: Any, data: Any) -> Any:
        result = real(run, state, data)
        if state.step == 3:  # weights gone bad behind a finite loss and gradient norm
            with torch.no_grad():
                next(state.model.parameters()).fill_(math.nan)
        return result

    monkeypatch.setattr(trainer, "_optimizer_step", corrupting)
    capsys.readouterr()
    assert _train(out, corpus_file, "--max-steps", "6", "--save-interval", "1", "--eval-interval", "6") == 2
    err = capsys.readouterr().err
    assert "weights became non-finite at step 3" in err, err
    assert load_checkpoint(out)["step"] == 2
    assert _all_finite(load_file(str(out / "model.safetensors")))


def test_a_non_finite_validation_loss_is_never_saved(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    real = trainer.evaluate
    calls = {"n": 0}

    def second_is_nan(*args: Any, **kwargs: Any) -> float:
        calls["n"] += 1
        return math.nan if calls["n"] == 2 else real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", second_is_nan)
    capsys.readouterr()
    assert _train(out, corpus_file, "--max-steps", "4", "--eval-interval", "2") == 2
    assert "the validation loss became nan at step 4" in capsys.readouterr().err
    assert load_checkpoint(out)["step"] == 2
    assert all(math.isfinite(r["val_loss"]) for r in read_metrics(out) if r["kind"] == "eval")


@pytest.mark.skipif(not CPU_FP16, reason="fp16 on CPU needs torch >= 2.3 (torch.amp.GradScaler)")
def test_metrics_jsonl_stays_valid_json_when_fp16_skips_a_step(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16's scaler skips a step with inf gradients (by design, no error); its gradient norm is
    not finite, and metrics.jsonl says so with null, not with Python's bare Infinity/NaN."""
    out = tmp_path / "run"
    _poison_step(monkeypatch, at=2)
    assert _train(out, corpus_file, "--max-steps", "3", "--eval-interval", "3", "--log-interval", "1",
                  "--precision", "fp16") == 0

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [r["grad_norm"] for r in records if r["kind"] == "train"][1] is None
    assert read_metrics(out) == records


def test_stop_after_logs_what_an_uninterrupted_run_logs(tmp_path: Path, corpus_file: Path) -> None:
    args = ["--max-steps", "8", "--log-interval", "4", "--eval-interval", "8"]
    assert _train(tmp_path / "straight", corpus_file, *args) == 0
    assert _train(tmp_path / "split", corpus_file, *args, "--stop-after", "3") == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume"]) == 0

    def train_records(out: Path) -> list[tuple[Any, ...]]:
        return [(r["step"], r["loss"], r["loss_window_steps"]) for r in read_metrics(out) if r["kind"] == "train"]

    straight = train_records(tmp_path / "straight")
    assert [step for step, _, _ in straight] == [4, 8]
    assert train_records(tmp_path / "split") == straight


def test_each_rank_restores_its_own_cuda_generator_or_is_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked without a GPU: which saved state each rank restores onto its device, and the note
    when the saved states cannot be restored exactly."""
    from yet_another_retnet.training.checkpoint import cuda_rng_states, rng_state, set_rng_state

    restored: list[tuple[int, torch.device]] = []
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cuda_rng_states(torch.device("cpu"), 2) is None  # no collective, nothing saved off CUDA
    saved = rng_state([torch.tensor([10], dtype=torch.uint8), torch.tensor([11], dtype=torch.uint8)])

    cuda1 = torch.device("cuda", 1)
    assert set_rng_state(saved, cuda1, rank=1, world_size=2) is None
    assert restored == [(11, cuda1)]  # rank 1's own state, not rank 0's view of device 1

    note = set_rng_state(saved, torch.device("cuda", 0), rank=0, world_size=1)
    assert note is not None and "2 process(es)" in note and "runs 1" in note and "not bit for bit" in note

    restored.clear()
    note = set_rng_state(rng_state(None), torch.device("cuda", 0))
    assert note is not None and "no CUDA random state" in note and not restored
    assert set_rng_state(saved, torch.device("cpu")) is None and not restored

    # A checkpoint from before per-rank states, written by one process: its device's entry.
    legacy = {**rng_state(None), "cuda": [torch.tensor([20], dtype=torch.uint8), torch.tensor([21], dtype=torch.uint8)]}
    assert set_rng_state(legacy, cuda1) is None and restored == [(21, cuda1)]


def test_a_resumed_run_continues_its_tensorboard_and_wandb_logs(
        tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed after its step-3 checkpoint with step 4 logged: the resumed run purges TensorBoard's
    step 4 before logging it again, and continues the same W&B run."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    inits: list[dict[str, Any]] = []

    class FakeRun:
        def __init__(self, run_id: str) -> None:
            self.id = run_id

        def log(self, values: dict[str, float], step: int) -> None:
            pass

        def finish(self) -> None:
            pass

    def init(**kwargs: Any) -> FakeRun:
        inits.append(kwargs)
        return FakeRun(kwargs.get("id") or f"run-{len(inits)}")

    fake_wandb = types.ModuleType("wandb")
    fake_wandb.init = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    real = trainer.lm_loss
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 5:
            raise FloatingPointError("simulated crash at step 5")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "lm_loss", failing)
    assert _train(out, corpus_file, "--max-steps", "6", "--log-interval", "1", "--save-interval", "3",
                  "--eval-interval", "6", "--log-to", "tensorboard,wandb") == 2
    assert load_checkpoint(out)["step"] == 3
    monkeypatch.setattr(trainer, "lm_loss", real)
    assert main(["train", "--out", str(out), "--resume", "--log-to", "tensorboard,wandb"]) == 0

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert len(inits) == 2 and inits[0]["resume"] is None
    assert inits[1]["id"] == "run-1" and inits[1]["resume"] == "allow"


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(
        tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same vocabulary size under another mapping (two ids swapped) would train on and
    overwrite the run's tokenizer without a word; its file's digest tells them apart."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train([str(corpus_file)], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    first = tmp_path / "a.json"
    tok.save(str(first))
    data = json.loads(first.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    second = tmp_path / "b.json"
    second.write_text(json.dumps(data))
    out = tmp_path / "run"
    # The embedded corpus: its fingerprint is the text's, so only the tokenizer check can see it
    # (prepared data's fingerprint includes the tokenizer file).

    def train(tokenizer: Path, *extra: str) -> int:
        return main(["train", "--out", str(out), *TINY, "--tokenizer", str(tokenizer), "--max-steps", "4", *extra])

    assert train(first, "--stop-after", "2") == 0
    saved = (out / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert train(second, "--resume") == 2
    assert "the tokenizer differs" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == saved
    assert train(first, "--resume") == 0
