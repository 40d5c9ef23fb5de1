"""Benchmark reports name their statistics and do not judge from one round; the peer benchmark
lives outside the package; the old-vs-new comparison's arithmetic."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

from yet_another_retnet.bench import _outside, inference
from yet_another_retnet.cli import main

REPO = Path(__file__).resolve().parents[2]


def _rows(ms: dict[int, float]) -> list[dict[str, object]]:
    return [{"model": "retnet", "context": c, "batch": 1, "decode_ms_per_token": v, "cache_bytes": 100,
             "decode_memory_bytes": 1, "peak_bytes": 1} for c, v in ms.items()]


def test_one_round_makes_timing_claims_inconclusive() -> None:
    # One delayed step on a loaded machine (162 ms among ~0.25 ms ones) decided the claim once.
    rows = _rows({64: 0.25, 128: 162.0})
    one = inference.check_claims(rows, [64, 128], 128, [1], rounds=1)
    change = one["retnet_decode_change"]
    assert change["holds"] is None and change["verdict"] == "inconclusive (one round; rerun without --quick)"
    assert "one round" in change["statistic"] and "median" in change["statistic"]
    assert one["retnet_state_flat"]["holds"] is True  # bytes, not time: judged from one round too
    three = inference.check_claims(rows, [64, 128], 128, [1], rounds=3)["retnet_decode_change"]
    assert three["holds"] is False and three["verdict"] == "does not hold"
    assert "median of 3 interleaved rounds" in three["statistic"]
    flat = inference.check_claims(_rows({64: 0.25, 128: 0.26}), [64, 128], 128, [1], rounds=3)
    assert flat["retnet_decode_change"]["verdict"] == "holds"


def test_decode_latency_is_the_median_step_and_says_so() -> None:
    times = [0.00025] * 7 + [0.162]  # seconds: one step delayed by another process
    summary = inference._decode_summary(times, batch=1)
    assert summary["decode_ms_per_token"] == pytest.approx(0.25)
    assert summary["decode_ms_median_all"] == summary["decode_ms_per_token"]
    assert summary["decode_ms_best_block"] == pytest.approx(0.25)
    slow = inference._decode_summary([0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008], batch=2)
    assert slow["decode_ms_per_token"] == pytest.approx(4.5)  # the median, not the best block (1.5)
    assert slow["decode_ms_best_block"] == pytest.approx(1.5)
    assert slow["decode_tokens_per_s"] == pytest.approx(2e3 / 4.5)


def test_quick_inference_bench_reports_inconclusive(tmp_path: Path) -> None:
    out = tmp_path / "inference"
    assert inference.main(["--quick", "--threads", "1", "--contexts", "64,128", "--batch-sizes", "1",
                           "--batch-context", "64", "--models", "retnet", "--out", str(out)]) == 0
    import json

    data = json.loads((out / "inference.json").read_text())
    assert data["claims"]["retnet_decode_change"]["verdict"].startswith("inconclusive (one round")
    assert data["claims"]["retnet_decode_change"]["holds"] is None


def test_peer_benchmark_is_outside_the_package_and_reachable_from_a_checkout() -> None:
    assert (REPO / "benchmarks" / "peers.py").is_file()
    assert not (REPO / "yet_another_retnet" / "bench" / "peers.py").exists()  # not in the package
    from yet_another_retnet.bench import peers, peers_training

    assert Path(peers.__file__).resolve() == (REPO / "benchmarks" / "peers.py").resolve()
    assert Path(peers_training.__file__).resolve() == (REPO / "benchmarks" / "peers_training.py").resolve()
    assert callable(peers.main) and callable(peers_training.run_training_section)
    # No row re-times another's code: the compiled rows are opt-in.
    assert not any(kind == "ours-compiled" for _, _, kind, _ in peers_training.ROWS)
    assert not any(impl.endswith("-compiled") for impl in peers.DEFAULT_IMPLS)


def test_without_a_checkout_the_peer_benchmark_says_where_it_went(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(_outside, "BENCHMARKS_DIR", tmp_path / "benchmarks")  # as in an installed wheel
    monkeypatch.delitem(sys.modules, "yet_another_retnet.bench.peers", raising=False)
    monkeypatch.delattr(importlib.import_module("yet_another_retnet.bench"), "peers", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"benchmarks/peers\.py"):
        importlib.import_module("yet_another_retnet.bench.peers")
    monkeypatch.delitem(sys.modules, "yet_another_retnet.bench.peers", raising=False)
    assert main(["bench", "peers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not part of the installed package" in err[0] and "source checkout" in err[0]


def _compare_trees():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("compare_trees", REPO / "benchmarks" / "compare_trees.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_trees_rows_median_ratio_and_flags() -> None:
    ct = _compare_trees()
    train = {"row": "training 2x1024 chunkwise 128", "section": "training", "unit": "tokens/s",
             "higher_is_better": True}
    row = ct.summarise(train, [100.0, 300.0, 200.0], [210.0, 190.0, "exit 1: boom"], 0.05)
    assert row["old_median"] == 200.0 and row["new_median"] == 200.0
    assert row["ratio_new_over_old"] == pytest.approx(1.0) and row["outside_tolerance"] is False
    slow = ct.summarise(train, [200.0, 200.0], [180.0, 185.0], 0.05)
    assert slow["ratio_new_over_old"] == pytest.approx(182.5 / 200) and slow["outside_tolerance"] is True
    one_round = ct.summarise(train, [200.0], [100.0], 0.05)  # one sample each: no verdict
    assert one_round["ratio_new_over_old"] == pytest.approx(0.5) and one_round["outside_tolerance"] is None
    missing = ct.summarise(train, [200.0], ["timed out after 9 s"], 0.05)
    assert missing["ratio_new_over_old"] is None and missing["outside_tolerance"] is True
    data = {"old": {"rev": "a", "sha": "0" * 40}, "new": {"rev": "b", "sha": "1" * 40},
            "machine": {"cpu": "x", "cpu_count": 2, "torch": "t", "load_start": 0.0, "load_end": 0.0},
            "command": "c", "elapsed_s": 60.0, "rows": [row, slow, missing],
            "settings": {"rounds": 3, "tokens": 40, "tolerance": 0.05}}
    text = ct.markdown(data)
    assert "median over 3 interleaved rounds" in text
    assert "**outside +-5%** (new slower)" in text and "**no figure**" in text
    assert "2 of 3 rows outside +-5%" in text
    jobs = ct.jobs([(2, 1024), (1, 16384)], [512], bf16=True, sections={"training", "decode"})
    names = [row["row"] for job in jobs for row in job["rows"]]
    assert len(jobs) == 3 + 2 + 1  # a training worker per row (its shapes inside), a decoding one per figure
    assert "training 1x16384 parallel" not in names and "training 2x1024 parallel" in names
    assert "decode bf16 d768 context 512" in names and "decode fp32 small (d256) context 512" in names


def test_peer_targets_from_one_round_are_inconclusive() -> None:
    from yet_another_retnet.bench import peers, peers_training

    decode = [{"impl": "ours", "context": 512, "ms_per_token": 10.0},
              {"impl": "torchscale-0.3.0", "context": 512, "ms_per_token": 12.0}]
    results = {"decode": decode, "prefill": [], "small": [{"impl": "ours", "ms_per_token": 162.0}], "training": None}
    judged = peers.summarise(results, [512], rounds=3)["targets"]
    assert [t["pass"] for t in judged] == [False, False]
    one = peers.summarise(results, [512], rounds=1)
    assert [t["pass"] for t in one["targets"]] == [None, None]
    data = {"results": results, "summary": one, "machine": {}, "command": "x",
            "settings": {"repeats": 1, "rounds": 1, "tokens": 1, "contexts": [512], "prefill_length": 8, "skipped": {}}}
    text = peers.render_markdown(data)
    assert "inconclusive (one round; rerun without --quick)" in text and "FAIL" not in text
    section = {"shapes": ["2x1024"], "matmul_gflops": None, "config": {"rounds": 1}, "rows": [
        {"impl": "yet_another_retnet (ours)", "setting": "chunkwise 128", "tokens_per_s": {"2x1024": 9.0},
         "mfu": {"2x1024": None}, "note": ""},
        {"impl": "torchscale 0.3.0", "setting": "chunkwise 128", "tokens_per_s": {"2x1024": 10.0},
         "mfu": {"2x1024": None}, "note": ""}]}
    text = peers_training.format_training_section(section)
    assert "INCONCLUSIVE (one round" in text and "FAIL" not in text
    section["config"] = {"rounds": 3}
    assert "- FAIL training 2x1024" in peers_training.format_training_section(section)
