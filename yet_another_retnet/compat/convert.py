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
    # None, not 0.5.1's defaults, so that `retnet convert` can tell a given option from an absent one
    # and refuse these options without --from yar051; run() fills in the defaults.
    g.add_argument("--activation", default=None, choices=ACTIVATIONS_051, help="its activation (default: swish)")
    g.add_argument("--layer-norm-eps", type=float, default=None, help="its layer_norm_eps (default: 1e-6)")
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
    """Convert ``args.src`` into the directory ``args.out``, as models/convert.py's ``convert()``
    does: ``OUT`` must be missing or empty (``--overwrite`` replaces it whole), and the model is
    built in a temporary sibling directory renamed into place, so a failure writes nothing and an
    overwrite leaves none of the old directory's files (metrics, tokenizer) beside the new model."""
    import shutil
    import tempfile

    from ..cli_common import UsageError
    from ..models import RetNet

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UsageError(f"OUT: {out} exists and is not an empty directory (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT: {out} is a file, not a directory; --overwrite replaces directories only")
    weights = load_state_dict(args.src)
    model = RetNet.from_yar051(weights, nhead=args.nhead, norm_first=not args.post_norm,
                               activation=args.activation if args.activation is not None else "swish",
                               layer_norm_eps=args.layer_norm_eps if args.layer_norm_eps is not None else 1e-6)
    created = [p for p in out.absolute().parents if not p.exists()]  # removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        model.save_pretrained(tmp)
        if out.exists():  # an empty directory, or one --overwrite replaces: set it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            (old / out.name).rename(out)  # put the previous directory back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for parent in created:  # the parents this run created, deepest first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    c = model.config
    print(f"converted {args.src} (yet-another-retnet 0.5.1) -> {out}: {model.num_parameters():,} parameters, "
          f"d_model {c.d_model}, {c.num_heads} heads, {c.num_layers} layers, vocab {c.vocab_size}")
    return 0

