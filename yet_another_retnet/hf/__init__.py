"""Hugging Face transformers integration (extra ``[hf]``): importing this module registers
:class:`YaRetNetConfig` and :class:`YaRetNetForCausalLM` with ``AutoConfig`` and
``AutoModelForCausalLM`` under ``model_type`` ``"yaretnet"``.

    import yet_another_retnet.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained("run/")   # a directory from RetNet.save_pretrained
    model.generate(ids, max_new_tokens=20)

See docs/huggingface.md.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as err:  # an optional dependency
    raise ImportError("yet_another_retnet.hf needs transformers: pip install 'yet-another-retnet[hf]'") from err

from transformers import AutoConfig, AutoModelForCausalLM

from ..models.config import MODEL_TYPE
from .cache import RetNetCache
from .compat import register_tokenizer
from .configuration import YaRetNetConfig
from .modeling import YaRetNetForCausalLM, YaRetNetPreTrainedModel

AutoConfig.register(MODEL_TYPE, YaRetNetConfig, exist_ok=True)
AutoModelForCausalLM.register(YaRetNetConfig, YaRetNetForCausalLM, exist_ok=True)
register_tokenizer(YaRetNetConfig)

__all__ = ["MODEL_TYPE", "RetNetCache", "YaRetNetConfig", "YaRetNetForCausalLM", "YaRetNetPreTrainedModel"]
