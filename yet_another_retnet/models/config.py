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
            training and prefill; see docs/speed-training.md). Inputs up to this length run
            in the parallel form.
        embed_scale: factor on the token embeddings (torchscale: ``sqrt(d_model)``).
        embedding_norm: a norm right after the embedding (torchscale's ``layernorm_embedding``).
        residual_scale: factor on the residual branch (torchscale DeepNorm's alpha; 1 otherwise).
        pre_norm: ``True`` (default, paper): ``x + f(norm(x))`` and a final norm. ``False``:
            post-norm ``norm(alpha * x + f(x))`` without a final norm, torchscale's layout when
            ``decoder_normalize_before`` is off (DeepNorm); needed to import such weights.
        relative_position: rotate queries and keys by position.
        init_std: standard deviation of the embedding initialisation.
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
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RetNetConfig fields: {unknown}")
        return cls(**data)

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


def loads_strict(text: str | bytes, what: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` (Python's extension, not JSON) and reports
    any failure as one ``ValueError`` naming ``what``."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{what}: {constant} is not a valid JSON number")

    try:
        return json.loads(text, parse_constant=refuse)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"invalid {what}: {err}") from err


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
