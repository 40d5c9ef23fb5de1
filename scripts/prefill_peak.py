"""Peak resident memory of one prompt prefill beyond the weights, in a fresh process.

    python scripts/prefill_peak.py LENGTH [LAYERS]                 # d 768 (the base preset), vocab 32000
    python scripts/prefill_peak.py LENGTH --preset 1.3b            # d 2048, 24 layers (fla's 1.3B shape)

Builds the model (random weights), runs a short warm-up prefill, releases the freed heap, resets
the process's high-water mark (Linux ``/proc/self/clear_refs``), prefills ``LENGTH`` tokens at
batch 1 and prints one JSON line: the peak resident set above the resident set before the
prefill, and tokens/s. Run one process per length: the high-water mark is per process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

import torch

from yet_another_retnet.bench.common import retnet_config
from yet_another_retnet.models import RetNet


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("length", type=int, help="prompt tokens")
    p.add_argument("layers", type=int, nargs="?", default=None, help="override the preset's layer count")
    p.add_argument("--preset", default="base", help="model shape (default: base)")
    args = p.parse_args()
    length = args.length
    overrides = {} if args.layers is None else {"num_layers": args.layers}
    torch.manual_seed(0)
    model = RetNet(retnet_config(args.preset, vocab_size=32000, **overrides)).eval()
    layers = model.config.num_layers
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
