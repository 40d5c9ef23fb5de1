"""flash-linear-attention (fla) RetNet checkpoints, such as ``fla-hub/retnet-1.3B-100B``, both ways.

fla's ``RetNetForCausalLM`` is this library's RetNet with these settings (read from fla 0.6.0's
source; the checkpoints' configs in ``docs/checkpoints.md``):

- pre-norm blocks with RMSNorms (weight, eps ``norm_eps``), a final RMSNorm, no embedding
  scale, no biases: ``block_norm="rmsnorm"``, ``bias=False``;
- retention with decay ``1 - 2^(-5-h)`` (``decay="eq8"``), the ``dk^-1/2`` scale, a swish output
  gate and a per-head RMSNorm with one weight ``(dv,)`` shared by the heads
  (``head_norm="rmsnorm"``, ``head_norm_weight`` = fla's ``elementwise_affine``);
- q and k rotated by GPT-NeoX's RoPE (``rotation="rope"``); GPT-NeoX rotates feature ``i`` of a
  head with feature ``i + dk/2``, the kernels here rotate (even, odd) pairs, so the q and k
  weight rows are permuted on the way in and back on the way out (exact);
- the MLP ``down(swish(gate x) * up x)`` = ``ffn="glu", activation="swish"`` with ``fc1`` =
  ``gate_proj``, ``gate`` = ``up_proj``, ``fc2`` = ``down_proj``; before February 2025 fla stored
  ``gate_proj`` and ``up_proj`` as one ``gate_proj`` ``[2I, d]``, split here on load.

What the format can hold that this model cannot (grouped key/value heads, short convolutions,
feature maps, attention-residual blocks, hybrid attention layers, no output gate, key widths
other than ``d_model``) is refused with a ``ValueError`` naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..ops.position import halves_to_pairs, pairs_to_halves
from .checkpoint import CONFIG_NAME, atomic_write, remove_stale
from .config import FLA_ARCHITECTURE, RetNetConfig
from .shards import (
    DEFAULT_MAX_SHARD_SIZE,
    fill_model,
    load_json,
    read_tensor,
    save_sharded,
    stored_dtype,
    tensor_shapes,
    tie_and_check,
    weight_files,
)

if TYPE_CHECKING:
    from .retnet import RetNet


def fla_intermediate_size(hidden_size: int, hidden_ratio: float | None, intermediate_size: int | None) -> int:
    """fla's MLP width: ``intermediate_size``, or ``int(hidden * ratio * 2 / 3)`` rounded up to 256.

    ``ValueError`` naming the field for a value of the wrong type or one too big to be a width.
    """
    if intermediate_size is not None:
        if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int):
            raise ValueError(f"fla config field intermediate_size must be an int or null, got "
                             f"{type(intermediate_size).__name__} {intermediate_size!r}")
        return intermediate_size
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int):
        raise ValueError(f"fla config field hidden_size must be an int, got {type(hidden_size).__name__} "
                         f"{hidden_size!r}")
    ratio = 4 if hidden_ratio is None else _number("hidden_ratio", hidden_ratio)
    width = hidden_size * ratio * 2 / 3
    if not math.isfinite(width):  # int() of it would overflow; the config's bounds name ffn_dim after
        raise ValueError(f"fla config field hidden_ratio={hidden_ratio!r} makes an infinite MLP width")
    return 256 * ((int(width) + 255) // 256)


def _number(field: str, value: Any) -> float:
    """``value`` of the fla config field ``field`` as a finite float; ``ValueError`` naming the
    field otherwise (``null``, a string, a bool, NaN: ``float()`` would raise a bare ``TypeError``
    or, for ``"2"``, accept a string)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"fla config field {field} must be a finite number, got {type(value).__name__} {value!r}")
    return float(value)


def config_from_fla(fla: Mapping[str, Any]) -> RetNetConfig:
    """Our :class:`RetNetConfig` for an fla ``config.json`` dict; ``ValueError`` naming a field it
    cannot express."""
    if not isinstance(fla, Mapping):
        raise ValueError(f"an fla config must be a dict, got {type(fla).__name__}")
    if fla.get("model_type", "retnet") != "retnet":
        raise ValueError(f"model_type must be 'retnet' for an fla RetNet, got {fla.get('model_type')!r}")
    if "decoder_embed_dim" in fla:
        raise ValueError("decoder_embed_dim: a syncdoth/RetNet (torchscale-style) config, not fla's")

    def get(name: str, default: Any) -> Any:
        return fla.get(name, default)

    hidden, heads = get("hidden_size", 2048), get("num_heads", 8)
    kv_heads = get("num_kv_heads", None)
    refusals = (
        ("num_kv_heads", kv_heads is not None and kv_heads != heads, "grouped key/value heads"),
        ("use_short_conv", bool(get("use_short_conv", False)), "short convolutions"),
        ("feature_map", get("feature_map", None) is not None, "a feature map on q and k"),
        ("attnres_block_size", get("attnres_block_size", None) is not None, "attention-residual blocks"),
        ("attn", get("attn", None) is not None, "hybrid softmax-attention layers"),
        ("use_output_gate", not get("use_output_gate", True), "retention without the output gate"),
        ("hidden_act", get("hidden_act", "swish") != "swish", "activations other than swish"),
        ("expand_k", get("expand_k", 1.0) != 1, "key widths other than hidden_size"),
    )
    for field, refused, what in refusals:
        if refused:
            raise ValueError(f"fla config field {field}={fla.get(field)!r}: {what} are not supported")
    value_factor = _number("expand_v", get("expand_v", 2.0))
    norm_eps = _number("norm_eps", get("norm_eps", 1e-6))
    ffn_dim = fla_intermediate_size(hidden, get("hidden_ratio", 2), get("intermediate_size", None))
    try:
        return RetNetConfig(
            vocab_size=get("vocab_size", 32000), d_model=hidden, num_heads=heads,
            num_layers=get("num_hidden_layers", 24), ffn_dim=ffn_dim,
            value_factor=value_factor, norm_eps=norm_eps,
            **{**FLA_ARCHITECTURE,
               "tie_embeddings": bool(get("tie_word_embeddings", False)),
               "head_norm_weight": get("elementwise_affine", True) is not False},
        )
    except ValueError as err:
        raise ValueError(f"fla config: {err}") from err


def config_to_fla(config: RetNetConfig) -> dict[str, Any]:
    """The fla ``config.json`` dict of ``config``; ``ValueError`` naming the first field fla's
    RetNet cannot express (dropout is dropped: fla's model has none)."""
    for field, value in FLA_ARCHITECTURE.items():
        if field in ("dropout", "activation_dropout", "tie_embeddings", "head_norm_weight"):
            continue  # no dropout in fla's model; the other two are fla config fields
        if getattr(config, field) != value:
            raise ValueError(f"fla's RetNet cannot express {field}={getattr(config, field)!r} (it needs {value!r})")
    if config.key_head_dim > 256:
        raise ValueError(f"fla's RetNet needs a key head dim <= 256, got {config.key_head_dim}")
    return {
        "model_type": "retnet", "architectures": ["RetNetForCausalLM"],
        "hidden_size": config.d_model, "num_heads": config.num_heads, "num_kv_heads": None,
        "num_hidden_layers": config.num_layers, "vocab_size": config.vocab_size,
        "expand_k": 1, "expand_v": config.value_factor, "hidden_ratio": 2, "intermediate_size": config.ffn_dim,
        "hidden_act": "swish", "norm_eps": config.norm_eps, "elementwise_affine": config.head_norm_weight,
        "fuse_norm": True, "use_output_gate": True, "use_short_conv": False, "feature_map": None,
        "tie_word_embeddings": config.tie_embeddings, "attn_mode": "fused_chunk",
        "bos_token_id": 1, "eos_token_id": 2,
    }


def _head_norm_key(prefix: str, names: set[str] | Mapping[str, Any]) -> str:
    fused = f"{prefix}attn.g_norm_swish_gate.weight"
    return fused if fused in names else f"{prefix}attn.g_norm.weight"


def _plan(config: RetNetConfig, names: set[str],
          shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, Callable[[Tensor], Tensor]]]:
    """Our parameter name -> (fla name, transform of the fla tensor). Checks keys and shapes."""
    heads, ffn = config.num_heads, config.ffn_dim

    def same(t: Tensor) -> Tensor:
        return t

    def pairs(t: Tensor) -> Tensor:
        return halves_to_pairs(t, heads)

    plan: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {
        "embed_tokens.weight": ("model.embeddings.weight", same),
        "decoder.norm.weight": ("model.norm.weight", same),
    }
    if not config.tie_embeddings:
        plan["lm_head.weight"] = ("lm_head.weight", same)
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        plan[f"{dst}retention_norm.weight"] = (f"{src}attn_norm.weight", same)
        plan[f"{dst}retention.q_proj.weight"] = (f"{src}attn.q_proj.weight", pairs)
        plan[f"{dst}retention.k_proj.weight"] = (f"{src}attn.k_proj.weight", pairs)
        for ours, theirs in (("v_proj", "v_proj"), ("g_proj", "g_proj"), ("out_proj", "o_proj")):
            plan[f"{dst}retention.{ours}.weight"] = (f"{src}attn.{theirs}.weight", same)
        if config.head_norm_weight:
            plan[f"{dst}retention.head_weight"] = (_head_norm_key(src, names), same)
        plan[f"{dst}ffn_norm.weight"] = (f"{src}mlp_norm.weight", same)
        plan[f"{dst}ffn.fc2.weight"] = (f"{src}mlp.down_proj.weight", same)
        gate = f"{src}mlp.gate_proj.weight"
        if f"{src}mlp.up_proj.weight" not in names and gate in names and shapes[gate][0] == 2 * ffn:
            # fla before February 2025: [gate; up] stored as one gate_proj of [2I, d]
            plan[f"{dst}ffn.fc1.weight"] = (gate, lambda t: t[:ffn])
            plan[f"{dst}ffn.gate.weight"] = (gate, lambda t: t[ffn:])
        else:
            plan[f"{dst}ffn.fc1.weight"] = (gate, same)
            plan[f"{dst}ffn.gate.weight"] = (f"{src}mlp.up_proj.weight", same)
    needed = {theirs for theirs, _ in plan.values()}
    missing = sorted(needed - names)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    unexpected = sorted(names - needed - optional)
    if missing or unexpected:
        raise ValueError(f"the fla weights do not match the config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return plan


def _build(cls: type[RetNet], config: RetNetConfig, plan: dict[str, tuple[str, Callable[[Tensor], Tensor]]],
           read: Callable[[str], Tensor], dtype: torch.dtype) -> RetNet:
    model = cls(config, device="meta", dtype=dtype)
    own = {name: p.shape for name, p in model.named_parameters()}
    if set(plan) != set(own):  # a bug in _plan, never the caller's fault
        raise RuntimeError(f"fla plan and model disagree: {sorted(set(plan) ^ set(own))[:5]}")

    def reader(theirs: str, transform: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
        return lambda: transform(read(theirs))

    fill_model(model, ((ours, reader(theirs, f)) for ours, (theirs, f) in plan.items()), dtype)
    tie_and_check(model)
    return model.eval()


def read_fla_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: no {CONFIG_NAME}")
    data = load_json(path)
    if not isinstance(data, dict) or data.get("model_type") != "retnet":
        raise ValueError(f"{path} is not an fla RetNet config (model_type {data.get('model_type') if isinstance(data, dict) else None!r}, expected 'retnet')")
    return data


def from_fla(cls: type[RetNet], source: str | Path | Mapping[str, Tensor], config: Mapping[str, Any] | None = None,
             dtype: torch.dtype | None = None) -> RetNet:
    """A :class:`RetNet` holding an fla ``RetNetForCausalLM``'s weights, in eval mode.

    Args:
        source: a checkpoint directory (``config.json`` plus ``model.safetensors`` or shards with
            ``model.safetensors.index.json``), or a state dict.
        config: the fla config dict (required with a state dict; overrides ``config.json``).
        dtype: the dtype to load in (default: the stored one). A directory is loaded one tensor at
            a time into a model built on the meta device: peak memory ~ the model in ``dtype``.
    """
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("from_fla: config (fla's config dict) is required with a state dict")
        state = dict(source)
        bad = sorted(name for name, t in state.items() if not isinstance(t, Tensor))
        if bad:
            raise TypeError(f"state_dict values must be tensors: {bad[:5]}")
        ours = config_from_fla(config)
        plan = _plan(ours, set(state), {n: tuple(t.shape) for n, t in state.items()})
        target = dtype or state["model.embeddings.weight"].dtype
        _check_shapes(cls, ours, plan, {n: tuple(t.shape) for n, t in state.items()})
        _check_tied_head(ours, set(state), lambda name: state[name].detach())
        return _build(cls, ours, plan, lambda name: state[name].detach(), target)
    if not isinstance(source, str | Path):
        raise TypeError(f"from_fla: expected a directory or a state dict, got {type(source).__name__}")
    directory = Path(source)
    if not directory.is_dir():
        raise FileNotFoundError(f"from_fla: {directory} is not a directory")
    fla_config = dict(config) if config is not None else read_fla_config(directory)
    ours = config_from_fla(fla_config)
    files = weight_files(directory)
    shapes = {name: shape for name, (shape, _) in tensor_shapes(files).items()}
    plan = _plan(ours, set(shapes), shapes)
    _check_shapes(cls, ours, plan, shapes)

    def read(name: str) -> Tensor:
        return read_tensor(files[name], name)

    _check_tied_head(ours, set(shapes), read)
    target = dtype or stored_dtype(files)
    return _build(cls, ours, plan, read, target)


def _check_tied_head(config: RetNetConfig, names: set[str], read: Callable[[str], Tensor]) -> None:
    """A tied config takes no head of its own: an ``lm_head.weight`` stored anyway must be the
    embedding, else dropping it would load a model with other logits than the checkpoint's."""
    if config.tie_embeddings and "lm_head.weight" in names:
        head, embed = read("lm_head.weight"), read("model.embeddings.weight")
        if head.shape != embed.shape or not torch.equal(head, embed):
            raise ValueError("fla weights: lm_head.weight differs from model.embeddings.weight but the config "
                             "ties them (tie_word_embeddings)")


def _check_shapes(cls: type[RetNet], config: RetNetConfig, plan: dict[str, tuple[str, Callable[[Tensor], Tensor]]],
                  shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every fla tensor's shape against the config, before anything is read or allocated."""
    model = cls(config, device="meta")
    own = dict(model.named_parameters())
    wrong = []
    for ours, (theirs, transform) in plan.items():
        got = transform(torch.empty(shapes[theirs], device="meta")).shape
        if tuple(got) != tuple(own[ours].shape):
            wrong.append(f"{theirs} {tuple(shapes[theirs])} (the config needs {tuple(own[ours].shape)})")
    if wrong:
        raise ValueError(f"the fla weights do not match the config: {wrong[:5]}")


def fla_state_dict(model: RetNet) -> dict[str, Tensor]:
    """``model``'s weights under fla's names and layout (q/k rows back in GPT-NeoX order).

    ``ValueError`` for a quantized model: fla checkpoints hold float weights.
    """
    from .quantized import is_quantized

    if is_quantized(model):
        raise ValueError(f"fla export: the model is quantized ({model.__dict__['_quantization']}); fla checkpoints "
                         "hold float weights: export the float model (RetNet.from_pretrained without quantize)")
    config = model.config
    config_to_fla(config)
    heads = config.num_heads
    state = model.state_dict()
    out = {"model.embeddings.weight": state["embed_tokens.weight"], "model.norm.weight": state["decoder.norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[f"{dst}attn_norm.weight"] = state[f"{src}retention_norm.weight"]
        out[f"{dst}attn.q_proj.weight"] = pairs_to_halves(state[f"{src}retention.q_proj.weight"], heads)
        out[f"{dst}attn.k_proj.weight"] = pairs_to_halves(state[f"{src}retention.k_proj.weight"], heads)
        out[f"{dst}attn.v_proj.weight"] = state[f"{src}retention.v_proj.weight"]
        out[f"{dst}attn.g_proj.weight"] = state[f"{src}retention.g_proj.weight"]
        out[f"{dst}attn.o_proj.weight"] = state[f"{src}retention.out_proj.weight"]
        if config.head_norm_weight:
            out[f"{dst}attn.g_norm_swish_gate.weight"] = state[f"{src}retention.head_weight"]
        out[f"{dst}mlp_norm.weight"] = state[f"{src}ffn_norm.weight"]
        out[f"{dst}mlp.gate_proj.weight"] = state[f"{src}ffn.fc1.weight"]
        out[f"{dst}mlp.up_proj.weight"] = state[f"{src}ffn.gate.weight"]
        out[f"{dst}mlp.down_proj.weight"] = state[f"{src}ffn.fc2.weight"]
    return out


def save_fla(model: RetNet, directory: str | Path, max_shard_size: int | str | None = None) -> None:
    """Write ``model`` as an fla checkpoint: ``config.json`` and (sharded) safetensors.

    ``ValueError`` (before anything is written) when fla's RetNet cannot express the model.
    """
    from .quantized import QUANTIZATION_NAME

    fla_config = config_to_fla(model.config)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    state = fla_state_dict(model)
    dtypes = {t.dtype for t in state.values()}
    fla_config["torch_dtype"] = str(next(iter(dtypes))).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    save_sharded(state, directory, max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    atomic_write(directory / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(fla_config, indent=2) + "\n"))
    remove_stale(directory / QUANTIZATION_NAME)  # an earlier quantized save's; last, as save_pretrained does

