"""``YaRetNetConfig``: a transformers ``PretrainedConfig`` carrying every ``RetNetConfig`` field.

The fields are read from :class:`~yet_another_retnet.models.RetNetConfig` itself (its dataclass
fields and defaults), so a field added there travels through transformers with no change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from ..models.config import MODEL_TYPE, RetNetConfig

_FIELDS = {f.name: f.default for f in dataclasses.fields(RetNetConfig)}


class YaRetNetConfig(PretrainedConfig):
    """transformers' view of a :class:`RetNetConfig`: the same fields under the same names, plus
    transformers' own (token ids, ``use_cache``, ...). ``tie_word_embeddings`` follows
    ``tie_embeddings``. Invalid values raise ``ValueError`` as ``RetNetConfig`` does."""

    model_type = MODEL_TYPE
    #: Trainer's evaluation must not try to concatenate the cache across batches.
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # noqa: RUF012
    attribute_map = {  # noqa: RUF012 (transformers reads it as a class attribute)
        "hidden_size": "d_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "ffn_dim",
    }

    def __init__(self, **kwargs: Any) -> None:
        model_type = kwargs.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type is {model_type!r}: not a yet-another-retnet config ({MODEL_TYPE!r})")
        values = {name: kwargs.pop(name, default) for name, default in _FIELDS.items()}
        retnet = RetNetConfig(**values)  # validates, naming the field that is wrong
        for name in _FIELDS:
            object.__setattr__(self, name, getattr(retnet, name))
        kwargs["tie_word_embeddings"] = retnet.tie_embeddings
        use_cache = kwargs.pop("use_cache", True)
        super().__init__(**kwargs)
        self.use_cache = use_cache

    @classmethod
    def from_retnet_config(cls, config: RetNetConfig, **kwargs: Any) -> YaRetNetConfig:
        """From our config, with transformers' keys (``eos_token_id=...``) as keywords."""
        return cls(**config.to_dict(), **kwargs)

    def to_retnet_config(self) -> RetNetConfig:
        """Our config: the model fields only."""
        return RetNetConfig(**{name: getattr(self, name) for name in _FIELDS})
