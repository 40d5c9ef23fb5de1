"""Prompt prefill in constant memory: chunk-major order, the state carried between segments.

A RetNet prompt needs no cache: all that survives a prefill is each layer's ``(heads, dk, dv)``
state and the hidden state of the last position. Run layer-major (every layer over the whole
prompt, then the next layer), each layer's activations span the whole prompt, so the peak grows
with its length. :func:`chunk_major_prefill` instead cuts the prompt into *segments* of a fixed
number of tokens (a multiple of the chunk size, so the chunk boundaries and therefore the
arithmetic are those of the layer-major chunkwise form) and runs all layers over one segment before
the next, the per-layer states handed on. The peak is then set by the segment, whatever the
prompt's length; the products stay large enough (a few thousand rows) to run at full speed.

The last layer of a non-final segment only passes its keys and values on
(:meth:`~yet_another_retnet.layers.retention.MultiScaleRetention.absorb`): its outputs feed
nothing. The final segment runs :meth:`RetNetDecoder.forward` with ``last_only``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor

from ..ops.cpu.memory import cached_cpu_memory

if TYPE_CHECKING:
    from .retnet import RetNet, RetNetDecoderLayer, RetNetState

#: Tokens (summed over the batch) per segment. 2048 rows keep the matrix products at full speed
#: while one segment's activations stay small (d 768: ~180 MB, whatever the prompt).
SEGMENT_TOKENS = 2048


@functools.cache
def _libc() -> Any:
    """glibc, or ``None`` (another C library, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the heap memory freed by a segment back to the OS (glibc's ``malloc_trim``; elsewhere
    nothing).

    Why: glibc raises its mmap threshold to the size of each large block freed, so from the second
    segment on the segment's buffers come from the heap instead of fresh mappings, and the heap,
    holding blocks of the previous segment's shapes (the last layer's and the final segment's
    differ), grows ~20% above a single segment's peak. Trimming after each segment keeps a long
    prompt's peak within a few percent of one segment's (measured: docs/serving.md).
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def segment_length(batch: int, chunk: int, tokens: int = SEGMENT_TOKENS) -> int:
    """Positions per row in one segment: ``tokens / batch`` rounded down to a multiple of ``chunk``
    (at least one chunk)."""
    return max(chunk, (tokens // max(1, batch)) // chunk * chunk)


def state_tokens(model: RetNet, batch: int) -> int:
    """Tokens (summed over the batch) whose activations weigh what the carried state does: a
    segment that carries a state in gets that many fewer, so that its peak (its activations plus
    every layer's state) stays near a first segment's, which holds only the states of the layers
    it has passed. At the 1.3B configuration the state is 96 MiB a row, ~1/6 of a 2,048-token
    segment's activations; at d 768, 1.5 MiB for 4 layers, nothing.

    A token's activations are taken as six floats per column of the layer's widest projection (the
    q/k/v/g or fc1 output): measured, a 2,048-token segment peaked at ~297 KB a token at d 2048
    (widest 12,288) and ~85 KB at d 768 (4,608)."""
    config = model.config
    layer = cast("RetNetDecoderLayer", model.decoder.layers[0])
    retention, ffn = layer.retention, layer.ffn
    widest = max(2 * (retention.num_heads * (retention.key_dim + retention.head_dim)),
                 ffn.fc1.out_features * (2 if ffn.gate is not None else 1), config.d_model)
    state_floats = sum(r.num_heads * r.key_dim * r.head_dim
                       for r in (cast("RetNetDecoderLayer", m).retention for m in model.decoder.layers))
    return batch * state_floats // (6 * widest)


def chunk_major_prefill(model: RetNet, input_ids: Tensor, state: RetNetState | None, chunk: int,
                        token_mask: Tensor | None = None,
                        tokens: int | None = None) -> tuple[Tensor, RetNetState] | None:
    """``(normed hidden state of the last position (batch, 1, d_model), state after the prompt)``
    for ``input_ids`` ``(batch, length)`` (or embeddings ``(batch, length, d_model)``), or ``None``
    when the prompt fits in one segment (the caller's layer-major pass is then the same thing).

    ``token_mask`` ``(batch, length)`` marks left padding (first call only, as for the model);
    padding in a later segment belongs to a row whose state is still zero, which padding leaves
    zero. ``tokens``: per segment, summed over the batch (default :data:`SEGMENT_TOKENS`).
    Inference only: the caller runs it without autograd.
    """
    from .retnet import RetNetState  # late: retnet.py imports this module

    batch, length = input_ids.shape[:2]
    budget = SEGMENT_TOKENS if tokens is None else tokens
    seg = segment_length(batch, chunk, budget)
    if length <= seg:
        return None
    decoder = model.decoder
    layers = [cast("RetNetDecoderLayer", layer) for layer in decoder.layers]
    last = len(layers) - 1
    # Each segment reuses its own buffers from layer to layer (ops/cpu/memory.py), and hands them back
    # at its end: a cache kept across segments would hold the buffers of every shape any segment
    # used (the last one's differ), ~20% above one segment's peak.
    reuse = input_ids.device.type == "cpu"
    start = 0
    # Segments that carry a state in are shorter by what the state weighs (see state_tokens).
    carried = segment_length(batch, chunk, budget - state_tokens(model, batch))
    if state is not None:
        seg = carried
    while length - start > seg:
        ids = input_ids[:, start:start + seg]
        mask = None if token_mask is None else token_mask[:, start:start + seg]
        if mask is not None and bool(mask.all()):
            mask = None
        with cached_cpu_memory() if reuse else contextlib.nullcontext():
            x = model._embed(ids)
            rotation, next_position = decoder._retention(0)._positions(
                x, None if state is None else state.position, mask)
            memories = []
            for i, layer in enumerate(layers):
                layer_state = None if state is None else state.layer(i)
                if i < last:
                    x, new = layer(x, layer_state, "chunkwise", chunk, rotation, mask)
                else:  # its outputs feed nothing: keys and values only
                    h = layer.retention_norm(x) if layer.pre_norm else x
                    new = layer.retention.absorb(h, layer_state, rotation, mask)
                memories.append(new.memory)
            del x, h, rotation
        if reuse:
            release_freed_memory()
        state = RetNetState(memories, next_position)
        start += seg
        seg = carried
    ids = input_ids[:, start:]
    mask = None if token_mask is None else token_mask[:, start:]
    with cached_cpu_memory() if reuse else contextlib.nullcontext():
        hidden, state = decoder(model._embed(ids), state, "chunkwise", chunk, mask, last_only=True)
    return hidden, state

