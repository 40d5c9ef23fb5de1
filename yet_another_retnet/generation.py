"""Text generation for RetNet: chunkwise prompt prefill, then O(1) recurrent decoding.

:class:`GenerationMixin` gives a model ``generate`` and ``stream_generate``. It relies only on the
model's ``_forward(input_ids, state, mode, chunk_size, labels, token_mask)``, ``_check_inputs`` and
``_pick_inputs``, so it knows nothing of the model's internals.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import Tensor


def _check_generation_args(
    max_new_tokens: object, do_sample: bool, temperature: object, top_k: object, top_p: object,
    eos_token_id: object, pad_token_id: object, vocab_size: int,
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, int | float) or isinstance(temperature, bool):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if do_sample and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0 when sampling, got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    for name, token in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if token is not None and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size):
            raise ValueError(f"{name} must be a token id in [0, {vocab_size}) or None, got {token!r}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to ``-inf`` every logit outside the ``top_k`` largest and the ``top_p`` nucleus.

    ``logits`` ``(batch, vocab)``; the most likely token always survives.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p.
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """Pick one token per row from ``logits`` ``(batch, vocab)``: argmax, or a filtered sample."""
    if not do_sample:
        return logits.argmax(dim=-1)
    # Shifted so the best logit is 0 before scaling: a tiny temperature sends the others to -inf
    # (greedy in the limit) instead of sending every logit to +-inf and the softmax to NaN.
    logits = logits.float()
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GenerationMixin:
    """``generate`` and ``stream_generate`` for a model with a stateful ``_forward``."""

    config: Any
    _forward: Any
    _check_inputs: Any
    _pick_inputs: Any
    step_: Any
    training: bool  # nn.Module's

    def _check_prompt(self, input_ids: object, state: object, attention_mask: object,
                      chunk_size: object, embeds: bool = False) -> Tensor | None:
        token_mask: Tensor | None = self._check_inputs(input_ids, state, None, chunk_size, None, attention_mask,
                                                       embeds=embeds)
        assert isinstance(input_ids, Tensor)
        name = "inputs_embeds" if embeds else "input_ids"
        if input_ids.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one prompt token per row")
        if input_ids.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one row (got a batch of 0)")
        if token_mask is not None and not bool(token_mask.any(1).all()):
            raise ValueError("attention_mask: every row needs at least one real (1) prompt token")
        if token_mask is not None and not bool(token_mask[:, -1].all()):
            # The new tokens follow the last column: after right padding they would continue it.
            raise ValueError("attention_mask: prompts must be left-padded for generation (zeros only before a "
                             "row's real tokens), got padding after them")
        return token_mask

    def prefill(
        self,
        input_ids: Tensor | None = None,
        state: Any = None,
        attention_mask: Tensor | None = None,
        chunk_size: int | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Any:
        """Read a prompt ``input_ids`` ``(batch, length)``: a ``RetNetOutput`` with the logits at
        its last position ``(batch, 1, vocab)`` and the state after it.

        What :meth:`stream_generate` starts from, for a caller with a decoding loop of its own:
        hand the state to ``model(next_ids, state=...)``. The prompt runs in chunkwise form
        without autograd, and the last layer computes only what its last position and the state
        need, so this does less work than ``model(input_ids)`` (whose logits at the last position
        and state are the same, to rounding). ``state`` continues an earlier sequence;
        ``attention_mask`` marks left padding (on a first call only). ``inputs_embeds``
        ``(batch, length, d_model)`` in place of ``input_ids``: a prompt of embeddings (a soft
        prompt), as for ``forward``.
        """
        prompt = self._pick_inputs(input_ids, inputs_embeds)
        token_mask = self._check_prompt(prompt, state, attention_mask, chunk_size, embeds=inputs_embeds is not None)
        with torch.no_grad():
            return self._forward(prompt, state, "chunkwise", chunk_size, None, token_mask, last_logits_only=True)

    def stream_generate(
        self,
        input_ids: Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
        chunk_size: int | None = None,
        inputs_embeds: Tensor | None = None,
        cuda_graph: bool = False,
    ) -> Iterator[Tensor]:
        """Yield the next token of every row, ``(batch,)`` long, one step at a time.

        The prompt ``input_ids`` ``(batch, length)`` (or ``inputs_embeds`` ``(batch, length,
        d_model)``, a prompt of embeddings as ``forward`` takes them) is prefilled in chunkwise
        form; each new token costs one recurrent step, whatever the context length. Rows that
        produced ``eos_token_id`` yield ``pad_token_id`` (default: the eos id) from then on; the
        stream ends after ``max_new_tokens`` (required) or when every row has finished.

        ``cuda_graph=True`` (a model on a CUDA device) runs the steps as replays of one captured
        CUDA graph (:class:`~yet_another_retnet.models.cuda_graph.GraphedDecoder`): one launch per
        token instead of a dozen per layer, the same numbers.
        """
        _check_generation_args(max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
                               pad_token_id, self.config.vocab_size)
        assert max_new_tokens is not None
        prompt = self._pick_inputs(input_ids, inputs_embeds)
        token_mask = self._check_prompt(prompt, None, attention_mask, chunk_size, embeds=inputs_embeds is not None)
        if self.training and (self.config.dropout > 0 or self.config.activation_dropout > 0):
            # A model is built in training mode (nn.Module's default): its dropout would make two
            # greedy calls on one prompt disagree.
            warnings.warn("generating in training mode: dropout is active, so the tokens change from call to "
                          "call; call model.eval() first", stacklevel=2)
        if cuda_graph and prompt.device.type != "cuda":
            raise ValueError(f"cuda_graph: a CUDA graph needs a model on a CUDA device, this one is on {prompt.device}")
        if max_new_tokens == 0:
            return
        pad = eos_token_id if pad_token_id is None else pad_token_id
        # Each model call runs under inference_mode, but never across a ``yield``: grad mode is
        # thread-local, and a generator suspended inside the context would leak it to the caller.
        with torch.inference_mode():
            out = self._forward(prompt, None, "chunkwise", chunk_size, None, token_mask, last_logits_only=True)
            finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        state, logits = out.state, out.logits[:, -1]
        graphed = None
        if cuda_graph and max_new_tokens > 1:
            from .models.cuda_graph import GraphedDecoder

            # The steps write positions up to the last row's next one plus max_new_tokens - 2.
            top = int(state.position.max()) if state.position.numel() else 0
            graphed = GraphedDecoder(cast(Any, self), state, max_position=top + max_new_tokens)
        for step in range(max_new_tokens):
            with torch.inference_mode():
                token = next_tokens(logits, do_sample, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    assert pad is not None
                    token = torch.where(finished, torch.full_like(token, pad), token)
                    finished = finished | (token == eos_token_id)
            # An inference tensor would refuse the caller's in-place edits: hand out a normal one.
            yield token.clone()
            if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
                return
            # The state is this loop's alone: stepped in place, nothing allocated per token.
            logits = self.step_(token, state) if graphed is None else graphed.step(token)

    def generate(
        self,
        input_ids: Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        pad_token_id: int | None = None,
        chunk_size: int | None = None,
        inputs_embeds: Tensor | None = None,
        cuda_graph: bool = False,
    ) -> Tensor:
        """The prompt followed by up to ``max_new_tokens`` (required) tokens: ``(batch, prompt +
        new)`` long; from ``inputs_embeds`` (a prompt of embeddings, no ids) the new tokens alone
        ``(batch, new)``, as transformers returns them.

        Greedy by default; ``do_sample=True`` samples with ``temperature``, ``top_k`` and
        ``top_p`` from ``generator``. Left-padded prompts (``attention_mask`` 0 on the left) give
        each row what its prompt gives alone. Generation stops early once every row has emitted
        ``eos_token_id``. ``cuda_graph=True``: see :meth:`stream_generate`.
        """
        new = list(self.stream_generate(
            input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
            attention_mask, generator, pad_token_id, chunk_size, inputs_embeds, cuda_graph,
        ))
        prompt = self._pick_inputs(input_ids, inputs_embeds)  # (stream_generate checked them)
        tokens = (torch.stack(new, dim=1) if new
                  else torch.zeros(prompt.shape[0], 0, dtype=torch.long, device=prompt.device))
        if input_ids is None:  # embeddings: no prompt ids to repeat
            return tokens
        return torch.cat([input_ids, tokens.to(input_ids.dtype)], dim=1)
