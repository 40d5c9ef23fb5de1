"""Loading builds the model once: peak RSS while loading stays near the weights' bytes.

Measured in a fresh subprocess (VmHWM of /proc/self/status), after a warm-up load that pays the
one-time imports, for a ~25M-parameter checkpoint stored in bfloat16 (sharded) and loaded as
float32. A loader that built the model twice (an initialised model, then the loaded weights),
or kept every bfloat16 tensor while casting, would need >= 1.5x the float32 weights and fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from yet_another_retnet import RetNet, RetNetConfig

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from yet_another_retnet import RetNet

    def status(field):
        return int([l for l in open("/proc/self/status") if l.startswith(field + ":")][0].split()[1]) * 1024

    RetNet.from_pretrained(sys.argv[1])  # warm-up: imports and lazily loaded libraries
    before = status("VmRSS")
    model = RetNet.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"extra": status("VmHWM") - before, "weights": weights}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_peak_rss_while_loading_is_about_the_weights(tmp_path: Path) -> None:
    tiny = RetNet(RetNetConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, ffn_dim=32))
    tiny.save_pretrained(tmp_path / "tiny")
    config = RetNetConfig(vocab_size=4096, d_model=768, num_heads=6, num_layers=3, ffn_dim=1536, ffn="glu",
                          activation="swish", block_norm="rmsnorm", head_norm="rmsnorm", head_norm_weight=True,
                          rotation="rope", tie_embeddings=False)
    with torch.device("meta"):
        size = RetNet(config, device="meta").num_parameters()
    torch.manual_seed(0)
    RetNet(config, dtype=torch.bfloat16).save_pretrained(tmp_path / "big", max_shard_size="15MB")
    assert len(list((tmp_path / "big").glob("model-*.safetensors"))) > 2
    runs = {}
    for dtype in ("float32", "bfloat16"):
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "tiny"), str(tmp_path / "big"), dtype],
                              capture_output=True, text=True, check=True, timeout=300)
        runs[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["float32"]["weights"] == 4 * size
    assert runs["float32"]["extra"] <= 1.3 * runs["float32"]["weights"], runs
    assert runs["bfloat16"]["extra"] <= 1.3 * runs["bfloat16"]["weights"], runs
