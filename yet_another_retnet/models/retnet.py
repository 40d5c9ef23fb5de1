"""The RetNet language model: embedding, pre-norm retention blocks, final norm, LM head.

    x = embed(ids) * embed_scale            (then an optional embedding norm)
    for each layer:
        x = alpha * x + MSR(norm(x))        (alpha = residual_scale, 1 unless DeepNorm)
        x = alpha * x + FFN(norm(x))
    logits = head(norm(x))

The same weights run in three modes that give the same logits: ``parallel`` (training, short
inputs), ``chunkwise`` (long inputs, prompt prefill) and ``recurrent`` (decoding, O(1) per token).
Every call returns a :class:`RetNetState`; handing it back continues the sequence exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..generation import GenerationMixin
from ..layers.feedforward import ACTIVATIONS, FeedForward, build_norm
from ..layers.retention import (
    MultiScaleRetention,
    RetentionState,
    _is_compiling,
    check_positions,
    linear_step,
)
from ..ops.cpu import _extension as cpu_extension
from ..ops.cpu.decode_step import LayerStepPlan
from ..ops.cpu.matmul import linear
from ..ops.cpu.memory import cached_cpu_memory
from ..ops.position import rotation_factor_table
from ..ops.retention import compute_dtype
from ..ops.segments import check_reset_mask, pack, segment_layout, unpack
from . import decoding
from .config import RetNetConfig
from .decoding import LayerTables
from .prefill import chunk_major_prefill

MODES = ("parallel", "chunkwise", "recurrent")


@dataclass
class RetNetState:
    """The whole model's state after some tokens: O(1) in their number.

    Attributes:
        memories: one ``(batch, heads, dk, dv)`` retention state per layer (float32, or float64).
        position: ``(batch,)`` int64, the absolute position of each row's next token.
    """

    memories: list[Tensor]
    position: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.position.shape[0])

    def layer(self, i: int) -> RetentionState:
        return RetentionState(self.memories[i], self.position)

    def nbytes(self) -> int:
        """Bytes held by the state (what replaces a Transformer's KV cache)."""
        return sum(m.numel() * m.element_size() for m in self.memories) + self.position.numel() * 8


@dataclass
class RetNetOutput:
    """``logits`` ``(batch, length, vocab)``, the ``state`` to continue from, and ``loss`` if asked."""

    logits: Tensor
    state: RetNetState
    loss: Tensor | None = None


class RetNetDecoderLayer(nn.Module):
    """One pre-norm block: multi-scale retention, then a feed-forward network."""

    def __init__(self, config: RetNetConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.residual_scale = config.residual_scale
        self.pre_norm = config.pre_norm
        self.branch_norm = config.post_norm_style == "branch"  # x + norm(f(x)), yet-another-retnet 0.5.1
        self.dropout = config.dropout
        self.retention_norm = build_norm(config.block_norm, config.d_model, config.norm_eps, config.bias, **kw)
        self.retention = MultiScaleRetention(
            config.d_model,
            config.num_heads,
            value_factor=config.value_factor,
            bias=config.bias,
            gate_activation=config.gate_activation,
            head_norm=config.head_norm,
            norm_eps=config.norm_eps if config.head_norm_eps is None else config.head_norm_eps,
            relative_position=config.relative_position,
            decay=config.decay,
            rotation=config.rotation,
            head_norm_weight=config.head_norm_weight,
            **kw,
        )
        self.ffn_norm = build_norm(config.block_norm, config.d_model, config.norm_eps, config.bias, **kw)
        self.ffn = FeedForward(
            config.d_model, config.ffn_dim, config.ffn, config.activation, config.bias,
            config.activation_dropout, **kw,
        )

    def _residual(self, x: Tensor, branch: Tensor, normed: bool = False) -> Tensor:
        """``alpha * x + dropout(branch)``; ``normed``: ``branch`` is already dropped and normed."""
        if not normed:
            branch = self._dropped(branch)
        return x + branch if self.residual_scale == 1.0 else x * self.residual_scale + branch

    def _dropped(self, branch: Tensor) -> Tensor:
        return F.dropout(branch, p=self.dropout, training=self.training)

    def forward(
        self,
        x: Tensor,
        state: RetentionState | None,
        mode: str,
        chunk_size: int | None = None,
        rotation: tuple[Tensor, Tensor] | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, RetentionState]:
        """``x`` ``(batch, length, d_model)`` -> same shape, and this layer's next state."""
        if not self.pre_norm:
            # Post-norm (torchscale with decoder_normalize_before off, e.g. DeepNorm).
            h, new_state, _ = self.retention.retain(x, x, x, state, mode, chunk_size, rotation, token_mask)
            if self.branch_norm:
                x = self._residual(x, self.retention_norm(h), normed=True)
                return self._residual(x, self.ffn_norm(self._dropped(self.ffn(x))), normed=True), new_state
            x = self.retention_norm(self._residual(x, h))
            return self.ffn_norm(self._residual(x, self.ffn(x))), new_state
        h = self.retention_norm(x)
        if self.residual_scale == 1.0 and (self.dropout == 0.0 or not self.training):
            # The skip connections added inside the output products (ops.mlp.linear_onto).
            x, new_state, _ = self.retention.retain(h, h, h, state, mode, chunk_size, rotation, token_mask,
                                                    residual=x)
            return self.ffn(self.ffn_norm(x), residual=x), new_state
        h, new_state, _ = self.retention.retain(h, h, h, state, mode, chunk_size, rotation, token_mask)
        x = self._residual(x, h)
        x = self._residual(x, self.ffn(self.ffn_norm(x)))
        return x, new_state

    def forward_last(
        self,
        x: Tensor,
        state: RetentionState | None,
        rotation: tuple[Tensor, Tensor] | None = None,
        token_mask: Tensor | None = None,
    ) -> tuple[Tensor, RetentionState]:
        """The output at the last position only ``(batch, 1, d_model)``, and the state after all
        of ``x`` ``(batch, length, d_model)``: what the last layer of a prompt prefill must give.

        The earlier positions' outputs would feed nothing, so they only pass on their keys and
        values (:meth:`MultiScaleRetention.absorb`): their queries, gate, output projection and
        FFN are skipped (three quarters or more of the layer's products). The last position then
        takes one recurrent step. ``rotation`` and ``token_mask`` cover all of ``x``; the last
        position must be a real token.
        """
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one position")
        if token_mask is not None and not bool(token_mask[:, -1].all()):
            raise ValueError("token_mask: the last position of every row must be a real token")
        if x.shape[1] > 1:
            prefix_rotation = None if rotation is None else (rotation[0][:, :, :-1], rotation[1][:, :, :-1])
            prefix = x[:, :-1]
            h = self.retention_norm(prefix) if self.pre_norm else prefix
            mask = None if token_mask is None else token_mask[:, :-1]
            state = self.retention.absorb(h, state, prefix_rotation, mask)
        return self(x[:, -1:], state, "recurrent")

    # ----------------------------------------------------------------------------------------
    # Single-token decoding (models/decoding.py drives it)
    # ----------------------------------------------------------------------------------------

    def decode_tables(self, dtype: torch.dtype) -> LayerTables:
        """What :meth:`step` reads besides the parameters: the retention's stacked q/k/v/g weights
        and decays, and a GLU's stacked fc1/gate weights (``None`` for a plain MLP), made afresh
        (a model keeps them in its :class:`~yet_another_retnet.models.decoding.DecodingPlan`)."""
        return decoding.layer_tables(self, dtype)

    def step(self, x: Tensor, memory: Tensor, rotation: Tensor | None,
             tables: LayerTables | None = None, in_place: bool = False) -> tuple[Tensor, Tensor]:
        """One token, inference only: ``x`` ``(batch, d_model)`` -> same, and the layer's new memory.

        The fast form of ``forward(x[:, None], state, "recurrent")`` (eval mode, no autograd).
        ``tables`` is :meth:`decode_tables` for ``memory.dtype`` (made here when ``None``);
        ``in_place``: the new memory may be written over ``memory`` (the CUDA step kernel).
        These are PyTorch ops: the reference of the one-call layer kernel that
        :meth:`RetNetDecoder.step` runs on CPU (:meth:`step_plan`), and the path everywhere else.
        """
        retention = cast(MultiScaleRetention, self.retention)
        attn_tables, glu = tables if tables is not None else self.decode_tables(memory.dtype)
        scale = self.residual_scale
        # Each residual is added inside the branch's last matrix-vector product.
        if self.branch_norm:
            h, memory = retention.step(x, memory, rotation, None, attn_tables, in_place)
            x = (x if scale == 1.0 else x * scale) + self.retention_norm(h)
            return (x if scale == 1.0 else x * scale) + self.ffn_norm(self._ffn_step(x, torch.zeros_like(x), glu)), memory
        if not self.pre_norm:
            h, memory = retention.step(x, memory, rotation, x if scale == 1.0 else x * scale, attn_tables, in_place)
            x = self.retention_norm(h)
            return self.ffn_norm(self._ffn_step(x, x if scale == 1.0 else x * scale, glu)), memory
        x, memory = retention.step(self.retention_norm(x), memory, rotation,
                                   x if scale == 1.0 else x * scale, attn_tables, in_place)
        return self._ffn_step(self.ffn_norm(x), x if scale == 1.0 else x * scale, glu), memory

    def step_plan(self, tables: LayerTables) -> LayerStepPlan | None:
        """This layer's arguments for the one-call decoding kernel
        (:func:`~yet_another_retnet.models.decoding.layer_kernel_plan`), or ``None``."""
        return decoding.layer_kernel_plan(self, tables)

    def plan_dependencies(self) -> tuple[list[tuple[dict[str, Any], str, Any]], list[Tensor]]:
        """What this layer's part of a decoding plan stays valid for
        (:func:`~yet_another_retnet.models.decoding.layer_dependencies`)."""
        return decoding.layer_dependencies(self)

    def _ffn_step(self, x: Tensor, residual: Tensor, glu: tuple[Tensor, Tensor | None] | None) -> Tensor:
        """``residual + FFN(x)`` on ``(batch, d_model)`` rows; a GLU's fc1 and gate are one matrix."""
        ffn = cast(FeedForward, self.ffn)
        act = ACTIVATIONS[ffn.activation]
        if glu is None:
            h = act(linear_step(x, ffn.fc1.weight, ffn.fc1.bias))
        else:
            h = linear_step(x, *glu)
            h = act(h[:, : ffn.fc1.out_features]) * h[:, ffn.fc1.out_features :]
        return linear_step(h, ffn.fc2.weight, ffn.fc2.bias, residual)


class RetNetDecoder(nn.Module):
    """The stack of decoder layers and the final norm, on hidden states ``(batch, length, d_model)``.

    Use it directly for a model with its own embedding or head.
    """

    def __init__(self, config: RetNetConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(RetNetDecoderLayer(config, device, dtype) for _ in range(config.num_layers))
        # A post-norm stack ends normalised already: no final norm (as in torchscale).
        self.norm = build_norm(config.block_norm, config.d_model, config.norm_eps, config.bias,
                               device=device, dtype=dtype) if config.has_final_norm else nn.Identity()
        self.gradient_checkpointing = False

    def _retention(self, i: int) -> MultiScaleRetention:
        return cast(MultiScaleRetention, self.layers[i].retention)

    def empty_state(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> RetNetState:
        first = self._retention(0)
        proto = first.empty_state(batch_size, device, dtype)
        memories = [proto.memory] + [torch.zeros_like(proto.memory) for _ in range(len(self.layers) - 1)]
        return RetNetState(memories, proto.position)

    def check_state(self, state: object, batch_size: int) -> RetNetState:
        if not isinstance(state, RetNetState):
            raise TypeError(f"state must be a RetNetState (or None), got {type(state).__name__}")
        if len(state.memories) != len(self.layers):
            raise ValueError(
                f"state has {len(state.memories)} layer memories but the model has {len(self.layers)} layers"
            )
        if state.batch_size != batch_size:
            raise ValueError(f"state is for batch size {state.batch_size} but input_ids has batch size {batch_size}")
        check_positions(state.position, batch_size, "state.position")  # once: every layer shares them
        # Every step checks this (step_ too): compare each memory with the first layer's shape,
        # dtype and device in one cheap pass, and let a layer explain a memory that differs (or
        # accept it, for a layer of another shape).
        first = self._retention(0)
        proto = (batch_size, first.num_heads, first.key_dim, first.head_dim)
        weight = first.weight_like()
        dtype, device = compute_dtype(weight.dtype), weight.device
        for i, memory in enumerate(state.memories):
            if memory.shape != proto or memory.dtype != dtype or memory.device != device:
                self._retention(i).check_memory(memory, batch_size, f"state.memories[{i}]")
        return state

    def forward(
        self,
        hidden: Tensor,
        state: RetNetState | None = None,
        mode: str = "parallel",
        chunk_size: int | None = None,
        token_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> tuple[Tensor, RetNetState]:
        """``hidden`` ``(batch, length, d_model)`` -> normed hidden states and the next state.

        ``last_only``: only the last position's hidden state ``(batch, 1, d_model)`` is wanted (a
        prompt prefill), so the last layer skips the work whose outputs only earlier positions
        read (:meth:`RetNetDecoderLayer.forward_last`); the state is the same.
        """
        # One rotation table for all layers: every layer has the same key head dim.
        rotation, next_position = self._retention(0)._positions(
            hidden, None if state is None else state.position, token_mask)
        memories = []
        for i, layer in enumerate(self.layers):
            layer_state = state.layer(i) if state is not None else None
            if last_only and i == len(self.layers) - 1:
                last = cast(RetNetDecoderLayer, layer)
                hidden, new = last.forward_last(hidden, layer_state, rotation, token_mask)
            elif self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, new = checkpoint(
                    layer, hidden, layer_state, mode, chunk_size, rotation, token_mask, use_reentrant=False
                )
            else:
                hidden, new = layer(hidden, layer_state, mode, chunk_size, rotation, token_mask)
            memories.append(new.memory)
        return self.norm(hidden), RetNetState(memories, next_position)


    def step(self, hidden: Tensor, state: RetNetState | None) -> tuple[Tensor, RetNetState]:
        """One token per row, inference only: ``hidden`` ``(batch, d_model)`` -> normed, next state.

        The fast form of ``forward(hidden[:, None], state, "recurrent")``, with the decoder's
        decoding plan (models/decoding.py); no checks. ``state`` is not modified.
        """
        if state is None:
            state = self.empty_state(hidden.shape[0], hidden.device, hidden.dtype)
        plan = decoding.decoding_plan(self, state.memories[0].dtype)
        hidden, memories = decoding.run_layers(self, hidden, state.memories, state.position, plan)
        return hidden, RetNetState(memories, state.position + 1)

    def decode_tables(self, dtype: torch.dtype) -> list[LayerTables]:
        """Every layer's :meth:`RetNetDecoderLayer.decode_tables` (made afresh)."""
        return [cast(RetNetDecoderLayer, layer).decode_tables(dtype) for layer in self.layers]

    def _step_plans(self, dtype: torch.dtype) -> list[LayerStepPlan] | None:
        """The layer kernels' arguments of the decoding plan (``None`` unless every layer has them)."""
        return cast(list[LayerStepPlan] | None, decoding.decoding_plan(self, dtype).kernels)

    def step_layers(self, hidden: Tensor, memories: list[Tensor], rotation: Tensor | None,
                    tables: list[LayerTables], in_place: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The body of :meth:`step`: tensors in, tensors out, no cache lookups or Python-side state,
        so ``torch.compile`` can trace it whole (see :meth:`RetNet.compile_decode`). ``in_place``:
        a layer may write its new memory over the old one (the CUDA step kernel); the memories
        returned are then those tensors."""
        new_memories = []
        for layer, memory, layer_tables in zip(self.layers, memories, tables, strict=True):
            hidden, memory = cast(RetNetDecoderLayer, layer).step(hidden, memory, rotation, layer_tables, in_place)
            new_memories.append(memory)
        return self.norm(hidden), new_memories


#: CPU inputs of at least this many tokens run their forward inside :func:`cached_cpu_memory`.
_CACHE_FROM_TOKENS = 2048


class RetNet(GenerationMixin, nn.Module):
    """A RetNet language model.

    ``model(input_ids)`` returns a :class:`RetNetOutput`; ``model.generate(...)`` decodes with a
    chunkwise prefill and recurrent steps; ``save_pretrained``/``from_pretrained`` use safetensors.

    ``use_fast_path`` (default True): multi-token calls may take the fused routes of
    :mod:`~yet_another_retnet.layers.fast` and single tokens the fast decoding step of
    :mod:`~yet_another_retnet.models.decoding` (same numbers to rounding); ``False`` runs the plain
    reference everywhere.
    """

    def __init__(self, config: RetNetConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, use_fast_path: bool = True) -> None:
        super().__init__()
        if not isinstance(config, RetNetConfig):
            raise TypeError(f"config must be a RetNetConfig, got {type(config).__name__}")
        self.config = config
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model, **kw)
        self.embedding_norm = (
            build_norm(config.block_norm, config.d_model, config.norm_eps, config.bias, **kw)
            if config.embedding_norm else None
        )
        self.decoder = RetNetDecoder(config, **kw)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias, **kw)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if self.embed_tokens.weight.device.type != "meta":
            nn.init.normal_(self.embed_tokens.weight, std=config.init_std)
            if not config.tie_embeddings:
                nn.init.normal_(self.lm_head.weight, std=config.init_std)
            if self.lm_head.bias is not None:
                nn.init.zeros_(self.lm_head.bias)
        self.use_fast_path = use_fast_path

    # ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def use_fast_path(self) -> bool:
        """The one switch of the fast routes: fused multi-token calls in every retention layer and
        the fast decoding step. Setting it sets every layer's ``use_fast_path`` too."""
        return bool(self.__dict__.get("_use_fast_path", True))

    @use_fast_path.setter
    def use_fast_path(self, enabled: bool) -> None:
        self.__dict__["_use_fast_path"] = self.__dict__["_fast_decode"] = bool(enabled)
        for module in self.modules():
            if isinstance(module, MultiScaleRetention):
                module.use_fast_path = bool(enabled)

    @property
    def fast_decode(self) -> bool:
        """Deprecated: the decoding half of :attr:`use_fast_path`. Setting it switches the fast
        decoding step alone, as it always did (the layers' fused multi-token routes stay as they
        are), for one more release."""
        warnings.warn(_FAST_DECODE_DEPRECATED, DeprecationWarning, stacklevel=2)
        return bool(self.__dict__.get("_fast_decode", True))

    @fast_decode.setter
    def fast_decode(self, enabled: bool) -> None:
        warnings.warn(_FAST_DECODE_DEPRECATED, DeprecationWarning, stacklevel=3)
        self.__dict__["_fast_decode"] = bool(enabled)

    def release_decode_cache(self) -> None:
        """Free the decoding plan: the stacked q/k/v/g (and GLU) weight copies of the fast step
        (``4 d^2``-ish extra weights per layer, about 40% of a model's), and the cached rotation
        tables. The next fast step rebuilds what it needs.

        Call it after editing a weight through ``.data`` or inside ``torch.inference_mode``: the
        plan's check of each weight (storage and version counter) cannot see those edits
        (``layers/fast.py::weight_version``)."""
        decoding.release_plan(self.decoder)
        for module in self.modules():  # the quantized layers' stacked products (models/quantized.py)
            module.__dict__.pop("_qstack_cache", None)
        rotation_factor_table.cache_clear()

    def empty_state(self, batch_size: int) -> RetNetState:
        """The state before any token."""
        return self.decoder.empty_state(batch_size, self.device, self.dtype)

    def gradient_checkpointing_enable(self, enabled: bool = True) -> None:
        self.decoder.gradient_checkpointing = enabled

    def pick_mode(self, length: int, state: RetNetState | None, chunk_size: int) -> str:
        """The fastest correct form for an input of ``length`` tokens."""
        if length == 1:
            return "recurrent"
        return "parallel" if length <= chunk_size else "chunkwise"

    # ----------------------------------------------------------------------------------------

    def _check_inputs(self, input_ids: object, state: object, mode: object, chunk_size: object,
                      labels: object, attention_mask: object, embeds: bool = False) -> Tensor | None:
        """The checks of :meth:`forward`'s arguments; returns the padding mask (``None`` for none).
        ``embeds``: ``input_ids`` holds ``inputs_embeds``."""
        name = "inputs_embeds" if embeds else "input_ids"
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(input_ids).__name__}")
        if embeds:
            self._check_embeds(input_ids)
        else:
            if input_ids.dtype not in (torch.long, torch.int32):
                raise TypeError(f"input_ids must be an integer tensor (torch.long or torch.int32), got dtype "
                                f"{input_ids.dtype}")
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.device.type == "meta" or self.device.type == "meta":
            raise ValueError(f"{name} or the model's weights are meta tensors (shapes without data): load "
                             "weights (from_pretrained, load_state_dict(assign=True)) before running the model")
        if input_ids.numel() and not embeds:
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= self.config.vocab_size:
                raise IndexError(
                    f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), found values in [{low}, {high}]"
                )
        shape = tuple(input_ids.shape[:2])  # (batch, length)
        batch = shape[0]
        if state is not None:
            self.decoder.check_state(state, batch)
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.is_floating_point():
                raise TypeError("labels must be an integer tensor of shape (batch, length)")
            if tuple(labels.shape) != shape:
                raise ValueError(f"labels must have the (batch, length) of {name} {shape}, got {tuple(labels.shape)}")
            if labels.dtype == torch.bool:
                raise TypeError("labels must be an integer tensor of shape (batch, length), got dtype torch.bool")
            scored = labels[labels != -100]
            if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= self.config.vocab_size):
                raise IndexError(f"labels must lie in [0, vocab_size={self.config.vocab_size}) or be -100 (ignored), "
                                 f"found values in [{int(scored.min())}, {int(scored.max())}]")
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != shape:
            raise ValueError(
                f"attention_mask must have the (batch, length) of {name} {shape}, got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"attention_mask must hold only 0 and 1, got values {attention_mask.unique().tolist()[:8]}")
        mask = attention_mask.to(torch.bool)
        if bool(mask.all()):
            return None
        # A row's real tokens must be one run: padding before it (left) and after it (right, moved
        # to the left inside _forward). A hole would need the state to skip a step; padding
        # after a state would shift positions.
        runs = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0].long()  # where a run of ones starts
        if bool((runs > 1).any()):
            raise ValueError("attention_mask must mark one run of real tokens per row (padding on the left "
                             "and/or the right), got a row with zeros between ones")
        if state is not None:
            raise ValueError("attention_mask with padding is only supported on a sequence's first call (state=None)")
        return mask

    def _check_embeds(self, inputs_embeds: Tensor) -> None:
        """``inputs_embeds`` must be what the embedding table gives: ``(batch, length, d_model)`` in
        the model's dtype, on its device."""
        d = self.config.d_model
        if not inputs_embeds.is_floating_point():
            raise TypeError(f"inputs_embeds must be a floating-point tensor (batch, length, d_model={d}), got dtype "
                            f"{inputs_embeds.dtype} (token ids go in input_ids)")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d:
            raise ValueError(f"inputs_embeds must have shape (batch, length, d_model={d}), got "
                             f"{tuple(inputs_embeds.shape)}")
        if inputs_embeds.dtype != self.dtype:
            raise TypeError(f"inputs_embeds has dtype {inputs_embeds.dtype} but the model's embeddings are "
                            f"{self.dtype}: cast it (inputs_embeds.to(model.dtype))")
        if inputs_embeds.device != self.device and "meta" not in (inputs_embeds.device.type, self.device.type):
            raise ValueError(f"inputs_embeds is on {inputs_embeds.device}, the model on {self.device}")

    def forward(
        self,
        input_ids: Tensor | None = None,
        state: RetNetState | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        reset_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> RetNetOutput:
        """Logits for ``input_ids`` ``(batch, length)``, continuing from ``state`` if given.

        Args:
            inputs_embeds: ``(batch, length, d_model)`` in place of ``input_ids``: what
                ``embed_tokens`` gives for token ids (soft prompts, other modalities' features),
                in the model's dtype. The model's embedding scale and norm, if any, apply to it as
                to looked-up ids. Every argument below works with it; ``labels`` are still ids.
            mode: ``"parallel"``, ``"chunkwise"``, ``"recurrent"`` or ``None`` (fastest correct).
            chunk_size: chunk length in chunkwise mode (default: ``config.chunk_size``).
            labels: ``(batch, length)`` targets; the loss is next-token cross entropy (labels are
                shifted inside), positions labelled ``-100`` ignored.
            attention_mask: ``(batch, length)``, 1 for real tokens, 0 for padding on the left or
                the right of them (one run of real tokens per row; first call only). Right-padded
                rows give what the row alone gives: the same logits at its real tokens and the
                state after its last real token; the padding's logits are meaningless.
            reset_mask: ``(batch, length)`` bool, True where a packed document starts: the
                recurrent state and the positions restart there, in every mode, as if each
                document ran alone (needs ``state=None``, no padding). The returned state is
                each row's last document's.
        """
        inputs = self._pick_inputs(input_ids, inputs_embeds)
        token_mask = self._check_inputs(inputs, state, mode, chunk_size, labels, attention_mask,
                                        embeds=inputs_embeds is not None)
        if reset_mask is not None:
            return self._forward_documents(inputs, mode, chunk_size, labels, token_mask, state, reset_mask)
        return self._forward(inputs, state, mode, chunk_size, labels, token_mask)

    @staticmethod
    def _pick_inputs(input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        """The one of ``input_ids`` and ``inputs_embeds`` given (the private forms below take
        either: embeddings are the floating-point one)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return cast(Tensor, input_ids if inputs_embeds is None else inputs_embeds)

    def _forward_documents(self, input_ids: Tensor, mode: str | None, chunk_size: int | None,
                           labels: Tensor | None, token_mask: Tensor | None, state: RetNetState | None,
                           reset_mask: Tensor) -> RetNetOutput:
        """:meth:`forward` with documents packed in rows: each document gets a row of its own
        (:mod:`~yet_another_retnet.ops.segments`, left-padded), so every form and every fast path
        runs it alone; the outputs go back to their places."""
        if state is not None:
            raise ValueError("reset_mask: packed documents start from an empty state (state must be None)")
        if token_mask is not None:
            raise ValueError("reset_mask cannot be combined with padding in attention_mask")
        batch, length = input_ids.shape[:2]
        seg = segment_layout(check_reset_mask(reset_mask.to(input_ids.device), (batch, length)))
        valid = seg.valid if input_ids.dim() == 2 else seg.valid[:, :, None]  # (embeddings: a vector a token)
        packed = torch.where(valid, pack(input_ids, seg), torch.zeros((), dtype=input_ids.dtype,
                                                                      device=input_ids.device))
        out = self._forward(packed, None, mode, chunk_size, None, seg.valid if seg.padded else None)
        logits = unpack(out.logits, seg, batch, length)
        new_state = RetNetState([m[seg.last] for m in out.state.memories], seg.lengths[seg.last])
        return RetNetOutput(logits, new_state, None if labels is None else self._lm_loss(logits, labels))

    def _forward_right_padded(self, input_ids: Tensor, mode: str | None, chunk_size: int | None,
                              labels: Tensor | None, token_mask: Tensor, last_logits_only: bool) -> RetNetOutput:
        """:meth:`_forward` of rows with padding after their real tokens (what transformers'
        collators make): each row is rotated so that its padding comes first, run left-padded
        (padding adds nothing to the state, and the zero state before a row's first token is
        not changed by decay), and its logits rotated back. A row's real tokens see exactly
        what they see alone, and the state is the one after its last real token."""
        batch, length = input_ids.shape[:2]
        columns = torch.arange(length, device=input_ids.device)
        # Trailing zeros of each row (a row of padding only has none: it is left padding).
        last_real = torch.where(token_mask, columns, -1).amax(1)
        shift = torch.where(last_real >= 0, length - 1 - last_real, 0)[:, None]
        source = (columns - shift) % length  # rotated[:, i] = original[:, i - shift]
        rows = source if input_ids.dim() == 2 else source[:, :, None].expand(input_ids.shape)
        out = self._forward(input_ids.gather(1, rows), None, mode, chunk_size, None, token_mask.gather(1, source))
        back = ((columns + shift) % length)[:, :, None].expand(batch, length, out.logits.shape[-1])
        logits = out.logits.gather(1, back)
        loss = None if labels is None else self._lm_loss(logits, labels)
        return RetNetOutput(logits[:, -1:] if last_logits_only else logits, out.state, loss)

    def _forward(
        self,
        input_ids: Tensor,
        state: RetNetState | None,
        mode: str | None,
        chunk_size: int | None,
        labels: Tensor | None = None,
        token_mask: Tensor | None = None,
        last_logits_only: bool = False,
    ) -> RetNetOutput:
        """The unchecked forward, of token ids ``(batch, length)`` or embeddings ``(batch, length,
        d_model)`` (``inputs_embeds``). ``last_logits_only`` returns logits for the last position
        only ``(batch, 1, vocab)``: a prompt prefill needs no more, and at a large vocabulary and
        long prompt the full logits would dwarf the state."""
        ids = not input_ids.is_floating_point()
        if token_mask is not None and input_ids.shape[1] and bool((token_mask.any(1) & ~token_mask[:, -1]).any()):
            return self._forward_right_padded(input_ids, mode, chunk_size, labels, token_mask, last_logits_only)
        chunk = chunk_size or self.config.chunk_size
        mode = mode or self.pick_mode(input_ids.shape[1], state, chunk)
        if (mode == "recurrent" and input_ids.shape[1] == 1 and self.__dict__.get("_fast_decode", True)
                and labels is None and ids
                and token_mask is None and not self.training and not torch.is_grad_enabled()):
            # Decoding: the fast single-token step (same numbers as the layer-by-layer path).
            return self._decode_step(input_ids[:, 0], state)
        if (last_logits_only and labels is None and token_mask is None and not self.training and ids
                and self.__dict__.get("_quantization") is not None):  # a short prompt: the int8/int4 kernels
            from .quantized import short_prompt_prefill
            short = short_prompt_prefill(self, input_ids, state)
            if short is not None:
                return short
        if last_logits_only and labels is None and mode == "chunkwise" and not self.training:
            # A long prompt's prefill: chunk-major, its peak memory set by a segment (models/prefill.py).
            done = chunk_major_prefill(self, input_ids, state, chunk, token_mask)
            if done is not None:
                return RetNetOutput(self._head(done[0]), done[1])
        # Long CPU inputs: every layer asks for the same large buffers, so reuse the previous
        # layer's instead of page-faulting fresh ones (8k-token d768 prefill +7-20%, ops/cpu/memory.py).
        reuse = (input_ids.device.type == "cpu" and input_ids.shape[0] * input_ids.shape[1] >= _CACHE_FROM_TOKENS
                 and not _is_compiling())
        with cached_cpu_memory() if reuse else contextlib.nullcontext():
            x = self._embed(input_ids)
            x = F.dropout(x, p=self.config.dropout, training=self.training)
            last_only = last_logits_only and labels is None and input_ids.shape[1] > 0
            hidden, new_state = self.decoder(x, state, mode, chunk, token_mask, last_only=last_only)
            logits = self._head(hidden)
        loss = None if labels is None else self._lm_loss(logits, labels)
        return RetNetOutput(logits, new_state, loss)

    @staticmethod
    def _lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
        # Position t predicts token t + 1; the last position predicts nothing (-100, ignored).
        # Shifting the labels, not slicing the logits: with a batch, logits[:, :-1] is not
        # contiguous, so its reshape copies the logits and its backward fills a zero tensor.
        # Half-precision logits are scored in float32; float64 ones stay float64.
        targets = F.pad(labels[:, 1:].long(), (0, 1), value=-100)
        scores = logits.reshape(-1, logits.shape[-1])
        scores = scores if scores.dtype == torch.float64 else scores.float()
        return F.cross_entropy(scores, targets.reshape(-1), ignore_index=-100)

    def _head(self, hidden: Tensor) -> Tensor:
        """Logits of hidden states ``(..., d_model)``; a quantized head runs its own product."""
        if isinstance(self.lm_head, nn.Linear):
            return linear(hidden, self.lm_head.weight, self.lm_head.bias)
        return cast(Tensor, self.lm_head(hidden))

    def _embed(self, input_ids: Tensor) -> Tensor:
        """Token ids ``(batch, ...)`` -> embeddings ``(batch, ..., d_model)``, scaled and normed
        (``inputs_embeds``, floating point, skip the table)."""
        x = input_ids if input_ids.is_floating_point() else self.embed_tokens(input_ids)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        return x if self.embedding_norm is None else self.embedding_norm(x)

    # ----------------------------------------------------------------------------------------
    # Fast decoding
    # ----------------------------------------------------------------------------------------

    def compile_decode(self, enabled: bool = True, *, keep_kernel_steps: bool = True,
                       **compile_options: Any) -> RetNet:
        """Run the fast decoding step through ``torch.compile`` (``False`` goes back to eager).

        The whole step (embedding, every layer, final norm, LM head) becomes one graph: inductor
        fuses the ~25 small ops per layer into a few kernels, and the matrix-vector products stay
        calls of the gemv kernel (:mod:`yet_another_retnet.ops.gemv`). On CPU with the package's
        extension, the eager step runs each layer as one C++ call and is the faster of the two
        (the graph pays a guard check and one call per product on every step): by default
        (``keep_kernel_steps=True``) a step those kernels take (up to 32 rows, CPU float32 or
        bfloat16) stays on them and the graph runs the others (more rows, other devices and
        dtypes, layers the kernel does not know). ``keep_kernel_steps=False`` sends every step
        through the graph. ``use_fast_path`` cannot say this (both are fast routes), so the
        keyword stays: it is how tests and benchmarks reach the graph where the kernels exist.

        The first step of each batch size and dtype that takes the graph compiles (inductor caches
        the code on disk for later processes); prefill and training are unaffected. Numbers match
        the eager step to rounding (tested). Extra keyword arguments go to ``torch.compile``;
        ``dynamic=False`` is the default. Returns ``self``.
        """
        decoding.compile_decode(self, enabled, keep_kernel_steps, compile_options)
        return self

    def compile_chunkwise(self, enabled: bool = True, *, keep_kernel_calls: bool = True,
                          **compile_options: Any) -> RetNet:
        """Run each retention layer's multi-token chunkwise form through ``torch.compile``.

        Training and prompt prefill in ``"chunkwise"`` mode (float32/float64, self-retention) then
        run projections, rotation, chunkwise retention, head norm and gate of a layer as one graph,
        forward and backward: inductor fuses the element-wise work between the matrix products.
        It is for where the package's CPU kernels do not apply (other devices and dtypes, no C++
        toolchain): where they do, they fuse that work already, and on CPUs where ``ops/cpu/matmul.py``
        chose oneDNN for the products a graph's products stay on ATen's, slower than eager. So by
        default (``keep_kernel_calls=True``) a CPU float32 call, where the kernels are built, stays
        eager; ``keep_kernel_calls=False`` sends it to the graph too (``use_fast_path`` cannot say
        this: both are fast routes; the route table is in :mod:`yet_another_retnet.layers.fast`).
        Every layer shares the compiled code; the first call of each new length and chunk size
        compiles. Parallel and recurrent modes are unaffected. ``False`` goes back to eager. Extra
        keyword arguments go to ``torch.compile`` (``dynamic=False`` by default). Returns ``self``.
        """
        options: dict[str, Any] = {"dynamic": False, **compile_options}
        if enabled:
            cpu_extension.load()  # the kernels decided (and built) now, not while tracing
        for module in self.modules():
            if isinstance(module, MultiScaleRetention):
                if enabled:
                    module.__dict__["_compiled_chunkwise"] = (torch.compile(module._fused_chunkwise, **options),
                                                              keep_kernel_calls)
                else:
                    module.__dict__.pop("_compiled_chunkwise", None)
        return self

    def _decode_step(self, ids: Tensor, state: RetNetState | None, in_place: bool = False) -> RetNetOutput:
        """One token per row ``(batch,)`` through the fast step (models/decoding.py); ``in_place``:
        the layer kernels write the new memories over ``state``'s (see :meth:`step_`)."""
        if self.__dict__.get("_quantization") is not None:  # int8 weights: models/quantized.py
            from .quantized import quantized_decode_step

            return quantized_decode_step(self, ids, state, in_place)
        if state is None:
            state = self.empty_state(ids.shape[0])
        logits, memories = decoding.decode_logits(self, ids, state.memories, state.position, in_place)
        return RetNetOutput(logits[:, None], RetNetState(memories, state.position + 1))

    def step_(self, ids: Tensor, state: RetNetState) -> Tensor:
        """One decoding step that overwrites ``state`` with the next one: for a loop that owns its
        state (the serving engine) and keeps no earlier copy. Same numbers as
        ``self(ids[:, None], state=state)``; nothing is allocated for the new state, where a fresh
        one is 4 MB a layer per row at the 1.3B configuration (glibc maps and faults in such
        blocks anew each time).

        Args:
            ids: ``(batch,)`` one token per row.
            state: the rows' :class:`RetNetState`; its memories and positions are updated in place.

        Returns the logits ``(batch, vocab)``.
        """
        if not isinstance(state, RetNetState):
            raise TypeError(f"state must be a RetNetState, got {type(state).__name__}")
        if ids.dim() != 1 or ids.shape[0] != state.position.shape[0]:
            raise ValueError(f"ids must be (batch,) with the state's batch of {state.position.shape[0]}, "
                             f"got {tuple(ids.shape)}")
        # The kernels would fail on a misfit state with messages that do not name it, or (a
        # negative position) read the rotation table from its end.
        self.decoder.check_state(state, ids.shape[0])
        with torch.inference_mode():
            if not self.training and self.__dict__.get("_fast_decode", True):
                out = self._decode_step(ids, state, in_place=True)
            else:
                out = self._forward(ids[:, None], state, "recurrent", None)
            assert out.state is not None
            for memory, new in zip(state.memories, out.state.memories, strict=True):
                if new is not memory:  # a layer the kernels did not take, or another route
                    memory.copy_(new)
            state.position.add_(1)
        return out.logits[:, -1]

    def _decode_logits(self, ids: Tensor, memories: list[Tensor], rotation: Tensor | None,
                       tables: list[LayerTables], in_place: bool = False) -> tuple[Tensor, list[Tensor]]:
        """``(logits (batch, vocab), new memories)`` for one token per row: what
        :meth:`compile_decode` compiles (tensors in, tensors out, no Python-side lookups).
        ``in_place`` as for :meth:`RetNetDecoder.step_layers`."""
        hidden, memories = self.decoder.step_layers(self._embed(ids), memories, rotation, tables, in_place)
        return linear_step(hidden, self.lm_head.weight, self.lm_head.bias), memories

    # ----------------------------------------------------------------------------------------
    # Checkpoints and conversion live in their own modules; these are the entry points.
    # ----------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``, atomically; a model
        bigger than ``max_shard_size`` (default ``"5GB"``) goes into shards with an index. A
        quantized model is written in its quantized format (one file; see ``models/quantized.py``)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, verify: bool | None = None,
                        quantize: str | None = None) -> RetNet:
        """Load a model written by :meth:`save_pretrained` (or a quantized one, ``retnet quantize``).

        ``verify``: check the weights against the checksum saved with them (default: yes, unless
        ``YARETNET_VERIFY_WEIGHTS=0``). ``quantize="int8"`` quantizes the projections and head on
        load (``models/quantized.py``).
        """
        from .checkpoint import load_pretrained
        from .quantized import check_method, load_quantized, quantize_model, saved_quantization

        if quantize is not None:
            check_method(quantize)
        saved = saved_quantization(Path(directory)) if Path(directory).is_dir() else None
        if saved is not None:
            if quantize not in (None, saved):
                raise ValueError(f"quantize={quantize!r}: {directory} holds {saved} weights already")
            return load_quantized(cls, Path(directory), device=device, dtype=dtype, verify=verify)
        model = load_pretrained(cls, directory, device=device, dtype=dtype, verify=verify)
        return model if quantize is None else quantize_model(model, quantize)
    @classmethod
    def from_fla(cls, path_or_state_dict: str | Path | dict[str, Tensor], config: dict[str, Any] | None = None,
                 dtype: torch.dtype | None = None) -> RetNet:
        """A flash-linear-attention RetNet (``fla-hub/retnet-*``): a checkpoint directory, or a
        state dict with its fla config dict. See :mod:`yet_another_retnet.models.fla`."""
        from .fla import from_fla

        return from_fla(cls, path_or_state_dict, config, dtype=dtype)

    def to_fla(self, directory: str | Path, max_shard_size: int | str | None = None) -> None:
        """Write this model as an fla checkpoint (``config.json`` + safetensors) to ``directory``."""
        from .fla import save_fla

        save_fla(self, directory, max_shard_size)

    @classmethod
    def from_torchscale(cls, state_dict: dict[str, Tensor], config: Any) -> RetNet:
        """Build a model in torchscale's architecture from its ``RetNetDecoder`` weights.

        ``config`` is torchscale's ``RetNetConfig`` or a dict of its fields.
        """
        from .torchscale import from_torchscale

        return from_torchscale(cls, state_dict, config)

    @classmethod
    def from_syncdoth(cls, path_or_state_dict: str | Path | dict[str, Tensor], config: dict[str, Any] | None = None,
                      dtype: torch.dtype | None = None) -> RetNet:
        """A syncdoth/RetNet ``RetNetForCausalLM``: a checkpoint directory, or a state dict with
        its config dict. See :mod:`yet_another_retnet.models.syncdoth`."""
        from .syncdoth import from_syncdoth

        return from_syncdoth(cls, path_or_state_dict, config, dtype=dtype)

    @classmethod
    def from_yar051(cls, state_dict: dict[str, Tensor], **options: Any) -> RetNet:
        """Build a model in yet-another-retnet 0.5.1's architecture from its ``RetNet``'s state dict.

        ``options`` are the 0.5.1 ``RetNet`` arguments the state dict does not show
        (``nhead``, ``norm_first``, ``activation``, ``layer_norm_eps``, ``dropout``); see
        :func:`~yet_another_retnet.models.yar051.from_yar051`.
        """
        from .yar051 import from_yar051

        return from_yar051(cls, state_dict, **options)


def count_parameters(config: RetNetConfig) -> int:
    """Parameters of a model with ``config``, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = RetNet(config, device="meta")
    return model.num_parameters()


_FAST_DECODE_DEPRECATED = ("RetNet.fast_decode is deprecated: use use_fast_path (it switches the fused multi-token "
                           "routes too); fast_decode still switches the decoding step alone for now")
