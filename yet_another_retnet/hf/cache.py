"""``RetNetCache``: transformers' ``Cache`` interface around our recurrent :class:`RetNetState`.

A Transformer's cache grows with every token; ours is the O(1) state (one ``(batch, heads, dk,
dv)`` memory per layer and each row's next position) plus a count of the columns of
``input_ids`` it has read, which is what ``generate`` asks of ``get_seq_length`` to know which
tokens are new. A recurrent state cannot forget tokens, so ``crop`` refuses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import Cache as _Cache

from ..models.retnet import RetNetState
from .compat import cache_base_kwargs

# Typed as Any: its signatures differ between transformers versions (see compat.py).
Cache: Any = _Cache


class RetNetCache(Cache):
    """The state of a batch of sequences after ``seen_tokens`` columns of ``input_ids``.

    Attributes:
        state: :class:`RetNetState` (``None`` before the first token).
        seen_tokens: columns of ``input_ids`` read so far, left padding included.
    """

    def __init__(self, state: RetNetState | None = None, seen_tokens: int = 0) -> None:
        super().__init__(**cache_base_kwargs())
        self.state = state
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        rows = None if self.state is None else self.state.batch_size
        return f"RetNetCache(batch_size={rows}, seen_tokens={self.seen_tokens})"

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state.memories)

    # -- what generate reads -------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # unbounded: the state has a fixed size whatever the length

    def get_max_cache_shape(self, layer_idx: int | None = 0) -> int:
        return -1

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        raise NotImplementedError("RetNetCache holds no keys to mask: RetNet takes a 2-D attention_mask")

    @property
    def batch_size(self) -> int:
        return 0 if self.state is None else self.state.batch_size

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self)

    @property
    def is_linear(self) -> list[bool]:
        return [True] * len(self)

    # -- edits ---------------------------------------------------------------------------------

    def update_state(self, state: RetNetState, new_tokens: int) -> None:
        """Record the state after ``new_tokens`` more columns."""
        self.state = state
        self.seen_tokens += int(new_tokens)

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0

    def _select(self, index: Tensor) -> None:
        if self.state is None:
            return
        index = index.to(device=self.state.position.device, dtype=torch.long)
        if index.dim() != 1:
            raise ValueError(f"beam/batch index must be 1-D, got shape {tuple(index.shape)}")
        rows = self.state.batch_size
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
            raise IndexError(f"beam/batch index out of range for a cache of {rows} rows")
        self.state = RetNetState([m.index_select(0, index.to(m.device)) for m in self.state.memories],
                                 self.state.position.index_select(0, index))

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Keep row ``beam_idx[i]`` as row ``i`` (beam search)."""
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = RetNetState([m.repeat_interleave(repeats, dim=0) for m in self.state.memories],
                                     self.state.position.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "RetNetCache cannot be cropped: a recurrent state cannot forget tokens (no assisted decoding)")

    def update(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("RetNetCache is not a key/value cache; the model updates its state itself")
