"""``RetNetConfig``: every hyper-parameter of a RetNet language model, validated, JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..layers.feedforward import ACTIVATIONS, BLOCK_NORMS, FFN_KINDS
from ..layers.retention import GATE_ACTIVATIONS, HEAD_NORMS
from ..ops.decay import DECAY_SCHEDULES
from ..ops.position import ROTATIONS

#: ``post_norm_style`` values: torchscale's ``norm(x + f(x))`` and 0.5.1's ``x + norm(f(x))``.
POST_NORM_STYLES = ("residual", "branch")

#: The largest structural sizes a config may ask for: far above any real model, yet small enough
#: that a hostile or mistyped ``config.json`` (``"num_layers": 100000000``, ``"d_model": 2**40``)
#: is refused at once, naming the field, instead of building for hours or failing deep in torch.
MAX_SIZES = {"vocab_size": 2**24, "d_model": 2**16, "num_heads": 2**16, "num_layers": 2**12,
             "ffn_dim": 2**19, "chunk_size": 2**20}
#: The largest value width, ``d_model * value_factor`` (the error names ``value_factor``).
MAX_VALUE_DIM = 2**18


class ConfigTypeError(TypeError, ValueError):
    """A configuration field of the wrong type (a ``ValueError`` too, as every config error)."""


@dataclass
class RetNetConfig:
    """Configuration of :class:`~yet_another_retnet.RetNet`.

    Widths follow the paper: queries and keys are ``d_model`` wide (key head dim
    ``d_model / num_heads``), values ``value_factor * d_model`` (paper: 2).

    Attributes:
        vocab_size: number of token ids.
        d_model: model width. num_heads: retention heads. num_layers: decoder layers.
        ffn_dim: hidden width of the feed-forward network (paper: 2 * d_model).
        value_factor: value width over ``d_model``.
        dropout: dropout on each block's output and the embeddings (paper: 0.1).
        activation_dropout: dropout inside the FFN.
        ffn: ``"mlp"`` (paper: GELU MLP) or ``"glu"`` (torchscale).
        activation: FFN activation, ``"gelu"``, ``"swish"`` or ``"relu"``.
        gate_activation: activation of the retention gate (paper: swish).
        block_norm: ``"layernorm"`` or ``"rmsnorm"`` before each block and at the end.
        head_norm: ``"groupnorm"`` (paper) or ``"rmsnorm"`` (torchscale) over each head.
        norm_eps: epsilon of every norm.
        bias: biases in the linear layers and the LayerNorms.
        tie_embeddings: the LM head shares the embedding matrix.
        decay: ``"eq8"`` (paper Eq. 8) or ``"log-spaced"`` (the paper's experiments).
        chunk_size: default chunk length of the chunkwise form (128: fastest measured on CPU,
            training and prefill; see docs/performance.md). Inputs up to this length run
            in the parallel form.
        embed_scale: factor on the token embeddings (torchscale: ``sqrt(d_model)``).
        embedding_norm: a norm right after the embedding (torchscale's ``layernorm_embedding``).
        residual_scale: factor on the residual branch (torchscale DeepNorm's alpha; 1 otherwise).
        pre_norm: ``True`` (default, paper): ``x + f(norm(x))`` and a final norm. ``False``:
            post-norm ``norm(alpha * x + f(x))`` without a final norm, torchscale's layout when
            ``decoder_normalize_before`` is off (DeepNorm); needed to import such weights.
        relative_position: rotate queries and keys by position.
        init_std: standard deviation of the embedding initialisation.
        rotation: ``"xpos"`` (torchscale's frequencies, default) or ``"rope"`` (GPT-NeoX's, as
            flash-linear-attention's RetNets use; see :mod:`yet_another_retnet.ops.position`).
        head_norm_weight: a learned weight ``(dv,)`` shared by all heads on the RMS head norm
            (fla's RetNet; needs ``head_norm="rmsnorm"``). fla's SwiGLU MLP
            ``down(swish(gate x) * up x)`` is ``ffn="glu", activation="swish"``.
        final_norm: a norm after the last layer; ``None`` (default): with ``pre_norm`` only.
            yet-another-retnet 0.5.1 had none.
        post_norm_style: with ``pre_norm=False``, ``"residual"`` (default, torchscale):
            ``norm(alpha * x + f(x))``; ``"branch"`` (yet-another-retnet 0.5.1):
            ``alpha * x + norm(f(x))``.
        head_norm_eps: epsilon of the per-head norm; ``None`` (default): ``norm_eps``.
        lm_head_bias: a bias on the LM head (yet-another-retnet 0.5.1).
    """

    vocab_size: int = 256
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 4
    ffn_dim: int = 512
    value_factor: float = 2.0
    dropout: float = 0.1
    activation_dropout: float = 0.0
    ffn: str = "mlp"
    activation: str = "gelu"
    gate_activation: str = "swish"
    block_norm: str = "layernorm"
    head_norm: str = "groupnorm"
    norm_eps: float = 1e-6
    bias: bool = False
    tie_embeddings: bool = True
    decay: str = "eq8"
    chunk_size: int = 128
    embed_scale: float = 1.0
    embedding_norm: bool = False
    residual_scale: float = 1.0
    pre_norm: bool = True
    relative_position: bool = True
    init_std: float = 0.02
    # Pretrained fla-hub RetNets (models/fla.py): GPT-NeoX RoPE and a weighted RMS head norm.
    rotation: str = "xpos"
    head_norm_weight: bool = False
    # The architecture of yet-another-retnet 0.5.1 (models/yar051.py); defaults change nothing.
    final_norm: bool | None = None
    post_norm_style: str = "residual"
    head_norm_eps: float | None = None
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is wrong (:class:`ConfigTypeError`, a
        ``TypeError`` and ``ValueError`` both, where its type is wrong)."""
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "ffn_dim", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigTypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
            if value > MAX_SIZES[name]:
                raise ValueError(f"{name} must be at most {MAX_SIZES[name]}, got {value!r}")
        for name in ("value_factor", "dropout", "activation_dropout", "norm_eps", "embed_scale", "residual_scale",
                     "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name in ("bias", "tie_embeddings", "embedding_norm", "relative_position", "pre_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigTypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__} "
                                      f"{getattr(self, name)!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide d_model ({self.d_model})")
        if self.relative_position and (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"d_model / num_heads = {self.d_model // self.num_heads} must be even with relative_position"
            )
        value_dim = self.d_model * self.value_factor
        # A finite value_factor can still make an infinite or enormous width (1e308 * d_model):
        # refuse it by name before int() overflows or a layer tries to allocate it.
        if not math.isfinite(value_dim) or value_dim > MAX_VALUE_DIM:
            raise ValueError(f"value_factor ({self.value_factor}) must keep d_model * value_factor at most "
                             f"{MAX_VALUE_DIM}")
        if self.value_factor <= 0 or value_dim != int(value_dim) or int(value_dim) % self.num_heads:
            raise ValueError(
                f"value_factor ({self.value_factor}) must make d_model * value_factor an integer divisible by num_heads"
            )
        for name in ("dropout", "activation_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        choices = {
            "ffn": FFN_KINDS,
            "activation": tuple(ACTIVATIONS),
            "gate_activation": tuple(GATE_ACTIVATIONS),
            "block_norm": BLOCK_NORMS,
            "head_norm": HEAD_NORMS,
            "decay": DECAY_SCHEDULES,
        }
        for name, allowed in choices.items():
            if not isinstance(getattr(self, name), str):
                raise ConfigTypeError(f"{name} must be a str, one of {allowed}, got {getattr(self, name)!r}")
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("norm_eps", "embed_scale", "residual_scale", "init_std"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self._validate_fla_options()
        self._validate_yar051_fields()

    def _validate_fla_options(self) -> None:
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {self.rotation!r}")
        if not isinstance(self.head_norm_weight, bool):
            raise ConfigTypeError(f"head_norm_weight must be a bool, got {self.head_norm_weight!r}")
        if self.head_norm_weight and self.head_norm != "rmsnorm":
            raise ValueError(f"head_norm_weight needs head_norm='rmsnorm', got head_norm={self.head_norm!r}")

    def _validate_yar051_fields(self) -> None:
        if self.final_norm is not None and not isinstance(self.final_norm, bool):
            raise ConfigTypeError(f"final_norm must be a bool or None, got {self.final_norm!r}")
        if self.post_norm_style not in POST_NORM_STYLES:
            raise ValueError(f"post_norm_style must be one of {POST_NORM_STYLES}, got {self.post_norm_style!r}")
        if self.pre_norm and self.post_norm_style != "residual":
            raise ValueError("post_norm_style='branch' needs pre_norm=False")
        eps = self.head_norm_eps
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, int | float)
                                or not math.isfinite(eps) or eps < 0):
            raise ValueError(f"head_norm_eps must be None or a finite number >= 0, got {eps!r}")
        if not isinstance(self.lm_head_bias, bool):
            raise ConfigTypeError(f"lm_head_bias must be a bool, got {self.lm_head_bias!r}")

    @property
    def has_final_norm(self) -> bool:
        """Whether a norm follows the last layer (``final_norm``, or ``pre_norm`` by default)."""
        return self.pre_norm if self.final_norm is None else self.final_norm

    @property
    def key_head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def value_head_dim(self) -> int:
        return int(self.d_model * self.value_factor) // self.num_heads

    # ----------------------------------------------------------------------------------------
    # Serialisation
    # ----------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetNetConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a RetNetConfig must be read from a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        model_type = data.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type is {model_type!r}, not a yet-another-retnet config ({MODEL_TYPE!r})")
        # A config.json written by transformers carries its own bookkeeping next to our fields.
        unknown = sorted(set(data) - known - TRANSFORMERS_KEYS)
        if unknown:
            raise ValueError(f"unknown RetNetConfig fields: {unknown}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json_text(cls, text: str | bytes) -> RetNetConfig:
        """From JSON text, and only text: what a file from elsewhere (a weights file's metadata)
        holds is parsed as data, never opened as a path. ``ValueError`` for anything but a JSON
        object of valid fields (``NaN`` and ``Infinity`` included: not JSON numbers)."""
        if not isinstance(text, str | bytes):
            raise TypeError(f"from_json_text expects str or bytes, got {type(text).__name__}")
        return cls.from_dict(loads_strict(text, "RetNetConfig JSON"))

    @classmethod
    def from_json_file(cls, path: str | Path) -> RetNetConfig:
        """From a JSON file at ``path``."""
        return cls.from_json_text(Path(path).read_bytes())

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> RetNetConfig:
        """From JSON text (a ``str``) or a file (a ``Path``).

        A ``str`` that is not JSON is read as a path only for compatibility, with a
        ``DeprecationWarning``; use :meth:`from_json_file` for paths and :meth:`from_json_text`
        for data from elsewhere."""
        if isinstance(text_or_path, Path):
            return cls.from_json_file(text_or_path)
        if not isinstance(text_or_path, str):
            raise TypeError(f"from_json expects a JSON str or a pathlib.Path, got {type(text_or_path).__name__}")
        if text_or_path.lstrip().startswith("{"):
            return cls.from_json_text(text_or_path)
        import warnings

        warnings.warn("RetNetConfig.from_json(str) with a path is deprecated: pass a pathlib.Path or call "
                      "from_json_file", DeprecationWarning, stacklevel=2)
        return cls.from_json_file(text_or_path)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> RetNetConfig:
        """A named preset (see :data:`PRESETS`), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


#: The ``model_type`` of our ``config.json`` (and of :mod:`yet_another_retnet.hf`'s config class).
#: Not ``"retnet"``: flash-linear-attention registers that name with transformers.
MODEL_TYPE = "yaretnet"

#: Keys that transformers' ``PretrainedConfig`` writes (4.x and 5.x) besides a model's own fields:
#: :meth:`RetNetConfig.from_dict` skips them, so the Hugging Face class's ``config.json`` loads.
TRANSFORMERS_KEYS = frozenset({
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "tie_word_embeddings", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "pruned_heads",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label", "label2id",
    "tokenizer_class", "prefix", "task_specific_params", "problem_type", "num_labels",
    "_attn_implementation_autoset", "tf_legacy_loss", "generation_config",
})


def loads_strict(text: str | bytes, what: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` (Python's extension, not JSON) and reports
    any failure as one ``ValueError`` naming ``what``."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{what}: {constant} is not a valid JSON number")

    try:
        return json.loads(text, parse_constant=refuse)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"invalid {what}: {err}") from err
    except RecursionError as err:  # thousands of nested "[": json's decoder recurses per level
        raise ValueError(f"invalid {what}: JSON nested too deeply") from err


#: Named configurations. ``1.3b``, ``2.7b`` and ``6.7b`` are the paper's sizes (Table 2: width,
#: depth, heads, FFN = 2 * width, value factor 2) at a 50k vocabulary; the small ones are for
#: laptops and tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"vocab_size": 256, "d_model": 128, "num_heads": 4, "num_layers": 4, "ffn_dim": 256},
    "small": {"vocab_size": 256, "d_model": 256, "num_heads": 4, "num_layers": 4, "ffn_dim": 512},
    "base": {"vocab_size": 256, "d_model": 768, "num_heads": 12, "num_layers": 12, "ffn_dim": 2048},
    "1.3b": {"vocab_size": 50000, "d_model": 2048, "num_heads": 8, "num_layers": 24, "ffn_dim": 4096},
    "2.7b": {"vocab_size": 50000, "d_model": 2560, "num_heads": 10, "num_layers": 32, "ffn_dim": 5120},
    "6.7b": {"vocab_size": 50000, "d_model": 4096, "num_heads": 16, "num_layers": 32, "ffn_dim": 8192},
}

#: What makes a model flash-linear-attention's RetNet (all but the sizes; ``models/fla.py``):
#: GPT-NeoX RoPE, weighted RMS head norm, SwiGLU MLP, RMSNorm blocks, no biases, no dropout.
FLA_ARCHITECTURE: dict[str, Any] = {
    "ffn": "glu", "activation": "swish", "gate_activation": "swish", "block_norm": "rmsnorm",
    "head_norm": "rmsnorm", "head_norm_weight": True, "bias": False, "decay": "eq8", "embed_scale": 1.0,
    "embedding_norm": False, "residual_scale": 1.0, "pre_norm": True, "relative_position": True,
    "rotation": "rope", "dropout": 0.0, "activation_dropout": 0.0, "tie_embeddings": False,
}
# fla-hub/retnet-1.3B-100B and -2.7B-100B (Llama's 32k vocabulary); any size with these settings
# exports to fla (``retnet convert --to fla``).
PRESETS["fla-1.3b"] = {"vocab_size": 32000, "d_model": 2048, "num_heads": 8, "num_layers": 24, "ffn_dim": 2816,
                       **FLA_ARCHITECTURE}
PRESETS["fla-2.7b"] = {"vocab_size": 32000, "d_model": 2560, "num_heads": 10, "num_layers": 32, "ffn_dim": 3584,
                       **FLA_ARCHITECTURE}
