"""Side by side in one process, base shape (d 768, 12 layers, vocab 32000), random weights: batch-1
decode ms/token for float32, int8 and int4, and a 16-token prompt's prefill through the quantized
kernels against the previous path (each layer's weights dequantized for the float forward).

    python scripts/quant_speed.py        # prints JSON: two interleaved rounds per figure
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from yet_another_retnet.models import RetNet, RetNetConfig, quantized
from yet_another_retnet.models.quantized import quantize_model


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    base = RetNet(RetNetConfig.from_preset("base", vocab_size=32000)).eval()
    models = {"float32": base, "int8": quantize_model(copy.deepcopy(base), "int8"),
              "int4": quantize_model(copy.deepcopy(base), "int4")}
    ids = torch.randint(0, 32000, (1, 16))
    token = torch.tensor([[5]])
    out: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(2):  # interleaved rounds: the machine is shared
            for name, model in models.items():
                state = model.prefill(ids).state
                out.setdefault(f"decode_ms_{name}", []).append(median_ms(lambda m=model, s=state: m(token, state=s), 15))
                out.setdefault(f"prefill16_ms_{name}", []).append(median_ms(lambda m=model: m.prefill(ids), 5))
                if name != "float32":
                    kernel_path = quantized.short_prompt_prefill
                    quantized.short_prompt_prefill = lambda *args: None  # type: ignore[assignment]
                    try:
                        out.setdefault(f"prefill16_ms_{name}_dequantizing", []).append(
                            median_ms(lambda m=model: m.prefill(ids), 5))
                    finally:
                        quantized.short_prompt_prefill = kernel_path
    print(json.dumps({k: [round(x, 2) for x in v] for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
