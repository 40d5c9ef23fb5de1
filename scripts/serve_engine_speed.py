"""The serving engine's throughput, in one process: 16 clients against one, and prompts read by
the batched step against prompts prefilled (what ``PREFILL_FROM`` in ``serve/engine.py`` rests on).

    python scripts/serve_engine_speed.py [--preset base] [--layers N] [--rounds 3]
                                         [--prompts 8,16,32,64,128] [--tokens 16] [--clients 16]

Builds a model of the preset's shape with a 32,000-token vocabulary and random weights,
quantized to int8, and prints one JSON line per measurement: tokens generated per second (the
clients' tokens over the wall time from the first submission to the last request's end) and the
batched steps taken. ``serve``: prompts of 4 tokens (the serving run of ``retnet bench
cpu_inference``), one client then ``--clients``. ``prompt``: ``--clients`` clients with prompts of
each ``--prompts`` length, all read in the batch (``prefill_from`` past any prompt) then all
prefilled (``prefill_from=0``). Rounds alternate, so a change in the machine's load shows as
spread between rounds rather than as a bias.
"""

from __future__ import annotations

import argparse
import json

import torch

from yet_another_retnet.bench.common import retnet_config
from yet_another_retnet.bench.cpu_inference import serve_throughput
from yet_another_retnet.models import RetNet
from yet_another_retnet.models.quantized import quantize_model


def throughput(model: RetNet, clients: int, prompt: int, tokens: int, **options: int) -> tuple[float, int]:
    """(tokens/s, batched steps): the benchmark's serving measurement."""
    return serve_throughput(model, clients, tokens, prompt, **options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", default="8,16,32,64,128", help="prompt lengths of the prompt runs ('' for none)")
    p.add_argument("--tokens", type=int, default=16, help="sampled tokens per request")
    p.add_argument("--clients", type=int, default=16)
    args = p.parse_args()
    overrides = {} if args.layers is None else {"num_layers": args.layers}
    torch.manual_seed(0)
    model = quantize_model(RetNet(retnet_config(args.preset, vocab_size=32000, **overrides)), "int8").eval()
    lengths = [int(n) for n in args.prompts.split(",") if n.strip()]
    for round_ in range(args.rounds):
        one, steps_one = throughput(model, 1, 4, args.tokens)
        many, steps_many = throughput(model, args.clients, 4, args.tokens)
        print(json.dumps({"round": round_, "run": "serve", "one_client_tokens_per_s": round(one, 2),
                          "many_clients_tokens_per_s": round(many, 2), "ratio": round(many / one, 2),
                          "steps": [steps_one, steps_many]}), flush=True)
        for length in lengths:
            read, steps_read = throughput(model, args.clients, length, args.tokens, prefill_from=1 << 30)
            prefilled, steps_prefilled = throughput(model, args.clients, length, args.tokens, prefill_from=0)
            print(json.dumps({"round": round_, "run": "prompt", "prompt": length,
                              "read_in_batch_tokens_per_s": round(read, 2),
                              "prefilled_tokens_per_s": round(prefilled, 2), "ratio": round(read / prefilled, 2),
                              "steps": [steps_read, steps_prefilled]}), flush=True)


if __name__ == "__main__":
    main()
