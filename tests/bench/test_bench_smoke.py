"""Smoke tests of the benchmarks' --quick paths: they run, write JSON/Markdown/PNG, and the numbers
they write are consistent with what the models are (sizes of states and caches, parameter counts).

Timings are not asserted here: speed targets live in the benchmark reports, not in unit tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from yet_another_retnet import RetNet
from yet_another_retnet.bench import common, inference, quality, training


def _has_matplotlib() -> bool:
    return common.pyplot() is not None


# --------------------------------------------------------------------------------------------
# common
# --------------------------------------------------------------------------------------------


def test_positive_ints_parses_and_rejects() -> None:
    assert common.positive_ints("512, 1024,2048") == [512, 1024, 2048]
    import argparse

    for bad in ("", "0,1", "a,b", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            common.positive_ints(bad)


def test_resolve_device_and_dtype_reject_bad_values() -> None:
    assert common.resolve_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        common.resolve_dtype("float8")
    with pytest.raises(ValueError, match="device"):
        common.resolve_device("mps" if not torch.backends.mps.is_available() else "xla")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            common.resolve_device("cuda")


def test_matched_llama_ffn_equalises_parameters() -> None:
    pytest.importorskip("transformers")
    for preset in ("tiny", "small"):
        config = common.retnet_config(preset)
        llama = common.build_llama(config, torch.device("cpu"), torch.float32)
        ours = RetNet(config).num_parameters()
        theirs = common.num_parameters(llama)
        assert abs(ours - theirs) / ours < 0.01, (preset, ours, theirs)


def test_markdown_table_and_fmt() -> None:
    table = common.markdown_table([{"a": 1234567, "b": 0.000123456, "c": None}],
                                  [("a", "A"), ("b", "B"), ("c", "C")])
    assert table.splitlines()[0] == "| A | B | C |"
    assert "1,234,567" in table and "0.000123" in table and "–" in table
    assert common.fmt(float("nan")) == "–"


def test_peak_rss_is_at_least_current_rss() -> None:
    assert common.peak_rss() >= common.current_rss() - 2**20 > 10 * 2**20


# --------------------------------------------------------------------------------------------
# inference
# --------------------------------------------------------------------------------------------


def _run_inference(tmp_path: Path, models: str) -> dict:
    out = tmp_path / "inference"
    rc = inference.main(["--quick", "--threads", "1", "--contexts", "64,256", "--batch-sizes", "1,2",
                         "--batch-context", "128", "--steps", "4", "--warmup-steps", "1",
                         "--models", models, "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "inference.json").read_text())
    assert (out / "inference.md").read_text().startswith("# Inference benchmark")
    if _has_matplotlib():
        for name in ("inference_vs_context.png", "inference_vs_batch.png"):
            assert (out / name).stat().st_size > 1000
    return data


def test_inference_quick_retnet_only(tmp_path: Path) -> None:
    data = _run_inference(tmp_path, "retnet")
    rows = data["results"]
    # (64,1), (256,1), (128,1), (128,2): four configurations, all measured.
    assert [(r["context"], r["batch"]) for r in rows] == [(64, 1), (256, 1), (128, 1), (128, 2)]
    config = common.retnet_config("tiny")
    for r in rows:
        assert "error" not in r
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0
        assert math.isclose(r["decode_tokens_per_s"], r["batch"] * 1e3 / r["decode_ms_per_token"])
        # The state: one (batch, heads, dk, dv) float32 memory per layer, plus positions.
        expected = (config.num_layers * r["batch"] * config.num_heads * config.key_head_dim
                    * config.value_head_dim * 4 + r["batch"] * 8)
        assert r["cache_bytes"] == expected
        # Linux syncs its RSS counters lazily (per-thread caches of up to ~64 pages): allow 1 MiB.
        assert r["peak_bytes"] >= r["rss_ready_bytes"] - 2**20 > 0
    assert data["claims"]["retnet_state_flat"]["holds"] is True
    assert data["machine"]["torch"] == torch.__version__


def test_inference_quick_against_transformer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    data = _run_inference(tmp_path, "retnet,transformer")
    config = common.retnet_config("tiny")
    by = {(r["model"], r["context"], r["batch"]): r for r in data["results"]}
    for (model, context, batch), r in by.items():
        assert "error" not in r, r
        if model == "transformer":
            # The real (static) KV cache: keys and values, every layer, every slot: the context
            # plus the 1 + 4 decode steps it was allocated for.
            slots = context + 1 + 4 + 1
            assert r["cache_bytes"] == 2 * config.num_layers * batch * slots * config.d_model * 4
    # The comparison rows pair the two models on every configuration.
    assert len(data["comparisons"]) == 4
    row = next(c for c in data["comparisons"] if c["context"] == 256)
    assert math.isclose(row["speedup"], row["transformer_ms"] / row["retnet_ms"])
    assert data["setup"]["parameters"]["transformer"] == pytest.approx(
        data["setup"]["parameters"]["retnet"], rel=0.01)


def test_inference_rounds_repeat_the_retnet_sweep_and_keep_medians(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    # ms/step in call order: round 1 (64, 256, then the batch sweep's (128, 1) and (128, 2)), then
    # 256 and 64 (round 2, rotated), then 64 and 256 (round 3)
    speeds = iter([1.0, 5.0, 9.0, 2.0, 3.0, 7.0, 4.0, 8.0])

    def fake_measure(job: dict) -> dict:
        calls.append((job["model"], job["context"], job["batch"]))
        ms = next(speeds)
        return {"model": job["model"], "context": job["context"], "batch": job["batch"], "prefill_s": 0.1,
                "decode_ms_per_token": ms, "decode_tokens_per_s": job["batch"] * 1e3 / ms,
                "decode_cpu_ms_per_token": ms, "peak_bytes": 2**20, "rss_ready_bytes": 2**20,
                "decode_memory_bytes": 2**20, "cache_bytes": 8, "weights_bytes": 8, "parameters": 2}

    monkeypatch.setattr(inference, "measure", fake_measure)
    monkeypatch.setattr(inference, "_plot", lambda *args: [])
    out = tmp_path / "rounds"
    assert inference.main(["--quick", "--contexts", "64,256", "--batch-sizes", "1,2", "--batch-context", "128",
                           "--models", "retnet", "--rounds", "3", "--out", str(out)]) == 0
    # Round 1: every configuration once; then the batch-1 sweep twice more, the order rotating.
    assert calls == [("retnet", 64, 1), ("retnet", 256, 1), ("retnet", 128, 1), ("retnet", 128, 2),
                     ("retnet", 256, 1), ("retnet", 64, 1), ("retnet", 64, 1), ("retnet", 256, 1)]
    rows = {(r["context"], r["batch"]): r for r in json.loads((out / "inference.json").read_text())["results"]}
    # 64: runs 1.0, 7.0, 4.0 -> 4.0; 256: 5.0, 3.0, 8.0 -> 5.0; the batch sweep is measured once.
    assert rows[(64, 1)]["decode_ms_per_token"] == 4.0 and rows[(64, 1)]["decode_ms_per_round"] == [1.0, 7.0, 4.0]
    assert rows[(256, 1)]["decode_ms_per_token"] == 5.0
    assert rows[(128, 2)]["decode_ms_per_token"] == 2.0 and "decode_ms_per_round" not in rows[(128, 2)]
    assert rows[(128, 1)]["decode_ms_per_token"] == 9.0
    assert inference.median_run([{"decode_ms_per_token": 2.0}, {"error": "x"}, {"decode_ms_per_token": 1.0}]) == {
        "decode_ms_per_token": 1.0, "decode_ms_per_round": [2.0, 1.0]}
    with pytest.raises(ValueError, match="rounds"):
        inference.main(["--quick", "--rounds", "0", "--out", str(out)])


def test_inference_dynamic_cache_holds_exactly_the_context(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "dynamic"
    assert inference.main(["--quick", "--threads", "1", "--contexts", "96", "--batch-sizes", "3",
                           "--batch-context", "96", "--steps", "2", "--warmup-steps", "0",
                           "--models", "transformer", "--kv-cache", "dynamic", "--out", str(out)]) == 0
    config = common.retnet_config("tiny")
    rows = json.loads((out / "inference.json").read_text())["results"]
    assert [(r["context"], r["batch"]) for r in rows] == [(96, 1), (96, 3)]
    for r in rows:
        assert r["cache_bytes"] == 2 * config.num_layers * r["batch"] * 96 * config.d_model * 4


def test_inference_rejects_bad_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--models"):
        inference.main(["--quick", "--models", "mamba", "--out", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def test_training_quick(tmp_path: Path) -> None:
    models = "retnet-parallel,retnet-chunkwise" + (",transformer" if common.has_transformers() else "")
    out = tmp_path / "training"
    rc = training.main(["--quick", "--threads", "1", "--lengths", "128,512", "--chunk-size", "64",
                        "--max-parallel-length", "256", "--models", models, "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "training.json").read_text())
    rows = {(r["model"], r["length"]): r for r in data["results"]}
    assert "skipped" in rows[("retnet-parallel", 512)]["error"]
    for key in (("retnet-parallel", 128), ("retnet-chunkwise", 128), ("retnet-chunkwise", 512)):
        r = rows[key]
        assert r["tokens_per_s"] == pytest.approx(r["length"] / r["step_s"])
        assert r["parameters"] == RetNet(common.retnet_config("tiny")).num_parameters()
    claim = data["claims"]["chunkwise_throughput_kept"]
    assert (claim["from_length"], claim["to_length"]) == (128, 512)
    assert (out / "training.md").exists()
    if _has_matplotlib():
        assert (out / "training.png").stat().st_size > 1000


# --------------------------------------------------------------------------------------------
# quality
# --------------------------------------------------------------------------------------------


def test_quality_helpers() -> None:
    assert quality.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert quality.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert quality.lr_at(100, 100, 10, 1.0) == pytest.approx(0.1)
    train = torch.arange(1000)
    a = quality.batches(train, 3, 2, 16, seed=0)
    b = quality.batches(train, 3, 2, 16, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # Each row is a contiguous window of the data.
    assert torch.equal(a[0][0], torch.arange(int(a[0][0, 0]), int(a[0][0, 0]) + 16))
    assert quality.eval_windows(torch.arange(100), 16, 64).shape == (4, 16)


def test_quality_quick_learns(tmp_path: Path) -> None:
    models = "retnet,transformer" if common.has_transformers() else "retnet"
    out = tmp_path / "quality"
    rc = quality.main(["--quick", "--threads", "1", "--models", models, "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "quality.json").read_text())
    for run in data["runs"]:
        curve = run["curve"]
        # 12 steps from random init: validation loss falls well below log(256) = 5.55 nats.
        assert curve[-1]["val_loss"] < curve[0]["val_loss"] < math.log(256) + 0.5
        assert run["final_bits_per_byte"] == pytest.approx(run["final_val_loss"] / math.log(2))
    if common.has_transformers():
        assert data["claims"]["parameter_ratio"] == pytest.approx(1.0, abs=0.01)
    assert (out / "quality.md").exists()


def test_inference_state_check_reads_the_live_state_and_can_fail() -> None:
    """The "state flat" claim compares the state each decoding stream really holds: a stream's
    state read after decoding equals the model's own state after the same tokens, and results whose
    states differ fail the claim."""
    from yet_another_retnet.models.retnet import RetNet

    model = RetNet(common.retnet_config("tiny")).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 40))
    stream = model.stream_generate(prompt, max_new_tokens=4)
    tokens = [next(stream) for _ in range(3)]
    with torch.no_grad():
        state = model(torch.cat([prompt, torch.stack(tokens[:2], 1)], 1)).state
    assert inference._live_state_bytes(stream) == state.nbytes() > 0
    rows = [{"model": "retnet", "context": c, "batch": 1, "decode_ms_per_token": 1.0, "cache_bytes": b,
             "decode_memory_bytes": 1, "peak_bytes": 1} for c, b in ((64, 100), (128, 100), (256, 200))]
    assert inference.check_claims(rows[:2], [64, 128], 128, [1])["retnet_state_flat"]["holds"] is True
    assert inference.check_claims(rows, [64, 128, 256], 128, [1])["retnet_state_flat"]["holds"] is False
