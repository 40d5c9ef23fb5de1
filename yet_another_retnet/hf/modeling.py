"""``YaRetNetForCausalLM``: our :class:`RetNet` inside transformers' ``PreTrainedModel`` and
``GenerationMixin``, so ``AutoModelForCausalLM``, ``generate``, ``Trainer`` and ``save_pretrained``
work on it.

It builds a :class:`RetNet` and adopts its top-level modules (``embed_tokens``, ``embedding_norm``,
``decoder``, ``lm_head``) as its own: the parameter names are those of our checkpoints, so one
``model.safetensors`` loads in both worlds, and every computation is the RetNet's (``forward``
calls it; nothing of the model is re-implemented here). A prompt is read in the chunkwise form
and each later token is one recurrent step, carried in a :class:`RetNetCache`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import GenerationMixin as _GenerationMixin
from transformers import PreTrainedModel as _PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers.retention import MultiScaleRetention
from ..models.retnet import RetNet, RetNetDecoderLayer
from .cache import RetNetCache
from .compat import CACHE_KWARG, TIED_WEIGHTS_KEYS, pick_cache
from .configuration import YaRetNetConfig

#: Tokenizer files that ``save_pretrained`` copies from the directory the model was loaded from.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")

#: Keyword arguments that transformers' generation loop or ``Trainer`` may pass and that a RetNet
#: has no use for (positions come from its state and the attention mask).
_IGNORED = frozenset({"position_ids", "cache_position", "token_type_ids", "output_attentions",
                      "output_hidden_states", "next_sequence_length", "is_first_iteration"})


# Typed as Any: their signatures differ between transformers versions (see compat.py).
PreTrainedModel: Any = _PreTrainedModel
GenerationMixin: Any = _GenerationMixin


class YaRetNetPreTrainedModel(PreTrainedModel):
    config_class = YaRetNetConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RetNetDecoderLayer"]  # noqa: RUF012 (transformers reads class attributes)
    _supports_cache_class = True
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        # The RetNet initialises its own weights when built; transformers builds it on the meta
        # device when loading, and then only the decay buffer (configuration, not in the weights
        # file) needs real values.
        if isinstance(module, MultiScaleRetention):
            # The values a freshly built layer gets (its weights on the meta device, its decays
            # computed on the CPU), whatever configuration fields they depend on.
            with torch.device("cpu"):
                layer = RetNetDecoderLayer(self.config.to_retnet_config(), device="meta")
            gammas = cast(MultiScaleRetention, layer.retention).gammas
            with torch.no_grad():
                module.gammas.copy_(gammas.to(module.gammas.device, module.gammas.dtype))


class YaRetNetForCausalLM(YaRetNetPreTrainedModel, GenerationMixin):
    """A RetNet language model for transformers.

    ``forward(input_ids, attention_mask=None, cache=None, labels=None, ...)`` returns a
    ``CausalLMOutputWithPast``: ``logits`` ``(batch, length, vocab)`` (the last ``logits_to_keep``
    positions when that is > 0), ``loss`` when ``labels`` ``(batch, length)`` are given (shifted
    inside, -100 ignored; divided by ``num_items_in_batch`` instead of averaged when ``Trainer``
    passes it), and the :class:`RetNetCache` after the input. ``attention_mask`` marks left
    padding on a sequence's first call; later calls may pass the mask of the whole sequence.
    """

    _tied_weights_keys = TIED_WEIGHTS_KEYS

    def __init__(self, config: YaRetNetConfig) -> None:
        super().__init__(config)
        retnet = RetNet(config.to_retnet_config())
        # Not a submodule (its modules are ours): its parameter names stay those of a RetNet.
        self.__dict__["retnet"] = retnet
        for name, module in retnet.named_children():
            self.add_module(name, module)
        if retnet.embedding_norm is None:
            self.embedding_norm = None
        self.post_init()

    @property
    def retnet(self) -> RetNet:
        """The wrapped :class:`RetNet` (same modules, same parameters)."""
        return self.__dict__["retnet"]

    # -- transformers' model interface ---------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.retnet.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"the input embeddings must be an nn.Embedding, got {type(value).__name__}")
        self.retnet.embed_tokens = value
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.retnet.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        if not isinstance(new_embeddings, nn.Linear):
            raise TypeError(f"the LM head must be an nn.Linear, got {type(new_embeddings).__name__}")
        self.retnet.lm_head = new_embeddings
        self.lm_head = new_embeddings

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None) -> None:
        self.retnet.gradient_checkpointing_enable(enable)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Any = None) -> None:
        self.retnet.gradient_checkpointing_enable(True)

    def gradient_checkpointing_disable(self) -> None:
        self.retnet.gradient_checkpointing_enable(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(self.retnet.decoder.gradient_checkpointing)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own RetNetCache

    def _sync(self) -> RetNet:
        """The RetNet, with its train/eval flag set as ours (its modules already follow)."""
        retnet = self.retnet
        retnet.training = self.training
        # transformers may replace the modules (loading, resizing): the RetNet must see ours.
        for name in ("embed_tokens", "embedding_norm", "decoder", "lm_head"):
            if getattr(retnet, name) is not getattr(self, name):
                setattr(retnet, name, getattr(self, name))
        return retnet

    # -- forward -------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        inputs_embeds: Tensor | None = None,
        num_items_in_batch: int | Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple[Any, ...]:
        cache = pick_cache(kwargs)
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise TypeError(f"YaRetNetForCausalLM.forward got unexpected arguments {unknown}")
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a (batch, length) tensor")
        retnet = self._sync()
        cache = self._check_cache(cache, input_ids.shape[0])
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = cache.state if cache is not None else None
        mask = self._new_token_mask(attention_mask, input_ids, cache)
        keep = int(logits_to_keep) if not isinstance(logits_to_keep, Tensor) else None

        token_mask = retnet._check_inputs(input_ids, state, None, None, labels, mask)
        if (keep == 1 and labels is None and input_ids.shape[1] > 1 and not torch.is_grad_enabled()):
            # A prompt in generate: what RetNet.prefill runs (chunkwise, last position only).
            out = retnet._forward(input_ids, state, "chunkwise", None, None, token_mask, last_logits_only=True)
        else:
            out = retnet._forward(input_ids, state, None, None, labels, token_mask)
        logits = out.logits
        if isinstance(logits_to_keep, Tensor):
            logits = logits[:, logits_to_keep]
        elif keep and logits.shape[1] > keep:
            logits = logits[:, -keep:]

        loss = out.loss
        if loss is not None and num_items_in_batch is not None:
            # Trainer's gradient accumulation: the sum over the batch's scored tokens divided by
            # the count over all accumulated batches, not each batch's mean.
            scored = (labels[:, 1:] != -100).sum()  # type: ignore[index]
            loss = loss * scored / torch.as_tensor(num_items_in_batch, device=loss.device)

        new_cache = None
        if use_cache and not self.training:
            new_cache = cache if cache is not None else RetNetCache()
            new_cache.update_state(out.state, input_ids.shape[1])
        output = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: new_cache})
        if return_dict is False:
            return output.to_tuple()
        return output

    def _check_cache(self, cache: Any, batch_size: int) -> RetNetCache | None:
        if cache is None:
            return None
        if not isinstance(cache, RetNetCache):
            if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
                return None  # an empty cache of another kind (made by transformers): start afresh
            raise TypeError(f"cache must be a RetNetCache, got {type(cache).__name__}")
        if cache.state is not None:
            if cache.state.batch_size != batch_size:
                raise ValueError(f"the cache holds the state of {cache.state.batch_size} sequences but input_ids "
                                 f"has {batch_size} rows")
            self.retnet.decoder.check_state(cache.state, batch_size)
        return cache

    @staticmethod
    def _new_token_mask(attention_mask: Tensor | None, input_ids: Tensor, cache: RetNetCache | None) -> Tensor | None:
        """The attention mask of the new tokens: transformers passes the whole sequence's."""
        if attention_mask is None:
            return None
        seen = cache.seen_tokens if cache is not None else 0
        if seen and attention_mask.dim() == 2 and attention_mask.shape[1] == seen + input_ids.shape[1]:
            return attention_mask[:, seen:]
        return attention_mask

    # -- generation ----------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the cache has not read yet; their part of the attention mask."""
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        cache = pick_cache(kwargs)
        seen = cache.get_seq_length() if isinstance(cache, RetNetCache) else 0
        inputs: dict[str, Any] = {"input_ids": input_ids[:, seen:]}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, seen:]
        if isinstance(cache, RetNetCache):
            inputs[CACHE_KWARG] = cache
        if use_cache is not None:
            inputs["use_cache"] = use_cache
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    # -- files ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, but a weight missing from the file, or one the model
        does not have, raises ``ValueError`` (transformers would initialise or drop it)."""
        want_info = bool(kwargs.pop("output_loading_info", False))
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys", ()))
        unexpected = sorted(info.get("unexpected_keys", ()))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
        if missing or unexpected or mismatched:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{source} does not match its config: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, wrong shape {mismatched[:5]}")
        model._sync()
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``; the tokenizer files of the directory the model was
        loaded from (if any) are copied along."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        source = Path(str(getattr(self, "name_or_path", "") or ""))
        target = Path(save_directory)
        if source.is_dir() and source.resolve() != target.resolve():
            from ..models.checkpoint import atomic_write

            for name in TOKENIZER_FILES:
                if (source / name).is_file() and not (target / name).exists():
                    atomic_write(target / name, lambda tmp, src=source / name: shutil.copyfile(src, tmp))
        return result

    @classmethod
    def from_retnet(cls, model: RetNet, **config_kwargs: Any) -> YaRetNetForCausalLM:
        """Wrap an existing :class:`RetNet` (its parameters, not copies), with transformers' config
        keys (``eos_token_id=...``) as keywords."""
        config = YaRetNetConfig.from_retnet_config(model.config, **config_kwargs)
        with torch.device("meta"):  # a shell: every module is replaced by the model's own
            wrapped = cls(config)
        wrapped.__dict__["retnet"] = model
        for name, module in model.named_children():
            setattr(wrapped, name, module)
        if model.embedding_norm is None:
            wrapped.embedding_norm = None
        wrapped.train(model.training)
        return wrapped
