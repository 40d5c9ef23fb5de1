"""Import the weights of yet-another-retnet 0.5.1's ``RetNet`` (the PyPI release before ours).

What 0.5.1 computes, read from its source at the ``0.5.1`` tag (``yet_another_retnet/retnet.py``,
``retention.py``), and the configuration that reproduces it here:

- decay ``gamma = 1 - exp(linspace(log 1/32, log 1/512, heads))``: ``decay="log-spaced"``;
- values as wide as the model (``v_proj`` is ``d x d``): ``value_factor=1``;
- biases on every projection, both FFN layers and the LayerNorms: ``bias=True``;
- per-head GroupNorm without affine at eps 1e-6 whatever ``layer_norm_eps`` is: our group norm
  with weight 1 and bias 0, ``head_norm_eps=1e-6``;
- one ``activation`` (swish by default) for the FFN and the gate: ``activation`` and
  ``gate_activation``; a two-matrix FFN: ``ffn="mlp"``;
- ``norm_first=True``: ``x + f(norm(x))``, as ours, but no final norm: ``final_norm=False``;
  ``norm_first=False``: ``x + norm(f(x))``: ``pre_norm=False, post_norm_style="branch"``;
- no embedding scale; an output ``Linear`` with a bias, not tied: ``tie_embeddings=False,
  lm_head_bias=True``;
- q and k rotated with ``theta = 1 / 10000 ** linspace(0, 1, dk / 2)`` per (even, odd) pair at
  the 0-based position (``ops/position.py``, the same), keys scaled by ``dk ** -0.5``.

State-dict keys: ``embedding`` / ``out`` / ``decoder.layers.i.{norm1, norm2, linear1, linear2,
retention.*}``; each layer also stores its rotation frequencies as ``retention.thetas``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..ops.position import rotation_frequencies
from .config import RetNetConfig

if TYPE_CHECKING:
    from .retnet import RetNet

#: 0.5.1's per-head GroupNorm epsilon (its RetNet never changes it).
GROUP_NORM_EPS = 1e-6
ACTIVATIONS_051 = ("swish", "gelu", "relu")

#: 0.5.1 layer key (after ``decoder.layers.i.``) -> ours (after ``decoder.layers.i.``).
_LAYER_KEYS = {
    "norm1.weight": "retention_norm.weight",
    "norm1.bias": "retention_norm.bias",
    "norm2.weight": "ffn_norm.weight",
    "norm2.bias": "ffn_norm.bias",
    "linear1.weight": "ffn.fc1.weight",
    "linear1.bias": "ffn.fc1.bias",
    "linear2.weight": "ffn.fc2.weight",
    "linear2.bias": "ffn.fc2.bias",
    **{f"retention.{p}.{w}": f"retention.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj")
       for w in ("weight", "bias")},
}


def config_from_yar051(
    num_tokens: int,
    d_model: int = 512,
    nhead: int = 8,
    num_layers: int = 6,
    dropout: float = 0.1,
    activation: str = "swish",
    dim_feedforward: int = 2048,
    norm_first: bool = True,
    layer_norm_eps: float = 1e-6,
) -> RetNetConfig:
    """Our :class:`RetNetConfig` for 0.5.1's ``RetNet(num_tokens, d_model, nhead, ...)`` (its
    arguments and defaults). Raises ``ValueError`` naming the argument that is wrong."""
    if activation not in ACTIVATIONS_051:
        raise ValueError(f"activation must be one of {ACTIVATIONS_051}, got {activation!r}")
    if not isinstance(norm_first, bool):
        raise ValueError(f"norm_first must be a bool, got {norm_first!r}")
    names = {"vocab_size": "num_tokens", "d_model": "d_model", "num_heads": "nhead", "num_layers": "num_layers",
             "ffn_dim": "dim_feedforward", "norm_eps": "layer_norm_eps", "dropout": "dropout"}
    try:
        return RetNetConfig(
            vocab_size=num_tokens, d_model=d_model, num_heads=nhead, num_layers=num_layers,
            ffn_dim=dim_feedforward, value_factor=1.0, dropout=dropout, activation_dropout=dropout,
            ffn="mlp", activation=activation, gate_activation=activation, block_norm="layernorm",
            head_norm="groupnorm", norm_eps=layer_norm_eps, bias=True, tie_embeddings=False,
            decay="log-spaced", pre_norm=norm_first, relative_position=True,
            final_norm=False, post_norm_style="residual" if norm_first else "branch",
            head_norm_eps=GROUP_NORM_EPS, lm_head_bias=True,
        )
    except ValueError as err:  # name 0.5.1's argument, not our field
        message = str(err)
        for ours, theirs in names.items():
            if message.startswith(ours + " ") or f"({ours})" in message:
                message = message.replace(ours, theirs)
        raise ValueError(message) from None


def layer_to_ours(weights: Mapping[str, Tensor], prefix: str, key_dim: int) -> dict[str, Tensor]:
    """One 0.5.1 decoder layer's weights under ``prefix`` -> ours (no prefix).

    Checks its ``retention.thetas`` (if present) against our rotation frequencies and fills the
    head norm's weight and bias with 1 and 0 (0.5.1's GroupNorm has no affine).
    """
    out = {ours: weights[prefix + theirs] for theirs, ours in _LAYER_KEYS.items() if prefix + theirs in weights}
    thetas = weights.get(prefix + "retention.thetas")
    if thetas is not None:
        check_thetas(thetas, key_dim, prefix + "retention.thetas")
    value = out.get("retention.v_proj.weight")
    if value is not None:
        out["retention.norm_weight"] = torch.ones(value.shape[0], dtype=value.dtype, device=value.device)
        out["retention.norm_bias"] = torch.zeros(value.shape[0], dtype=value.dtype, device=value.device)
    return out


def yar051_thetas(key_dim: int, like: Tensor) -> Tensor:
    """0.5.1's ``retention.thetas`` buffer ``(key_dim,)``: our rotation frequencies, in ``like``'s
    dtype and device."""
    return rotation_frequencies(key_dim).to(dtype=like.dtype, device=like.device)


def check_thetas(thetas: object, key_dim: int, name: str) -> None:
    """``ValueError`` unless ``thetas`` is 0.5.1's rotation for head dim ``key_dim``: the only
    rotation this model computes."""
    expected = rotation_frequencies(key_dim)
    if (not isinstance(thetas, Tensor) or thetas.shape != expected.shape
            or not torch.allclose(thetas.double().cpu(), expected, rtol=1e-5, atol=1e-7)):
        raise ValueError(f"{name} is not 0.5.1's rotation for head dim {key_dim}")


def layer_to_yar051(weights: Mapping[str, Tensor], prefix: str, key_dim: int) -> dict[str, Tensor]:
    """The inverse of :func:`layer_to_ours`: our layer's weights under ``prefix`` -> 0.5.1's keys
    (no prefix), with ``retention.thetas`` added. The head norm must be the identity affine."""
    ours_to_theirs = {ours: theirs for theirs, ours in _LAYER_KEYS.items()}
    out = {ours_to_theirs[k[len(prefix):]]: t for k, t in weights.items()
           if k.startswith(prefix) and k[len(prefix):] in ours_to_theirs}
    weight, bias = weights.get(prefix + "retention.norm_weight"), weights.get(prefix + "retention.norm_bias")
    if weight is not None and bias is not None and not (bool((weight == 1).all()) and bool((bias == 0).all())):
        raise ValueError(f"{prefix}retention.norm_weight/norm_bias are not 1/0: 0.5.1's head norm has no affine")
    like = out["retention.q_proj.weight"]
    out["retention.thetas"] = yar051_thetas(key_dim, like)
    return out


def yar051_to_ours(weights: Mapping[str, Tensor], config: RetNetConfig) -> dict[str, Tensor]:
    """A 0.5.1 ``RetNet`` state dict -> our ``RetNet``'s, for ``config`` (from
    :func:`config_from_yar051`). Raises ``ValueError`` listing missing and unexpected keys."""
    expected = {"embedding.weight", "out.weight", "out.bias"}
    for i in range(config.num_layers):
        expected |= {f"decoder.layers.{i}.{k}" for k in _LAYER_KEYS}
    optional = {f"decoder.layers.{i}.retention.thetas" for i in range(config.num_layers)}
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected - optional)
    if missing or unexpected:
        raise ValueError(f"state_dict is not a yet-another-retnet 0.5.1 RetNet with {config.num_layers} layers: "
                         f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    ours = {"embed_tokens.weight": weights["embedding.weight"], "lm_head.weight": weights["out.weight"],
            "lm_head.bias": weights["out.bias"]}
    for i in range(config.num_layers):
        layer = layer_to_ours(weights, f"decoder.layers.{i}.", config.key_head_dim)
        ours.update({f"decoder.layers.{i}.{k}": t for k, t in layer.items()})
    return ours


def ours_to_yar051(weights: Mapping[str, Tensor], config: RetNetConfig) -> dict[str, Tensor]:
    """The inverse of :func:`yar051_to_ours`: a state dict the 0.5.1 ``RetNet`` loads."""
    out = {"embedding.weight": weights["embed_tokens.weight"], "out.weight": weights["lm_head.weight"],
           "out.bias": weights["lm_head.bias"]}
    for i in range(config.num_layers):
        prefix = f"decoder.layers.{i}."
        out.update({prefix + k: t for k, t in layer_to_yar051(weights, prefix, config.key_head_dim).items()})
    return out


def infer_options(weights: Mapping[str, Tensor], nhead: int | None = None) -> dict[str, int]:
    """0.5.1 ``RetNet`` sizes read off its state dict: ``num_tokens``, ``d_model``, ``num_layers``,
    ``dim_feedforward`` and ``nhead`` (from ``retention.thetas``, whose length is the head dim;
    ``nhead`` must agree when given, and is required where the thetas are missing)."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(weights).__name__}")
    bad = sorted(str(k) for k, t in weights.items() if not isinstance(t, Tensor))
    if bad:
        raise TypeError(f"state_dict values must be tensors: {bad[:10]}")
    embedding = weights.get("embedding.weight")
    if embedding is None or embedding.dim() != 2:
        raise ValueError("state_dict has no 2-D 'embedding.weight': not a yet-another-retnet 0.5.1 RetNet")
    num_tokens, d_model = (int(n) for n in embedding.shape)
    layers = {int(k.split(".")[2]) for k in weights if k.startswith("decoder.layers.") and k.split(".")[2].isdigit()}
    if not layers or layers != set(range(len(layers))):
        raise ValueError(f"state_dict's decoder.layers.* are not numbered 0..n-1: {sorted(layers)[:10]}")
    linear1 = weights.get("decoder.layers.0.linear1.weight")
    if linear1 is None or linear1.dim() != 2:
        raise ValueError("state_dict has no 2-D 'decoder.layers.0.linear1.weight'")
    thetas = weights.get("decoder.layers.0.retention.thetas")
    if thetas is not None:
        if thetas.dim() != 1 or thetas.shape[0] < 1 or d_model % thetas.shape[0]:
            raise ValueError(f"decoder.layers.0.retention.thetas has shape {tuple(thetas.shape)}: "
                             f"not a head dim of d_model {d_model}")
        heads = d_model // int(thetas.shape[0])
        if nhead is not None and nhead != heads:
            raise ValueError(f"nhead={nhead} disagrees with the checkpoint's head dim {thetas.shape[0]} "
                             f"(d_model {d_model} / {thetas.shape[0]} = {heads} heads)")
        nhead = heads
    if nhead is None:
        raise ValueError("nhead is required: the state_dict has no retention.thetas to read it from")
    return {"num_tokens": num_tokens, "d_model": d_model, "nhead": nhead, "num_layers": len(layers),
            "dim_feedforward": int(linear1.shape[0])}


def from_yar051(cls: type[RetNet], state_dict: Mapping[str, Tensor], nhead: int | None = None,
                norm_first: bool = True, activation: str = "swish", layer_norm_eps: float = 1e-6,
                dropout: float = 0.1) -> RetNet:
    """Our :class:`RetNet` in 0.5.1's architecture holding a 0.5.1 ``RetNet.state_dict()``, in
    eval mode, with the dtype and device of ``embedding.weight``.

    The sizes come from the state dict (:func:`infer_options`); ``norm_first``, ``activation``,
    ``layer_norm_eps`` and ``dropout`` are the 0.5.1 arguments the weights cannot show (defaults:
    0.5.1's). A uniform ``"module."`` or ``"model."`` prefix (a wrapper's) is stripped.
    """
    weights = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
    if isinstance(weights, dict):
        for prefix in ("module.", "model."):
            if weights and all(isinstance(k, str) and k.startswith(prefix) for k in weights):
                weights = {k[len(prefix):]: t for k, t in weights.items()}
    options: dict[str, Any] = dict(infer_options(weights, nhead))
    config = config_from_yar051(**options, dropout=dropout, activation=activation, norm_first=norm_first,
                                layer_norm_eps=layer_norm_eps)
    ours = yar051_to_ours(weights, config)
    embedding = weights["embedding.weight"]
    model = cls(config, device=embedding.device, dtype=embedding.dtype)
    own = model.state_dict()
    wrong = sorted(f"{k} {tuple(t.shape)} (expected {tuple(own[k].shape)})"
                   for k, t in ours.items() if t.shape != own[k].shape)
    if wrong:
        raise ValueError(f"state_dict does not match a 0.5.1 RetNet of these sizes: {wrong[:10]}")
    model.load_state_dict(ours, strict=True)
    return model.eval()
