"""Where a 1.3B int8 decoding step's time goes, from Python: the whole step, the 24 one-call layer
kernels inside it, and the streaming read rate measured just before (as ``retnet bench
cpu_inference`` measures its floor), in rounds, so that a shared VM's changing memory speed shows
beside each.

    python scripts/decode_layer_times.py [ROUNDS]

Prints, per round: the read rate, the median step and the median sum of its layer calls (ms), the
fastest and slowest layer call, and the rate at which the layers move their weights and state.
Random weights (no download); needs ~3 GB of memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch

import yet_another_retnet.models.quantized as quantized
from yet_another_retnet.bench import cpu_inference
from yet_another_retnet.models import RetNet
from yet_another_retnet.models.retnet import RetNetState


def main(rounds: int) -> None:
    torch.manual_seed(0)
    model = quantized.quantize_model(RetNet(cpu_inference.model_config(False), dtype=torch.bfloat16), "int8").float()
    # What one layer call moves: its weights (int8 and their scales) and its state, in and out.
    first = model.decoder.layers[0]
    layer_bytes = (sum(t.numel() * t.element_size() for t in first.state_dict().values())
                   + cpu_inference.state_bytes(model) / model.config.num_layers)
    calls: list[float] = []
    step_of_layer = quantized.decoder_layer_step

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = step_of_layer(*args, **kwargs)
        calls.append(time.perf_counter() - t0)
        return out

    quantized.decoder_layer_step = timed
    memories = [torch.randn_like(m) * 0.01 for m in model.empty_state(1).memories]
    state = RetNetState(memories, torch.tensor([2048]))
    token = torch.tensor([1])
    with torch.inference_mode():
        model.step_(token, state)  # the plan and the kernels built
        for _ in range(rounds):
            bandwidth = cpu_inference.read_bandwidth(1 << 30)
            steps, sums, layers = [], [], []
            for _ in range(20):
                calls.clear()
                t0 = time.perf_counter()
                model.step_(token, state)
                steps.append(time.perf_counter() - t0)
                sums.append(sum(calls))
                layers += calls
            median_layer = statistics.median(layers)
            print(f"read {bandwidth / 1e9:5.1f} GB/s | step {statistics.median(steps) * 1e3:6.2f} ms | layers "
                  f"{statistics.median(sums) * 1e3:6.2f} ms (each {min(layers) * 1e3:.3f}-{max(layers) * 1e3:.3f}, "
                  f"median {median_layer * 1e3:.3f}: {layer_bytes / median_layer / 1e9:.1f} GB/s)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
