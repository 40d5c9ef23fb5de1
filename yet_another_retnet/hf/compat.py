"""Every difference between the transformers versions we support (4.57 and 5.x), in one place.

- The cache keyword: recent 5.x releases pass ``cache=`` to ``forward`` and read
  ``outputs["cache"]``; 4.x and the earlier 5.x releases (5.17 among them) use
  ``past_key_values`` for both. Read off the output class itself, not the version number.
- ``Cache.__init__``: 4.57 and 5.x take ``layers=`` (a list); we hold no per-layer objects.
- Tied weights: 5.x declares them as ``{"lm_head.weight": "embed_tokens.weight"}``, 4.x as a
  list of the tied parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
IS_V5 = TRANSFORMERS_VERSION.major >= 5


def _cache_name() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


#: The name under which ``generate`` hands the cache to ``forward`` and reads it back (the field
#: of ``CausalLMOutputWithPast`` that holds it).
CACHE_KWARG = _cache_name()

#: The ``PreTrainedModel._tied_weights_keys`` of a causal LM whose head shares the embedding.
TIED_WEIGHTS_KEYS: Any = {"lm_head.weight": "embed_tokens.weight"} if IS_V5 else ["lm_head.weight"]


def cache_base_kwargs() -> dict[str, Any]:
    """Arguments of ``transformers.Cache.__init__`` for a cache without per-layer objects."""
    return {"layers": []}


def pick_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under either name (``cache`` or ``past_key_values``), popped."""
    cache = kwargs.pop("cache", None)
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def register_tokenizer(config_class: type) -> None:
    """Let ``AutoTokenizer`` read a ``tokenizer.json`` next to our config. 5.x falls back to its
    tokenizers backend by itself; 4.x needs the fast tokenizer class named for our config."""
    if IS_V5:
        return
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    AutoTokenizer.register(config_class, fast_tokenizer_class=PreTrainedTokenizerFast, exist_ok=True)
