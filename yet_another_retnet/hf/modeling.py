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

import dataclasses
import shutil
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
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
#: has no use for (positions come from its state and the attention mask; ``position_ids``,
#: ``output_attentions`` and ``output_hidden_states`` are read in ``forward``).
_IGNORED = frozenset({"cache_position", "token_type_ids", "next_sequence_length", "is_first_iteration"})


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
    ``position_ids`` that restart at 0 inside a row (transformers' ``DataCollatorWithFlattening``)
    mark packed documents, each run as if alone; other positions than the model's own count are
    refused. ``output_attentions`` and ``output_hidden_states`` are refused (``ValueError``).
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
        # resize_token_embeddings changes the embedding and our config, not the RetNet's config,
        # whose vocab_size bounds the ids it accepts: a new token would be refused.
        vocab = retnet.embed_tokens.num_embeddings
        if retnet.config.vocab_size != vocab:
            retnet.config = dataclasses.replace(retnet.config, vocab_size=vocab)
        return retnet

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``resize_token_embeddings``, with the RetNet's ``config.vocab_size``
        following at once (it bounds the ids the RetNet accepts; see :meth:`_sync`)."""
        result = super().resize_token_embeddings(*args, **kwargs)
        self._sync()
        return result

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
        position_ids = kwargs.pop("position_ids", None)
        for name in ("output_attentions", "output_hidden_states"):
            # Refused, not ignored: a caller asking for them would otherwise get None silently.
            # Retention computes no attention weights, and the fast paths (chunk-major prefill,
            # the decoding step) never hold every layer's hidden states.
            if kwargs.pop(name, None):
                raise ValueError(f"{name}=True is not supported by YaRetNetForCausalLM")
        unknown = sorted(set(kwargs) - _IGNORED)
        if unknown:
            raise TypeError(f"YaRetNetForCausalLM.forward got unexpected arguments {unknown}")
        retnet = self._sync()
        # Token ids (batch, length), or embeddings (batch, length, d_model) from inputs_embeds.
        inputs = retnet._pick_inputs(input_ids, inputs_embeds)
        if not isinstance(inputs, Tensor) or inputs.dim() != (2 if inputs_embeds is None else 3):
            raise ValueError("input_ids must be a (batch, length) tensor" if inputs_embeds is None
                             else "inputs_embeds must be a (batch, length, d_model) tensor")
        cache = self._check_cache(cache, inputs.shape[0])
        use_cache = self.config.use_cache if use_cache is None else use_cache
        state = cache.state if cache is not None else None
        mask = self._new_token_mask(attention_mask, inputs, cache)
        keep = int(logits_to_keep) if not isinstance(logits_to_keep, Tensor) else None

        token_mask = retnet._check_inputs(inputs, state, None, None, labels, mask, embeds=inputs_embeds is not None)
        starts = self._document_starts(position_ids, inputs, state, token_mask)
        # With num_items_in_batch the loss is summed here, not averaged by the RetNet.
        targets = labels if num_items_in_batch is None else None
        if starts is not None:
            out = retnet._forward_documents(inputs, None, None, targets, None, None, starts)
        elif (keep == 1 and labels is None and inputs.shape[1] > 1 and not torch.is_grad_enabled()):
            # A prompt in generate: what RetNet.prefill runs (chunkwise, last position only).
            out = retnet._forward(inputs, state, "chunkwise", None, None, token_mask, last_logits_only=True)
        else:
            out = retnet._forward(inputs, state, None, None, targets, token_mask)
        logits = out.logits
        if isinstance(logits_to_keep, Tensor):
            logits = logits[:, logits_to_keep]
        elif keep and logits.shape[1] > keep:
            logits = logits[:, -keep:]

        loss = out.loss
        if labels is not None and num_items_in_batch is not None:
            # Trainer's gradient accumulation: the sum over the batch's scored tokens divided by
            # the count over all accumulated batches, not each batch's mean (transformers'
            # ForCausalLMLoss). Summed, not mean x count: a micro-batch with no scored token
            # gives 0, where the mean of nothing is NaN.
            loss = _summed_loss(out.logits, labels) / torch.as_tensor(num_items_in_batch, device=out.logits.device)

        new_cache = None
        if use_cache and not self.training:
            new_cache = cache if cache is not None else RetNetCache()
            new_cache.update_state(out.state, inputs.shape[1])
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
    def _document_starts(position_ids: Any, inputs: Tensor, state: Any, token_mask: Tensor | None) -> Tensor | None:
        """``None`` when ``position_ids`` are absent or the positions the model counts itself (from
        the state and the padding); the ``reset_mask`` of packed documents when they restart at 0
        inside a row (``DataCollatorWithFlattening``: ``[[0, 1, 2, 0, 1]]``). Any other positions
        would be silently ignored by a RetNet, so they raise ``ValueError``."""
        if position_ids is None:
            return None
        if not isinstance(position_ids, Tensor) or position_ids.is_floating_point():
            raise ValueError("position_ids must be an integer tensor of shape (batch, length)")
        batch, length = inputs.shape[:2]
        positions = position_ids.to(inputs.device).long()
        if positions.dim() == 1:
            positions = positions[None]
        if positions.dim() != 2 or positions.shape[1] != length or positions.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must have the (batch, length) of the input {(batch, length)}, got "
                             f"{tuple(position_ids.shape)}")
        positions = positions.expand(batch, length)
        real = (token_mask if token_mask is not None
                else torch.ones(batch, length, dtype=torch.bool, device=inputs.device))
        first = state.position.to(inputs.device)[:, None] if state is not None else 0
        counted = first + real.long().cumsum(1) - 1  # padding is not counted (its position is any)
        if bool((positions == counted)[real].all()):
            return None
        previous = F.pad(positions[:, :-1], (1, 0), value=-1)
        if state is None and token_mask is None and bool(((positions == 0) | (positions == previous + 1)).all()):
            return positions == 0  # packed documents: each restarts the state, as if run alone
        raise ValueError("position_ids must count 0, 1, 2, ... from each packed document's start (reset at "
                         "0, without padding or a cache) or be the positions the model counts itself; a "
                         "RetNet cannot take other positions")

    @staticmethod
    def _new_token_mask(attention_mask: Tensor | None, inputs: Tensor, cache: RetNetCache | None) -> Tensor | None:
        """The attention mask of the new tokens: transformers passes the whole sequence's."""
        if attention_mask is None:
            return None
        seen = cache.seen_tokens if cache is not None else 0
        if seen and attention_mask.dim() == 2 and attention_mask.shape[1] == seen + inputs.shape[1]:
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
        next_sequence_length: int | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the tokens the cache has not read yet; their part of the attention mask.

        The cache is named in the signature under both of transformers' names (``cache``,
        ``past_key_values``): ``generate`` refuses model keyword arguments this signature and
        ``forward``'s do not name, so a cache passed to ``generate`` would be refused.

        ``generate(inputs_embeds=...)``: the embeddings feed the first step (transformers says
        which with ``is_first_iteration``), the sampled tokens' ids the later ones; ``input_ids``
        then holds the new tokens alone, so the later steps need the cache and transformers'
        ``next_sequence_length``.
        """
        cache = pick_cache({"cache": cache, "past_key_values": past_key_values})
        seen = cache.get_seq_length() if isinstance(cache, RetNetCache) else 0
        if inputs_embeds is not None and "is_first_iteration" not in kwargs and next_sequence_length is None:
            # transformers 4.x says neither: its input_ids start empty and then hold the sampled
            # tokens alone, one new per step.
            if input_ids.shape[1] == 0:
                kwargs["is_first_iteration"] = True
            elif seen > 0:
                next_sequence_length = 1
        if inputs_embeds is not None and kwargs.get("is_first_iteration"):
            prompt = inputs_embeds
            if next_sequence_length is not None:
                prompt = inputs_embeds[:, max(inputs_embeds.shape[1] - int(next_sequence_length), 0):]
            return self._generation_inputs({"inputs_embeds": prompt}, prompt.shape[1], attention_mask, cache,
                                           use_cache, logits_to_keep)
        if inputs_embeds is not None and (next_sequence_length is None or not isinstance(cache, RetNetCache)):
            raise ValueError("generate with inputs_embeds needs use_cache=True: the later steps read the sampled "
                             "tokens alone, on the cache of the embeddings")
        if next_sequence_length is not None:
            # transformers says how many columns are new (a cache passed to generate with the
            # whole prompt; 1 per decoding step).
            new = input_ids[:, max(input_ids.shape[1] - int(next_sequence_length), 0):]
        elif input_ids.shape[1] > seen:
            new = input_ids[:, seen:]
        else:
            new = input_ids  # only the new tokens were passed (chunked prefill hands one chunk)
        if new.shape[1] == 0:
            raise ValueError(f"the cache has read all {seen} tokens of input_ids: generation needs at least one "
                             "token it has not read (a RetNetCache keeps the state, not the last logits)")
        return self._generation_inputs({"input_ids": new}, new.shape[1], attention_mask, cache, use_cache,
                                       logits_to_keep)

    @staticmethod
    def _generation_inputs(inputs: dict[str, Any], length: int, attention_mask: Tensor | None, cache: Any,
                           use_cache: bool | None, logits_to_keep: int | None) -> dict[str, Any]:
        """``inputs`` (the new ``length`` columns) with their part of the mask and the settings."""
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, max(attention_mask.shape[1] - length, 0):]
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


def _summed_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``RetNet._lm_loss`` summed over the scored tokens instead of averaged: position t predicts
    label t + 1, -100 ignored, half precision scored in float32."""
    targets = F.pad(labels[:, 1:].long(), (0, 1), value=-100)
    scores = logits.reshape(-1, logits.shape[-1])
    scores = scores if scores.dtype == torch.float64 else scores.float()
    return F.cross_entropy(scores, targets.reshape(-1), ignore_index=-100, reduction="sum")
