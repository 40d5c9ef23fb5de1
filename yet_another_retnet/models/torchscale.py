"""Import the weights of torchscale's ``RetNetDecoder`` (Microsoft's reference RetNet, 0.3.0).

:func:`from_torchscale` builds a :class:`~yet_another_retnet.RetNet` in torchscale's
architecture and loads the decoder's state dict into it. What torchscale does, read from its
source (``torchscale/architecture/retnet.py``, ``component/multiscale_retention.py``), and what
it becomes here:

- embedding ``embed_tokens(ids) * sqrt(d)`` (``1`` with ``no_scale_embedding``, its default),
  then an RMSNorm with ``layernorm_embedding``: ``embed_scale``, ``embedding_norm``;
- block norms are RMSNorms with a weight, eps ``layernorm_eps``: ``block_norm="rmsnorm"``,
  ``norm_eps``; pre-norm when ``decoder_normalize_before`` (forced by ``subln``, its default),
  post-norm without a final norm otherwise (forced by ``deepnorm``): ``pre_norm``;
- residual ``alpha * x + f(x)`` with ``alpha = (2 * layers) ** 0.25`` under DeepNorm:
  ``residual_scale``;
- retention: no biases, ``k`` scaled by ``dk ** -0.5``, q and k rotated with
  ``theta = 1 / 10000 ** linspace(0, 1, dk / 2)`` repeated per (even, odd) pair and
  ``rotate_every_two (a, b) -> (-b, a)`` at the 0-based position (our ``ops/position.py`` is the
  same), decay ``gamma_h = 1 - 2 ** (-5 - h)`` (our ``"eq8"``), swish gate, per-head RMSNorm
  without weight (``head_norm="rmsnorm"``); value width ``decoder_value_embed_dim``:
  ``value_factor = value_dim / d``;
- FFN is a GLU ``fc2(act(fc1 x) * gate x)``, no biases: ``ffn="glu"``;
- LM head ``output_projection``, tied to the embedding with
  ``share_decoder_input_output_embed``: ``tie_embeddings``.

torchscale divides intermediate results by data-dependent factors before its scale-invariant
head RMSNorm; the two models compute the same function when ``layernorm_eps == 0`` and differ
by a small eps-dependent amount otherwise (see ``docs/model.md`` for measurements).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import RetNetConfig

if TYPE_CHECKING:
    from .retnet import RetNet

#: torchscale 0.3.0 ``RetNetConfig`` fields and their defaults.
TORCHSCALE_DEFAULTS: dict[str, Any] = {
    "decoder_embed_dim": 768,
    "decoder_value_embed_dim": 1280,
    "decoder_retention_heads": 3,
    "decoder_ffn_embed_dim": 1280,
    "decoder_layers": 12,
    "decoder_normalize_before": True,
    "activation_fn": "gelu",
    "dropout": 0.0,
    "drop_path_rate": 0.0,
    "activation_dropout": 0.0,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "moe_freq": 0,
    "moe_top1_expert": False,
    "moe_expert_count": 0,
    "moe_gating_use_fp32": True,
    "moe_eval_capacity_token_fraction": 0.25,
    "moe_second_expert_policy": "random",
    "moe_normalize_gate_prob_before_dropping": False,
    "use_xmoe": False,
    "rel_pos_buckets": 0,
    "max_rel_pos": 0,
    "deepnorm": False,
    "subln": True,
    "multiway": False,
    "share_decoder_input_output_embed": False,
    "max_target_positions": 1024,
    "no_output_layer": False,
    "layernorm_eps": 1e-6,
    "chunkwise_recurrent": False,
    "recurrent_chunk_size": 512,
    "vocab_size": -1,
    "checkpoint_activations": False,
    "fsdp": False,
    "ddp_rank": 0,
    "xpos_rel_pos": False,
    "xpos_scale_base": 512,
}

#: Options the RetNet decoder supports only at these values (anything else changes the network
#: in a way this model does not implement), with the reason given in the error.
_UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "moe_freq": (0, "mixture-of-experts layers are not implemented"),
    "use_xmoe": (False, "mixture-of-experts layers are not implemented"),
    "multiway": (False, "multiway (per-modality) projections are not implemented"),
    "drop_path_rate": (0.0, "stochastic depth is not implemented; set it to 0 to import for inference"),
    "no_output_layer": (False, "the model needs an output projection"),
}

# Fields with no effect on the function torchscale's RetNetDecoder computes (the MoE details
# only matter with moe_freq > 0; subln only forces decoder_normalize_before, read directly;
# rel_pos/xpos options belong to its Transformer decoder; the rest are training plumbing).
_IGNORED = frozenset({
    "moe_top1_expert", "moe_expert_count", "moe_gating_use_fp32", "moe_eval_capacity_token_fraction",
    "moe_second_expert_policy", "moe_normalize_gate_prob_before_dropping", "rel_pos_buckets",
    "max_rel_pos", "subln", "max_target_positions", "chunkwise_recurrent", "checkpoint_activations",
    "fsdp", "ddp_rank", "xpos_rel_pos", "xpos_scale_base",
})

_ACTIVATIONS = ("gelu", "swish", "relu")  # what torchscale's GLU accepts


def torchscale_fields(config: object) -> dict[str, Any]:
    """torchscale's config as a dict of all its fields, as its ``RetNetDecoder`` reads them.

    A dict is read like ``torchscale.architecture.config.RetNetConfig(**config)``: defaults
    filled in, then its rules applied (``deepnorm`` turns post-norm on and ``subln`` off;
    ``subln`` turns pre-norm on and ``deepnorm`` off). An object is read as it is.
    """
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(TORCHSCALE_DEFAULTS))
        if unknown:
            raise ValueError(f"config: unknown torchscale RetNetConfig options {unknown}")
        fields = {**TORCHSCALE_DEFAULTS, **config}
        if fields["deepnorm"]:
            fields["decoder_normalize_before"] = False
            fields["subln"] = False
        if fields["subln"]:
            fields["decoder_normalize_before"] = True
            fields["deepnorm"] = False
        return fields
    if not hasattr(config, "decoder_embed_dim"):
        raise TypeError(
            "config must be torchscale's RetNetConfig or a dict of its fields, "
            f"got {type(config).__name__}"
        )
    fields = dict(TORCHSCALE_DEFAULTS)
    for name in TORCHSCALE_DEFAULTS:
        if hasattr(config, name):
            fields[name] = getattr(config, name)
    return fields


def _positive_int(fields: dict[str, Any], name: str) -> int:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    return value


def config_from_torchscale(config: object) -> RetNetConfig:
    """Our :class:`RetNetConfig` for a torchscale ``RetNetConfig`` (object or dict of fields).

    Raises ``ValueError`` naming the option for anything this model cannot reproduce.
    """
    fields = torchscale_fields(config)
    for name, (allowed, why) in _UNSUPPORTED.items():
        if fields[name] != allowed:
            raise ValueError(f"config.{name}={fields[name]!r} is not supported: {why}")
    embed_dim = _positive_int(fields, "decoder_embed_dim")
    value_dim = _positive_int(fields, "decoder_value_embed_dim")
    heads = _positive_int(fields, "decoder_retention_heads")
    layers = _positive_int(fields, "decoder_layers")
    ffn_dim = _positive_int(fields, "decoder_ffn_embed_dim")
    vocab = fields["vocab_size"]
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"config.vocab_size must be a positive int (torchscale's default is -1), got {vocab!r}")
    if embed_dim % heads:
        raise ValueError(
            f"config.decoder_embed_dim ({embed_dim}) must be divisible by decoder_retention_heads ({heads})"
        )
    if value_dim % heads:
        # torchscale's own default (1280 over 3 heads) fails here: its model crashes on it too.
        raise ValueError(
            f"config.decoder_value_embed_dim ({value_dim}) must be divisible by decoder_retention_heads ({heads})"
        )
    if (embed_dim // heads) % 2:
        raise ValueError(
            f"config.decoder_embed_dim / decoder_retention_heads = {embed_dim // heads} must be even (rotation pairs)"
        )
    value_factor = value_dim / embed_dim
    if round(embed_dim * value_factor) != value_dim or embed_dim * value_factor != value_dim:
        raise ValueError(
            f"config.decoder_value_embed_dim ({value_dim}) / decoder_embed_dim ({embed_dim}) is not exact in "
            "floating point; this model stores the value width as a factor"
        )
    activation = fields["activation_fn"]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"config.activation_fn must be one of {_ACTIVATIONS}, got {activation!r}")
    eps = fields["layernorm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"config.layernorm_eps must be a finite number >= 0, got {eps!r}")
    chunk = fields["recurrent_chunk_size"]
    chunk = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 else 512
    return RetNetConfig(
        vocab_size=vocab,
        d_model=embed_dim,
        num_heads=heads,
        num_layers=layers,
        ffn_dim=ffn_dim,
        value_factor=value_factor,
        dropout=float(fields["dropout"]),
        activation_dropout=float(fields["activation_dropout"]),
        ffn="glu",
        activation=activation,
        gate_activation="swish",
        block_norm="rmsnorm",
        head_norm="rmsnorm",
        norm_eps=float(eps),
        bias=False,
        tie_embeddings=bool(fields["share_decoder_input_output_embed"]),
        decay="eq8",
        chunk_size=chunk,
        embed_scale=1.0 if fields["no_scale_embedding"] else math.sqrt(embed_dim),
        embedding_norm=bool(fields["layernorm_embedding"]),
        residual_scale=math.pow(2.0 * layers, 0.25) if fields["deepnorm"] else 1.0,
        pre_norm=bool(fields["decoder_normalize_before"]),
        relative_position=True,
    )


def key_map(config: RetNetConfig) -> dict[str, str]:
    """torchscale state-dict key -> our key, for every weight of a model with ``config``."""
    mapping = {"embed_tokens.weight": "embed_tokens.weight"}
    if not config.tie_embeddings:
        mapping["output_projection.weight"] = "lm_head.weight"
    if config.embedding_norm:
        mapping["layernorm_embedding.weight"] = "embedding_norm.weight"
    if config.pre_norm:
        mapping["layer_norm.weight"] = "decoder.norm.weight"
    for i in range(config.num_layers):
        ts, ours = f"layers.{i}.", f"decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "g_proj", "out_proj"):
            mapping[f"{ts}retention.{proj}.weight"] = f"{ours}retention.{proj}.weight"
        mapping[f"{ts}retention_layer_norm.weight"] = f"{ours}retention_norm.weight"
        mapping[f"{ts}final_layer_norm.weight"] = f"{ours}ffn_norm.weight"
        for fc in ("fc1", "fc2", "gate"):
            mapping[f"{ts}ffn.{fc}.weight"] = f"{ours}ffn.{fc}.weight"
    return mapping


def _expected_buffers(config: RetNetConfig) -> dict[str, Tensor]:
    """torchscale's persistent ``retnet_rel_pos`` buffers for ``config``, in float64."""
    half = config.key_head_dim // 2
    angle = (1.0 / 10000 ** torch.linspace(0, 1, half, dtype=torch.float64)).repeat_interleave(2)
    heads = torch.arange(config.num_heads, dtype=torch.float64)
    return {"retnet_rel_pos.angle": angle, "retnet_rel_pos.decay": torch.log(1 - 2 ** (-5 - heads))}


def from_torchscale(cls: type[RetNet], state_dict: Mapping[str, Tensor], config: object) -> RetNet:
    """A :class:`RetNet` holding torchscale ``RetNetDecoder`` weights, in eval mode.

    Args:
        state_dict: ``RetNetDecoder.state_dict()`` (a uniform ``"decoder."`` prefix, as in a
            wrapping language model, is stripped).
        config: torchscale's ``RetNetConfig`` or a dict of its fields.

    The model gets the dtype and device of ``embed_tokens.weight``. Raises ``ValueError``
    naming the option for an unsupported config, and listing the keys for a state dict that
    does not match the config.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    ours = config_from_torchscale(config)
    weights = dict(state_dict)
    if weights and all(name.startswith("decoder.") for name in weights):
        weights = {name[len("decoder."):]: t for name, t in weights.items()}
    not_tensors = sorted(name for name, t in weights.items() if not isinstance(t, Tensor))
    if not_tensors:
        raise TypeError(f"state_dict values must be tensors: {not_tensors[:10]}")

    mapping = key_map(ours)
    buffers = _expected_buffers(ours)
    optional = set(buffers)
    if ours.tie_embeddings:
        optional.add("output_projection.weight")  # the embedding again, under its second name
    missing = sorted(set(mapping) - set(weights))
    unexpected = sorted(set(weights) - set(mapping) - optional)
    if missing or unexpected:
        raise ValueError(
            f"state_dict does not match the torchscale config: missing keys {missing}, unexpected keys {unexpected}"
        )
    model = cls(ours, device=weights["embed_tokens.weight"].device, dtype=weights["embed_tokens.weight"].dtype)
    own = model.state_dict()
    wrong = sorted(
        f"{ts} {tuple(weights[ts].shape)} (expected {tuple(own[name].shape)})"
        for ts, name in mapping.items() if weights[ts].shape != own[name].shape
    )
    if ours.tie_embeddings and "output_projection.weight" in weights:
        head = weights["output_projection.weight"]
        if head.shape != weights["embed_tokens.weight"].shape or not torch.equal(
            head.to(weights["embed_tokens.weight"]), weights["embed_tokens.weight"]
        ):
            wrong.append("output_projection.weight (differs from embed_tokens.weight but the config ties them)")
    for name, expected in buffers.items():
        if name in weights:
            got = weights[name]
            if got.shape != expected.shape or not torch.allclose(got.double().cpu(), expected, rtol=1e-5, atol=1e-6):
                wrong.append(f"{name} (not torchscale's rotation/decay for this config)")
    if wrong:
        raise ValueError(f"state_dict does not match the torchscale config: {wrong}")
    model.load_state_dict({name: weights[ts] for ts, name in mapping.items()}, strict=False)
    loaded = set(mapping.values())
    left = sorted(n for n in own if n not in loaded and not (ours.tie_embeddings and n == "lm_head.weight"))
    if left:  # a bug in key_map, never the caller's fault
        raise RuntimeError(f"from_torchscale left weights unset: {left}")
    return model.eval()
