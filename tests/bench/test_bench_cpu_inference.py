"""``retnet bench cpu_inference --quick``: the smoke run writes a consistent report."""

from __future__ import annotations

import json
from pathlib import Path

from yet_another_retnet.cli import main
from yet_another_retnet.models import RetNet, RetNetConfig


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    assert main(["bench", "cpu_inference", "--quick", "--out", str(tmp_path), "--variants", "float32,int8,int4",
                 "--decode-contexts", "64", "--prefill-contexts", "64", "--tokens", "2", "--clients", "2",
                 "--serve-tokens", "2"]) == 0
    result = json.loads((tmp_path / "cpu_inference.json").read_text())
    rows = {r["variant"]: r for r in result["decode"]}
    assert set(rows) == {"float32", "int8", "int4"}
    # int8 reads about a quarter of float32's bytes (plus float norms and scales); int4 with groups
    # of 128 about 0.5625 / 4 (two codes a byte, a float32 scale and low value per group).
    assert 0.2 < rows["int8"]["weight_bytes"] / rows["float32"]["weight_bytes"] < 0.3
    assert 0.12 < rows["int4"]["weight_bytes"] / rows["float32"]["weight_bytes"] < 0.16
    assert all(r["ms_per_token"] > 0 and r["floor_ms"] > 0 for r in result["decode"])
    # The floor moves each layer's float32 state in and out besides the weights.
    model = RetNet(RetNetConfig.from_json(json.dumps(result["config"])), device="meta")
    state = 2 * 4 * sum(m.numel() for m in model.empty_state(1).memories)
    for r in result["decode"]:
        assert r["state_bytes"] == state
        floor = (r["weight_bytes"] + state) / (r["read_bandwidth_gb_s"] * 1e9)
        assert abs(r["floor_ms"] / 1e3 - floor) < 1e-9 and r["x_floor"] < r["x_weights_floor"]
    assert result["serve"]["variant"] == "int8" and result["serve"]["many_clients_tokens_per_s"] > 0
    assert "## Decoding, batch 1" in (tmp_path / "cpu_inference.md").read_text()
