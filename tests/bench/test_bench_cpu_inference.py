"""``retnet bench cpu_inference --quick``: the smoke run writes a consistent report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from yet_another_retnet.cli import main
from yet_another_retnet.models import RetNet, RetNetConfig


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    assert main(["bench", "cpu_inference", "--quick", "--out", str(tmp_path), "--variants", "float32,int8,int4",
                 "--decode-contexts", "64,128", "--prefill-contexts", "64", "--tokens", "2", "--clients", "2",
                 "--serve-tokens", "2"]) == 0
    result = json.loads((tmp_path / "cpu_inference.json").read_text())
    rows = {r["variant"]: r for r in result["decode"] if r["context"] == 64}
    assert set(rows) == {"float32", "int8", "int4"}
    # int8 reads about a quarter of float32's bytes (plus float norms and scales). int4: 0.5625
    # bytes a projection weight (two codes a byte, a float32 scale and low value per 128), the LM
    # head in int8 (one byte a weight, a scale a row), everything else float32.
    model = RetNet(RetNetConfig.from_json(json.dumps(result["config"])), device="meta")
    head = model.lm_head.weight.numel()
    projections = sum(m.weight.numel() for layer in model.decoder.layers for m in layer.modules()
                      if isinstance(m, torch.nn.Linear))
    rest = rows["float32"]["weight_bytes"] / 4 - head - projections
    int4 = projections * 0.5625 + head + model.lm_head.out_features * 4 + rest * 4
    assert 0.2 < rows["int8"]["weight_bytes"] / rows["float32"]["weight_bytes"] < 0.3
    assert abs(rows["int4"]["weight_bytes"] / int4 - 1) < 0.01
    assert all(r["ms_per_token"] > 0 and r["floor_ms"] > 0 for r in result["decode"])
    # The floor moves each layer's float32 state in and out besides the weights.
    state = 2 * 4 * sum(m.numel() for m in model.empty_state(1).memories)
    for r in result["decode"]:
        assert r["state_bytes"] == state
        floor = (r["weight_bytes"] + state) / (r["read_bandwidth_gb_s"] * 1e9)
        assert abs(r["floor_ms"] / 1e3 - floor) < 1e-9 and r["x_floor"] < r["x_weights_floor"]
    # Both contexts timed in one round, their ratio for each variant.
    flat = {f["variant"]: f for f in result["decode_flatness"]}
    assert set(flat) == {"float32", "int8", "int4"}
    for variant, f in flat.items():
        times = {r["context"]: r for r in result["decode"] if r["variant"] == variant}
        assert (f["short"], f["long"]) == (64, 128) and len(f["rounds"]) == len(times[64]["rounds"]) == 1
        ratio = times[128]["rounds"][0]["ms_per_token"] / times[64]["rounds"][0]["ms_per_token"]
        assert abs(f["ratio"] - ratio) < 1e-9
    assert "| int8 | 128 / 64 |" in (tmp_path / "cpu_inference.md").read_text()
    assert result["serve"]["variant"] == "int8" and result["serve"]["many_clients_tokens_per_s"] > 0
    assert "## Decoding, batch 1" in (tmp_path / "cpu_inference.md").read_text()
    # The command as given, in both reports (not a fixed `retnet bench cpu_inference --quick`).
    assert result["command"].startswith("retnet bench cpu_inference --quick --out ")
    assert "--variants float32,int8,int4" in result["command"]
    assert result["command"] in (tmp_path / "cpu_inference.md").read_text()

