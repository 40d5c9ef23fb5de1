"""``retnet convert --from yar051 SRC OUT``: a yet-another-retnet 0.5.1 checkpoint as our model.

``SRC`` is a 0.5.1 ``RetNet.state_dict()`` saved with ``torch.save`` (read with
``weights_only=True``: tensors only, no code) or as a ``.safetensors`` file; ``OUT`` becomes a
``RetNet.from_pretrained`` directory (``config.json`` + ``model.safetensors``, written
atomically). What the weights cannot show (``norm_first``, ``activation``, ``layer_norm_eps``)
is given by option, with 0.5.1's defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_yar051_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``retnet convert --from yar051`` (what 0.5.1's weights cannot show)."""
    from ..models.yar051 import ACTIVATIONS_051

    g = p.add_argument_group("--from yar051")
    g.add_argument("--nhead", type=int, default=None, help="heads (read from the checkpoint when it has thetas)")
    g.add_argument("--post-norm", action="store_true", help="the model was built with norm_first=False")
    g.add_argument("--activation", default="swish", choices=ACTIVATIONS_051, help="its activation")
    g.add_argument("--layer-norm-eps", type=float, default=1e-6, help="its layer_norm_eps")
    g.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")


def load_state_dict(path: str | Path) -> dict[str, Any]:
    """Tensors from ``path``: safetensors by suffix, else ``torch.load(weights_only=True)`` (a
    Lightning-style ``{"state_dict": ...}`` is unwrapped)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SRC: no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as err:
            raise ValueError(f"SRC: {path} is not a readable safetensors file: {err}") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code, truncated files: one line, nothing written
        raise ValueError(f"SRC: {path} is not a tensor state dict that torch.load(weights_only=True) "
                         f"reads: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"SRC: {path} holds a {type(data).__name__}, not a state dict")
    return data


def run(args: argparse.Namespace) -> int:
    from ..models import RetNet

    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise ValueError(f"OUT: {out} already holds a model (pass --overwrite to replace it)")
    weights = load_state_dict(args.src)
    model = RetNet.from_yar051(weights, nhead=args.nhead, norm_first=not args.post_norm,
                               activation=args.activation, layer_norm_eps=args.layer_norm_eps)
    model.save_pretrained(out)
    c = model.config
    print(f"converted {args.src} (yet-another-retnet 0.5.1) -> {out}: {model.num_parameters():,} parameters, "
          f"d_model {c.d_model}, {c.num_heads} heads, {c.num_layers} layers, vocab {c.vocab_size}")
    return 0
