"""Peak resident memory of one prompt prefill beyond the weights, in a fresh process.

    python scripts/prefill_peak.py LENGTH [LAYERS]      # d 768 (the base preset), vocab 32000

Builds the model (random weights), runs a short warm-up prefill, releases the freed heap, resets
the process's high-water mark (Linux ``/proc/self/clear_refs``), prefills ``LENGTH`` tokens at
batch 1 and prints one JSON line: the peak resident set above the resident set before the
prefill, and tokens/s. Run one process per length: the high-water mark is per process.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time

import torch

from yet_another_retnet.models import RetNet, RetNetConfig


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    length = int(sys.argv[1])
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    torch.manual_seed(0)
    model = RetNet(RetNetConfig.from_preset("base", vocab_size=32000, num_layers=layers)).eval()
    ids = torch.randint(0, 32000, (1, length))
    with torch.inference_mode():
        model.prefill(ids[:, :256])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident set
    before = _kib("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        model.prefill(ids)
    seconds = time.perf_counter() - start
    print(json.dumps({"length": length, "layers": layers, "d_model": model.config.d_model, "vocab": 32000,
                      "peak_beyond_weights_mib": round((_kib("VmHWM") - before) / 1024, 1),
                      "rss_before_mib": round(before / 1024), "tokens_per_s": round(length / seconds, 1)}))


if __name__ == "__main__":
    main()
