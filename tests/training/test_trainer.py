"""Training: resume is exact, a kill -9 leaves a usable run, the options do what they say.

Every run here is tiny (a 2-layer d-32 model, sequences of 16-32 tokens, a few steps) so the
file stays within a few tens of seconds on 2 cores.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CPU_FP16, write_corpus
from conftest import TINY_MODEL as TINY
from safetensors.torch import load_file

from yet_another_retnet import RetNet
from yet_another_retnet.cli import main
from yet_another_retnet.training.checkpoint import load_checkpoint
from yet_another_retnet.training.data import (
    ByteTokenizer,
    StreamDecoder,
    WindowSampler,
)
from yet_another_retnet.training.progress import ProgressBar, plot_losses, read_metrics
from yet_another_retnet.training.shards import open_prepared
from yet_another_retnet.training.trainer import TrainConfig, build_optimizer, lr_factor


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~20 KB of real text (the start of the default corpus): more windows than the suite's."""
    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt", 20_000)


def run_train(out: Path, data: Path, *extra: str) -> None:
    rc = main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])
    assert rc == 0


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def train_losses(directory: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(directory) if r["kind"] == "train"]


# --------------------------------------------------------------------------------------------


def test_resume_is_bitwise_identical_to_a_straight_run(tmp_path: Path, corpus_file: Path) -> None:
    # Dropout stays on (0.1) so the restored torch RNG state matters, as does the sampler's.
    args = ["--seq-len", "24", "--batch-size", "4", "--max-steps", "12", "--log-interval", "1",
            "--eval-interval", "4", "--dropout", "0.1", "--seed", "3"]
    run_train(tmp_path / "straight", corpus_file, *args)
    run_train(tmp_path / "split", corpus_file, *args, "--stop-after", "6")
    half = load_checkpoint(tmp_path / "split")
    assert half["step"] == 6
    assert main(["train", "--out", str(tmp_path / "split"), "--resume"]) == 0

    straight, split = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "split")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    assert a["step"] == b["step"] == 12
    for name, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][name]["exp_avg_sq"]), name
    # The 12-step run really differs from the 6-step state (the comparison can fail).
    assert not torch.equal(half["model"]["embed_tokens.weight"], a["model"]["embed_tokens.weight"])


def test_kill_9_leaves_a_loadable_checkpoint_and_resume_finishes(tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "yet_another_retnet", "train", "--data", str(corpus_file), "--out", str(out),
           *TINY, "--seq-len", "16", "--batch-size", "2", "--max-steps", "100000", "--save-interval", "1",
           "--eval-interval", "50", "--eval-max-windows", "2", "--log-interval", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        # Saving happens every step, so a kill lands inside a save most of the time.
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoint.pt").is_file() and load_checkpoint(out)["step"] >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        time.sleep(0.37)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(out)  # whole and readable, whatever moment the kill hit
    step = state["step"]
    assert step >= 3
    model = RetNet.from_pretrained(out)
    assert model.config.d_model == 32
    # Resume with a smaller horizon than the killed run: train two more steps and finish.
    assert main(["train", "--out", str(out), "--resume", "--max-steps", str(step + 2)]) == 0
    assert load_checkpoint(out)["step"] == step + 2
    assert not list(out.glob(".*.tmp"))  # what the kill left half-written is cleared on resume


def test_options_that_must_not_change_the_math(tmp_path: Path, corpus_file: Path) -> None:
    """Gradient checkpointing, chunkwise training and gradient accumulation reproduce the plain
    run's loss curve (dropout 0): they change how, not what, is computed."""
    base = ["--seq-len", "32", "--batch-size", "4", "--max-steps", "4", "--log-interval", "1",
            "--eval-interval", "4", "--dropout", "0", "--eval-max-windows", "2"]
    run_train(tmp_path / "plain", corpus_file, *base)
    run_train(tmp_path / "ckpt", corpus_file, *base, "--grad-checkpointing")
    run_train(tmp_path / "chunk", corpus_file, *base, "--chunk-size", "8")
    run_train(tmp_path / "accum", corpus_file, *base, "--grad-accum", "2")
    plain = train_losses(tmp_path / "plain")
    assert len(plain) == 4 and plain[-1] < plain[0]
    assert train_losses(tmp_path / "ckpt") == pytest.approx(plain, rel=1e-6)
    assert train_losses(tmp_path / "chunk") == pytest.approx(plain, rel=1e-5)
    assert train_losses(tmp_path / "accum") == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
def test_compile_trains_the_same_curve(tmp_path: Path, corpus_file: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # --compile runs each retention layer's chunkwise form through torch.compile: same math.
    # A CPU float32 call keeps the C++ kernels (compile_chunkwise(keep_kernel_calls=True)), so
    # the layer is told they are not built: the compiled run must then go through a graph, and
    # dynamo's frame counter shows that it did (an eager-against-eager run would fail here).
    from torch._dynamo.utils import counters

    import yet_another_retnet.layers.fast as route_module  # the route table (layers/fast.py)

    monkeypatch.setattr(route_module, "load_extension", lambda: False)
    base = ["--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--log-interval", "1",
            "--eval-interval", "3", "--dropout", "0", "--eval-max-windows", "2", "--chunk-size", "8"]
    run_train(tmp_path / "eager", corpus_file, *base)
    compiled_before = counters["frames"]["ok"]
    run_train(tmp_path / "compiled", corpus_file, *base, "--compile")
    assert counters["frames"]["ok"] > compiled_before, "--compile ran no compiled frame"
    eager = train_losses(tmp_path / "eager")
    assert len(eager) == 3 and train_losses(tmp_path / "compiled") == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path: Path, corpus_file: Path, precision: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    if precision == "fp16" and not CPU_FP16:  # torch 2.2: refused by name, before anything is written
        assert main(["train", "--data", str(corpus_file), "--out", str(tmp_path / precision), "--precision", "fp16",
                     "--device", "cpu"]) == 2
        assert "--precision fp16 on cpu needs torch >= 2.3" in capsys.readouterr().err
        assert not (tmp_path / precision).exists()
        return
    run_train(tmp_path / precision, corpus_file, "--seq-len", "16", "--batch-size", "4", "--max-steps", "6",
              "--log-interval", "1", "--eval-interval", "6", "--precision", precision, "--eval-max-windows", "2",
              "--lr", "3e-3")
    losses = train_losses(tmp_path / precision)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    ckpt = load_checkpoint(tmp_path / precision)
    assert (ckpt["scaler"].get("scale") is not None) == (precision == "fp16")


def test_run_directory_contents_and_eval_agree(tmp_path: Path, corpus_file: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    run_train(out, corpus_file, "--seq-len", "16", "--batch-size", "4", "--max-steps", "8", "--log-interval", "2",
              "--eval-interval", "4", "--sample-tokens", "30")
    printed = capsys.readouterr().out
    assert "step 8/8" in printed and "val bits/byte" in printed and "--- sample" in printed
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "checkpoint.pt", "metrics.jsonl",
                 "train_config.json", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A text path is prepared into the run directory: bytes plus the end-of-document id 256.
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"type": "byte", "eod_id": 256}
    records = read_metrics(out)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4, 6, 8]
    # Byte tokens (plus one end-of-document id): bits per byte is the loss in bits per text byte.
    prepared = open_prepared(out / "data")
    bytes_per_token = prepared.split_bytes("val") / len(prepared.val)
    assert 0.99 < bytes_per_token <= 1.0
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) / bytes_per_token)

    # `retnet eval` on the prepared data's validation split scores the same windows: the same loss.
    val = open_prepared(out / "data").val
    assert main(["eval", str(out), "--data", str(out / "data"), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["windows"] == (len(val) - 1) // 16
    assert result["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_hf_tokenizer_run_saves_and_reuses_the_tokenizer(tmp_path: Path, corpus_file: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train([str(corpus_file)], trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_file = tmp_path / "my-tokenizer.json"
    tok.save(str(tok_file))
    out = tmp_path / "run"
    run_train(out, corpus_file, "--tokenizer", str(tok_file), "--seq-len", "16", "--batch-size", "4",
              "--max-steps", "3", "--eval-interval", "3")
    assert (out / "tokenizer.json").is_file()
    assert RetNet.from_pretrained(out).config.vocab_size == tok.get_vocab_size()
    records = [r for r in read_metrics(out) if r["kind"] == "eval"]
    # A BPE token covers several bytes: bits per byte is below the loss in bits.
    assert records[-1]["val_bpb"] < records[-1]["val_loss"] / math.log(2)
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The ", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("The ")


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def test_window_sampler_resumes_the_same_batches() -> None:
    tokens = torch.arange(1000)
    a = WindowSampler(tokens, 16, seed=5)
    first = [a.next_batch(3) for _ in range(2)]
    state = a.state_dict()
    later = [a.next_batch(3) for _ in range(3)]
    b = WindowSampler(tokens, 16, seed=123)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(later, [b.next_batch(3) for _ in range(3)], strict=True))
    batch = first[0]
    assert batch.shape == (3, 17)
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(3, 16, dtype=torch.long))  # contiguous windows
    with pytest.raises(ValueError, match="fewer than one sequence"):
        WindowSampler(torch.arange(10), 16, seed=0)


def test_schedule_warms_up_then_decays_linearly() -> None:
    config = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0)
    assert factors[55] == pytest.approx(1.0 - 0.9 * 45 / 90)
    assert lr_factor(100, config) == pytest.approx(0.1)
    assert all(b <= a for a, b in itertools.pairwise(factors[10:]))


def test_weight_decay_spares_norms_and_embeddings() -> None:
    from yet_another_retnet import RetNetConfig

    model = RetNet(RetNetConfig(d_model=32, num_heads=2, num_layers=1, ffn_dim=64, bias=True))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05), fused_ok=False)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    spared = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "embed_tokens.weight" in spared
    assert all(model.get_parameter(n).dim() >= 2 for n in decayed)
    assert any("norm" in n for n in spared) and any(n.endswith("bias") for n in spared)
    assert any("retention.q_proj" in n or "ffn" in n for n in decayed)
    assert len(decayed) + len(spared) == len(list(model.parameters()))


def test_stream_decoder_never_splits_a_character() -> None:
    text = "naïve café: 3 € — 漢字 🙂"
    tok = ByteTokenizer()
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(b) for b in tok.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # An incomplete character at the end is flushed as a replacement character.
    d2 = StreamDecoder(tok)
    assert "".join(d2.push(b) for b in "é".encode()[:1]) == ""
    assert d2.flush() == "\ufffd"


def test_plot_is_skipped_with_a_note_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "eval", "step": 1, "val_loss": 4.0}]
    assert plot_losses(tmp_path, records) is None and (tmp_path / "loss.png").is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "loss.png").unlink()
    note = plot_losses(tmp_path, records)
    assert note is not None and "matplotlib" in note
    assert not (tmp_path / "loss.png").exists()


def test_progress_bar_redraws_on_a_terminal_and_writes_lines_in_a_log() -> None:
    class Stream(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    log, tty = Stream(False), Stream(True)
    for stream in (log, tty):
        bar = ProgressBar(total=4, log_interval=2, stream=stream)
        for step in range(1, 5):
            bar.update(step, loss=3.0 / step, tokens_per_s=2500.0, lr=1e-3, eta_s=65.0 * (4 - step))
        bar.message("eval line")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("step 2/4 [") and "loss 1.5000" in lines[0] and "2.5k tok/s" in lines[0]
    assert "ETA 2m10s" in lines[0] and lines[1].startswith("step 4/4 [####") and lines[2] == "eval line"
    assert len(lines) == 3
    assert tty.getvalue().count("\r") == 4 and "step 1/4" in tty.getvalue()
