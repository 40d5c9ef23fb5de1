"""The GPU benchmark's code paths at toy sizes on CPU (``--quick``): every section runs and writes
its JSON and Markdown. Its GPU numbers come from scripts/gpu-check.sh on a GPU (docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from yet_another_retnet.bench import gpu
from yet_another_retnet.ops import triton as our_triton


@pytest.mark.slow
def test_quick_run_writes_every_section(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # our kernels' row runs in Triton's interpreter
    assert gpu.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["quick"] and result["matmul_flops"] > 0
    rows = {r["impl"]: r for r in result["kernels"]}
    assert rows["ours-torch"]["tokens_per_s"] > 0 and rows["sdpa-flash"]["tokens_per_s"] > 0
    assert "GPU" in rows["fla"]["error"]
    if our_triton.triton_available() and our_triton.interpreter_problem() is None:
        assert rows["ours-triton"].get("tokens_per_s", 0) > 0, rows["ours-triton"]
        assert rows["ours-triton-fused"].get("tokens_per_s", 0) > 0, rows["ours-triton-fused"]
        assert result["kernel_ratios"][0]["vs ours-torch"] > 0
        assert result["kernel_ratios"][0]["vs ours-triton-fused"] > 0
    training = {r["model"]: r for r in result["training"]}
    assert training["retnet"]["tokens_per_s"] > 0 and training["retnet"]["mfu_measured"] > 0
    decode = result["decode_ratios"]
    assert decode and decode[0]["retnet_ms"] > 0
    if importlib.util.find_spec("transformers") is not None:
        assert training["llama"]["tokens_per_s"] > 0 and decode[0]["speedup"] > 0
    text = (tmp_path / "gpu.md").read_text()
    assert "Chunkwise retention forward + backward" in text and "Decoding" in text


def test_full_run_needs_cuda_and_bad_sections_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--sections"):
        gpu.main(["--quick", "--device", "cpu", "--sections", "kernels,nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="CUDA"):
        gpu.main(["--device", "cpu", "--out", str(tmp_path)])
    assert not (tmp_path / "gpu.json").exists()


def test_fla_13b_layer_sizes():
    """fla's retnet-1.3B: 1,351,727,104 parameters (its config: fla-format notes)."""
    from yet_another_retnet.models import count_parameters

    config = gpu.fla_13b_config()
    assert config.d_model // config.num_heads == 256 and config.value_factor == 2.0
    assert count_parameters(config) == pytest.approx(1_351_727_104, rel=2e-3)


def test_a_run_stopped_by_its_time_limit_writes_what_it_measured(tmp_path, monkeypatch):
    """``timeout`` stops a section with SIGTERM: the rows finished by then are written, and the
    report says it stopped (a device session has one try)."""
    import os
    import signal

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as gpu-check.sh's timeout does
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(gpu, "bench_training", stopped)
    with pytest.raises(SystemExit) as stop:
        gpu.main(["--quick", "--device", "cpu", "--sections", "kernels,training", "--out", str(tmp_path)])
    assert stop.value.code == 124
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["stopped"] == "stopped by SIGTERM"
    assert any("tokens_per_s" in r for r in result["kernels"]) and result["kernel_ratios"]
    assert "Stopped" in (tmp_path / "gpu.md").read_text()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
