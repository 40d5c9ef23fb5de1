"""Measurements quoted in docs/model.md: preset sizes and the torchscale layernorm_eps gap.

Run from the repository root (torchscale 0.3.0 and fairscale installed for the second part):

    python docs/model_measurements.py [--json out.json]

Prints Markdown tables; with ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from typing import Any

import torch

from yet_another_retnet import RetNet, RetNetConfig
from yet_another_retnet.models import count_parameters

NOMINAL = {"1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}


def preset_sizes() -> list[dict[str, Any]]:
    rows = []
    for name, nominal in NOMINAL.items():
        config = RetNetConfig.from_preset(name)
        count = count_parameters(config)
        rows.append({"preset": name, "d_model": config.d_model, "layers": config.num_layers,
                     "heads": config.num_heads, "ffn_dim": config.ffn_dim, "vocab": config.vocab_size,
                     "parameters": count, "vs_nominal": count / nominal - 1})
    return rows


def _import_torchscale() -> Any:
    if "timm.models.layers" not in sys.modules:  # timm wants torchvision; only DropPath uses it
        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
        layers.drop_path = lambda *a, **k: None  # type: ignore[attr-defined]
        models.layers = layers  # type: ignore[attr-defined]
        timm.models = models  # type: ignore[attr-defined]
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.layers": layers})
    from torchscale.architecture import config, retnet

    return config, retnet


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def torchscale_gap(eps: float, length: int = 256, seed: int = 0) -> dict[str, Any]:
    """Our model vs torchscale (float32, as shipped, its default init) at ``layernorm_eps``."""
    ts_config, ts_retnet = _import_torchscale()
    fields = {"decoder_embed_dim": 256, "decoder_value_embed_dim": 512, "decoder_retention_heads": 4,
              "decoder_ffn_embed_dim": 512, "decoder_layers": 4, "vocab_size": 1000, "layernorm_eps": eps,
              "recurrent_chunk_size": 64}
    torch.manual_seed(seed)
    config = ts_config.RetNetConfig(**fields)
    decoder = ts_retnet.RetNetDecoder(config, embed_tokens=torch.nn.Embedding(1000, 256)).eval()
    ids = torch.randint(0, 1000, (2, length), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ts_parallel, _ = decoder(ids)
        # torchscale's own chunkwise form (its option), and its recurrent form fed a token at a
        # time (its multi-token prompt path crashes).
        decoder.chunkwise_recurrent = True
        ts_chunk, _ = decoder(ids)
        decoder.chunkwise_recurrent = False
        state: dict[Any, Any] = {}
        steps = [decoder(ids[:, : t + 1], incremental_state=state)[0] for t in range(length)]
        ts_recurrent = torch.cat(steps, dim=1)
        ours = RetNet.from_torchscale(decoder.state_dict(), config)
        out = {mode: ours(ids, mode=mode, chunk_size=64).logits for mode in ("parallel", "chunkwise", "recurrent")}
    return {
        "layernorm_eps": eps,
        "ours_parallel_vs_torchscale_parallel": rel(out["parallel"], ts_parallel),
        "ours_chunkwise_vs_torchscale_parallel": rel(out["chunkwise"], ts_parallel),
        "ours_recurrent_vs_torchscale_parallel": rel(out["recurrent"], ts_parallel),
        "ours_chunkwise_vs_ours_parallel": rel(out["chunkwise"], out["parallel"]),
        "ours_recurrent_vs_ours_parallel": rel(out["recurrent"], out["parallel"]),
        "torchscale_chunkwise_vs_its_parallel": rel(ts_chunk, ts_parallel),
        "torchscale_recurrent_vs_its_parallel": rel(ts_recurrent, ts_parallel),
        "argmax_agreement_ours_vs_torchscale": float((out["parallel"].argmax(-1) == ts_parallel.argmax(-1)).float().mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {"presets": preset_sizes(), "torch": torch.__version__}
    print("| preset | d_model | layers | heads | FFN | vocab | parameters | vs nominal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["presets"]:
        print(f"| {r['preset']} | {r['d_model']} | {r['layers']} | {r['heads']} | {r['ffn_dim']} | {r['vocab']:,} "
              f"| {r['parameters']:,} | {r['vs_nominal']:+.1%} |")
    try:
        gaps = [torchscale_gap(eps) for eps in (1e-6, 0.0)]
    except ImportError as err:
        print(f"\n(torchscale comparison skipped: {err})")
    else:
        results["torchscale"] = gaps
        print("\nMax |logit difference| / max |logit|, float32, d 256, 4 heads, 4 layers, 2 x 256 tokens:\n")
        keys = [k for k in gaps[0] if k != "layernorm_eps"]
        print("| comparison | " + " | ".join(f"eps={g['layernorm_eps']:g}" for g in gaps) + " |")
        print("|---|" + "---|" * len(gaps))
        for k in keys:
            print(f"| {k} | " + " | ".join(f"{g[k]:.2e}" for g in gaps) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
