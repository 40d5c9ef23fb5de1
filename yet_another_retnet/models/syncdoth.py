"""Import syncdoth/RetNet checkpoints (the Hugging Face-style ``RetNetForCausalLM`` that several of
the smaller RetNets on the Hugging Face Hub were trained with).

The format, read from syncdoth/RetNet's sources at commit ``2634bbf`` (January 2024; the math has
been the same since its RMSNorm rewrite of October 2023):

- ``config.json``: ``model_type: "retnet"`` with torchscale's field names (``decoder_embed_dim``,
  ``decoder_value_embed_dim``, ``decoder_retention_heads``, ``decoder_ffn_embed_dim``,
  ``decoder_layers``, ``decoder_normalize_before``, ``layernorm_embedding``,
  ``no_scale_embedding``, ``deepnorm``, ``subln``, ``layernorm_eps``, ``activation_fn``), plus
  ``tie_word_embeddings``, ``use_lm_decay``, ``use_glu``, ``use_ffn_rms_norm``, ``z_loss_coeff``,
  ``forward_impl``, ``recurrent_chunk_size`` and the usual Hugging Face keys.
- weights (``model.safetensors`` or ``pytorch_model.bin``, each possibly sharded with an index):
  torchscale's ``RetNetDecoder`` names under ``model.`` (``model.embed_tokens.weight``,
  ``model.layers.{i}.retention.q_proj.weight``, ..., ``model.layer_norm.weight``), the head as
  ``lm_head.weight``, and the persistent buffers ``model.retnet_rel_pos.angle`` / ``.decay``.
- the network is torchscale 0.3.0's RetNet (see :mod:`.torchscale`): RMSNorms with a weight,
  a weightless per-head RMSNorm, the xPos-free rotation ``1 / 10000 ** linspace(0, 1, dk / 2)``
  per (even, odd) pair, ``k`` scaled by ``dk ** -0.5``, a swish gate and a bias-free GLU. Its
  parallel form divides each retention row by data-dependent factors (``sqrt`` of the decay row
  sum, then the clamped absolute row sum) before the head RMSNorm, which they cancel up to its
  eps, exactly as torchscale's do. The one addition is ``use_lm_decay``: the decays
  ``1 - exp(linspace(log 1/32, log 1/512, heads))``, our ``decay="log-spaced"``.

What this model cannot express is refused with a ``ValueError`` naming the field:
``use_glu: false`` (a biased FFN with an inner LayerNorm), tensor-parallel ``decay_proj``
weights, and LayerNorm-era checkpoints (biases on the block norms). Training-only settings
(dropout, ``drop_path_rate``, ``z_loss_coeff``, ``initializer_range``) and the choice of form
(``forward_impl``) do not change the function and are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..ops.decay import decay_gammas
from .checkpoint import CONFIG_NAME
from .config import RetNetConfig
from .shards import (
    fill_model,
    load_json,
    read_tensor,
    read_weight_map,
    stored_dtype,
    tensor_shapes,
    tie_and_check,
    weight_files,
)
from .torchscale import config_from_torchscale, key_map

if TYPE_CHECKING:
    from .retnet import RetNet

#: The syncdoth/RetNet commit whose format and math this module follows.
SYNCDOTH_COMMIT = "2634bbf"

#: syncdoth config fields that torchscale's ``RetNetConfig`` reads under the same name.
_SHARED = ("decoder_embed_dim", "decoder_value_embed_dim", "decoder_ffn_embed_dim", "decoder_layers",
           "decoder_retention_heads", "decoder_normalize_before", "layernorm_embedding", "no_scale_embedding",
           "deepnorm", "subln", "layernorm_eps", "activation_fn", "vocab_size", "dropout", "activation_dropout",
           "recurrent_chunk_size")

#: Fields with no effect on the function the model computes in eval mode.
_IGNORED = frozenset({
    "model_type", "forward_impl", "initializer_range", "z_loss_coeff", "drop_path_rate", "output_retentions",
    "use_cache", "is_decoder", "pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id",
    # Hugging Face PretrainedConfig's own keys (bookkeeping, labels, generation defaults).
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "_commit_hash",
    "_attn_implementation", "_attn_implementation_autoset", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_encoder_decoder",
    "chunk_size_feed_forward", "is_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})

#: syncdoth/RetNet's ``RetNetConfig`` defaults for the fields that matter (a config.json written
#: by ``save_pretrained`` holds them all; a hand-written one may not).
_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "activation_fn": "gelu", "dropout": 0.0, "activation_dropout": 0.0,
    "decoder_embed_dim": 768, "decoder_value_embed_dim": 1280, "decoder_ffn_embed_dim": 1280,
    "decoder_layers": 12, "decoder_retention_heads": 3, "decoder_normalize_before": True,
    "layernorm_embedding": False, "no_scale_embedding": True, "recurrent_chunk_size": 512,
    "use_glu": True, "use_lm_decay": False, "deepnorm": False, "subln": True, "use_ffn_rms_norm": False,
    "layernorm_eps": 1e-6, "tie_word_embeddings": False,
}

PT_WEIGHTS = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"


def is_syncdoth_config(data: Mapping[str, Any]) -> bool:
    """Whether a ``config.json`` dict is syncdoth/RetNet's (fla's shares ``model_type: retnet``)."""
    return data.get("model_type") == "retnet" and "decoder_embed_dim" in data


def _flag(fields: Mapping[str, Any], name: str) -> bool:
    value = fields[name]
    if not isinstance(value, bool):
        raise ValueError(f"syncdoth config: {name} must be true or false, got {value!r}")
    return value


def config_from_syncdoth(syncdoth: Mapping[str, Any]) -> RetNetConfig:
    """Our :class:`RetNetConfig` for a syncdoth/RetNet ``config.json`` dict.

    Raises ``ValueError`` naming the field for anything this model cannot express, and for
    fields this reader does not know (a newer or older syncdoth version may mean other math).
    """
    if not isinstance(syncdoth, Mapping):
        raise TypeError(f"syncdoth config must be a dict, got {type(syncdoth).__name__}")
    if syncdoth.get("model_type", "retnet") != "retnet":
        raise ValueError(f"syncdoth config: model_type {syncdoth.get('model_type')!r}, expected 'retnet'")
    known = set(_DEFAULTS) | set(_SHARED) | _IGNORED
    unknown = sorted(set(syncdoth) - known)
    if unknown:
        raise ValueError(f"syncdoth config: unknown fields {unknown} (this reader follows syncdoth/RetNet at "
                         f"commit {SYNCDOTH_COMMIT}; a field it does not know may change the network)")
    fields = {**_DEFAULTS, **syncdoth}
    if not _flag(fields, "use_glu"):
        raise ValueError("syncdoth config: use_glu=false (a biased FFN with an inner LayerNorm) is not supported; "
                         "only the GLU feed-forward is")
    use_lm_decay = _flag(fields, "use_lm_decay")
    ts = {name: fields[name] for name in _SHARED}
    ts["share_decoder_input_output_embed"] = _flag(fields, "tie_word_embeddings")
    for name in ("decoder_normalize_before", "layernorm_embedding", "no_scale_embedding", "deepnorm", "subln"):
        _flag(fields, name)
    for name in ("dropout", "activation_dropout"):
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise ValueError(f"syncdoth config: {name} must be a number in [0, 1), got {value!r}")
    try:
        config = config_from_torchscale(ts)
    except ValueError as err:  # name syncdoth's field where it differs from torchscale's
        raise ValueError(f"syncdoth {str(err).replace('share_decoder_input_output_embed', 'tie_word_embeddings')}") from None
    if use_lm_decay:
        import dataclasses

        config = dataclasses.replace(config, decay="log-spaced")
    return config


def key_plan(config: RetNetConfig) -> dict[str, str]:
    """Our parameter name -> syncdoth's stored name, for every parameter of ``config``'s model."""
    plan = {}
    for ts, ours in key_map(config).items():
        plan[ours] = "lm_head.weight" if ts == "output_projection.weight" else f"model.{ts}"
    return plan


def _expected_buffers(config: RetNetConfig) -> dict[str, Tensor]:
    """syncdoth's persistent ``retnet_rel_pos`` buffers for ``config``, in float64."""
    half = config.key_head_dim // 2
    angle = (1.0 / 10000 ** torch.linspace(0, 1, half, dtype=torch.float64)).repeat_interleave(2)
    gammas = decay_gammas(config.num_heads, config.decay).to(torch.float64)
    return {"model.retnet_rel_pos.angle": angle, "model.retnet_rel_pos.decay": torch.log(gammas)}


def _check_names(config: RetNetConfig, names: set[str], buffer: Callable[[str], Tensor]) -> dict[str, str]:
    """The plan of :func:`key_plan` once the stored names (and buffers) fit ``config``."""
    plan = key_plan(config)
    buffers = _expected_buffers(config)
    optional = set(buffers)
    if config.tie_embeddings:
        optional.add("lm_head.weight")  # saved by some versions beside the embedding it equals
    if any(".decay_proj." in n for n in names):
        raise ValueError("syncdoth weights hold retention.decay_proj (its tensor_parallel option), which this "
                         "model cannot express")
    if any(n.endswith("_layer_norm.bias") or n == "model.layer_norm.bias" for n in names):
        raise ValueError("syncdoth weights hold LayerNorm biases: a syncdoth/RetNet version from before its "
                         "RMSNorm rewrite (October 2023), whose math this reader does not follow")
    missing = sorted(set(plan.values()) - names)
    unexpected = sorted(names - set(plan.values()) - optional)
    if missing or unexpected:
        raise ValueError(f"the syncdoth weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for name, expected in buffers.items():
        if name not in names:
            continue
        got = buffer(name)
        if tuple(got.shape) != tuple(expected.shape) or not torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-6):
            field = "use_lm_decay" if name.endswith("decay") else "decoder_embed_dim/decoder_retention_heads"
            raise ValueError(f"syncdoth weights: {name} is not the {'decay' if 'decay' in name else 'rotation'} "
                             f"the config describes (check {field})")
    return plan


def read_syncdoth_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: no {CONFIG_NAME}")
    data = load_json(path)
    if not isinstance(data, dict) or not is_syncdoth_config(data):
        raise ValueError(f"{path} is not a syncdoth/RetNet config (model_type 'retnet' with decoder_embed_dim)")
    return data


def _torch_weights(directory: Path) -> dict[str, Tensor] | None:
    """``pytorch_model.bin`` (or its shards), loaded as data only, memory-mapped; ``None`` if absent."""
    index_path = directory / PT_INDEX
    weight_map: dict[str, str] | None
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
        files = sorted(set(weight_map.values()))
    elif (directory / PT_WEIGHTS).is_file():
        weight_map, files = None, [PT_WEIGHTS]
    else:
        return None
    state: dict[str, Tensor] = {}
    for file in files:
        path = directory / file
        try:
            part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises several types for a damaged or hostile pickle
            raise OSError(f"{path} is not a readable weights file (loaded with weights_only=True): {err}") from err
        if not isinstance(part, dict) or not all(isinstance(t, Tensor) for t in part.values()):
            raise ValueError(f"{path} does not hold a state dict of tensors")
        state.update(part)
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ValueError(f"{index_path} names tensors its shards do not hold: {absent[:5]}")
    return state


def from_syncdoth(cls: type[RetNet], source: str | Path | Mapping[str, Tensor],
                  config: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> RetNet:
    """A :class:`RetNet` holding a syncdoth/RetNet ``RetNetForCausalLM``'s weights, in eval mode.

    Args:
        source: a checkpoint directory (``config.json`` plus ``model.safetensors``, sharded
            safetensors with their index, or ``pytorch_model.bin`` / its shards, read with
            ``weights_only=True``), or a state dict in syncdoth's names.
        config: syncdoth's config dict (required with a state dict; overrides ``config.json``).
        dtype: the dtype to load in (default: the stored one).
    """
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("from_syncdoth: config (syncdoth's config dict) is required with a state dict")
        state: dict[str, Tensor] | None = dict(source)
        fields: Mapping[str, Any] = config
    elif isinstance(source, str | Path):
        directory = Path(source)
        if not directory.is_dir():
            raise FileNotFoundError(f"from_syncdoth: {directory} is not a directory")
        fields = dict(config) if config is not None else read_syncdoth_config(directory)
        state = _torch_weights(directory)
    else:
        raise TypeError(f"from_syncdoth: expected a directory or a state dict, got {type(source).__name__}")
    ours = config_from_syncdoth(fields)
    if state is not None:
        bad = sorted(name for name, t in state.items() if not isinstance(t, Tensor))
        if bad:
            raise TypeError(f"state_dict values must be tensors: {bad[:5]}")
        tensors = state
        shapes = {n: tuple(t.shape) for n, t in tensors.items()}

        def read(name: str) -> Tensor:
            return tensors[name].detach()

        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        stored = floats[0] if floats else torch.float32
    else:
        files = weight_files(Path(source))  # type: ignore[arg-type]
        shapes = {name: shape for name, (shape, _) in tensor_shapes(files).items()}

        def read(name: str) -> Tensor:
            return read_tensor(files[name], name)

        stored = stored_dtype(files)
    plan = _check_names(ours, set(shapes), read)
    model = cls(ours, device="meta")
    own = dict(model.named_parameters())
    wrong = [f"{theirs} {shapes[theirs]} (the config needs {tuple(own[name].shape)})"
             for name, theirs in plan.items() if shapes[theirs] != tuple(own[name].shape)]
    if wrong:
        raise ValueError(f"the syncdoth weights do not match the config: {wrong[:5]}")
    if ours.tie_embeddings and "lm_head.weight" in shapes:
        head, embed = read("lm_head.weight"), read("model.embed_tokens.weight")
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError("syncdoth weights: lm_head.weight differs from model.embed_tokens.weight but the "
                             "config ties them (tie_word_embeddings)")
    target = dtype or stored
    model = cls(ours, device="meta", dtype=target)

    def reader(theirs: str) -> Callable[[], Tensor]:
        return lambda: read(theirs)

    fill_model(model, ((name, reader(theirs)) for name, theirs in plan.items()), target)
    tie_and_check(model)
    return model.eval()

