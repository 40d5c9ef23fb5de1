"""One decoding step captured as a CUDA graph and replayed for every token.

On a GPU a decoding step at batch 1 is a few hundred small kernel launches (about a dozen per
layer), and launching them costs more than running them: at fla's 1.3B sizes the weights take
~0.8 ms to read on an H100, while eager launches take several milliseconds. A CUDA graph records
the whole step once and replays it with one launch. :class:`GraphedDecoder` owns the buffers the
graph reads and writes (the token ids, the state, the positions); the step kernel writes each
layer's new state over the old one inside the graph (a layer that cannot is copied back), so a
replay needs nothing from the host but the next ids.

The step is the model's fast decoding step (:meth:`RetNet._decode_logits`, what
``compile_decode`` compiles) with the rotation read from a table indexed on the device: the eager
step sizes its table from the largest position, a host read the graph cannot make. The decoder
therefore takes ``max_position`` up front and refuses a step past it.

On CPU (``capture=False``) the same object runs the same body eagerly: how the tests check the
buffer handling without a GPU (tests/models/test_cuda_graph.py); the graph itself is checked on
CUDA there too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..ops.position import rotation_factor_table, rotation_factors

if TYPE_CHECKING:
    from .retnet import RetNet, RetNetState

__all__ = ["GraphedDecoder"]

#: Positions a rotation table holds at most; past it the graph computes the rotation per step.
_MAX_TABLE = 1 << 16


class GraphedDecoder:
    """Greedy or sampled decoding one token per row per call, through a captured CUDA graph.

    Args:
        model: an eval-mode, unquantized :class:`RetNet` with its fast decoding step on.
        state: the rows' state to start from (e.g. ``model.prefill(prompt).state``); copied, so the
            caller's is left alone.
        max_position: the largest position a step may write (e.g. the prompt's length plus the
            tokens to generate); steps past it raise ``ValueError``.
        capture: record a CUDA graph (default: when the model is on a CUDA device); ``False`` runs
            the same step eagerly, on any device.

    Call :meth:`step` with ``(batch,)`` ids for ``(batch, vocab)`` logits. The logits tensor is the
    graph's output buffer: the next step overwrites it (clone it to keep it).
    """

    def __init__(self, model: RetNet, state: RetNetState, max_position: int, capture: bool | None = None) -> None:
        device = model.lm_head.weight.device
        if capture is None:
            capture = device.type == "cuda"
        if capture and device.type != "cuda":
            raise ValueError(f"capture: a CUDA graph needs a model on a CUDA device, got {device}")
        if model.training:
            raise ValueError("model: a graphed decoder needs an eval-mode model (call model.eval())")
        if model.__dict__.get("_quantization") is not None:
            raise ValueError("model: a graphed decoder takes float weights, not a quantized model")
        if not model.__dict__.get("_fast_decode", True):
            raise ValueError("model: a graphed decoder runs the fast decoding step, which use_fast_path=False turns off")
        batch = state.position.shape[0]
        model.decoder.check_state(state, batch)
        if state.position.device != device:
            raise ValueError(f"state: on {state.position.device}, the model on {device}")
        self.model = model
        self.batch = batch
        self.max_position = int(max_position)
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.memories = [m.detach().clone() for m in state.memories]
        self.position = state.position.detach().clone()
        self._next = int(self.position.max()) if batch else 0  # the largest position the next step writes
        if self._next > self.max_position:
            raise ValueError(f"max_position: {self.max_position} is below the state's next position {self._next}")
        dtype = self.memories[0].dtype
        from . import decoding

        self._tables = decoding.decoding_plan(model.decoder, dtype).tables
        first = model.decoder._retention(0)
        self._rotation: tuple[int, str] | None = None
        self._table: Tensor | None = None
        if first.relative_position:
            self._rotation = (first.key_dim, first.rotation_kind)
            size = max(1024, 1 << (self.max_position + 1).bit_length())
            if size <= _MAX_TABLE:
                self._table = rotation_factor_table(size, first.key_dim, dtype, device, first.rotation_kind)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor
        with torch.inference_mode():
            if capture:
                self._capture()
            else:
                self.logits = torch.empty(0)

    def _body(self) -> Tensor:
        """One step on the buffers: logits ``(batch, vocab)``; the memories and positions advanced."""
        rotation = None
        if self._rotation is not None:
            if self._table is not None:
                rotation = self._table[self.position][:, :, None]
            else:
                key_dim, kind = self._rotation
                rotation = rotation_factors(self.position, key_dim, self.memories[0].dtype, kind)[:, :, None]
        logits, new = self.model._decode_logits(self.ids, self.memories, rotation, self._tables, in_place=True)
        for memory, fresh in zip(self.memories, new, strict=True):
            if fresh is not memory:  # a layer that did not update in place
                memory.copy_(fresh)
        self.position.add_(1)
        return logits

    def _capture(self) -> None:
        # Warm up outside the graph first (kernels compile and libraries set up on first use,
        # neither of which a capture may do), on a side stream as CUDA graphs require, then put
        # the buffers back as they were.
        saved = [m.clone() for m in self.memories], self.position.clone()
        side = torch.cuda.Stream(device=self.ids.device)
        side.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body()
        torch.cuda.current_stream(self.ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._body()
        for memory, copy in zip(self.memories, saved[0], strict=True):
            memory.copy_(copy)
        self.position.copy_(saved[1])
        self.graph, self.logits = graph, logits

    def step(self, ids: Tensor) -> Tensor:
        """Logits ``(batch, vocab)`` after one token per row ``ids`` ``(batch,)``; the state advances."""
        if ids.shape != (self.batch,):
            raise ValueError(f"ids must be ({self.batch},), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        # Read on the host (one sync): an id out of range would be a device-side assert inside
        # the replay, which leaves the CUDA context unusable.
        vocab = self.model.config.vocab_size
        if bool(((ids < 0) | (ids >= vocab)).any()):
            raise ValueError(f"ids must lie in [0, {vocab}), got {ids.tolist()}")
        if self._next > self.max_position:
            raise ValueError(f"max_position: this step would write position {self._next}, past {self.max_position}")
        with torch.inference_mode():
            self.ids.copy_(ids)
            if self.graph is not None:
                self.graph.replay()
            else:
                self.logits = self._body()
        self._next += 1
        return self.logits

    def state(self) -> RetNetState:
        """A copy of the rows' state now (memories and positions)."""
        from .retnet import RetNetState

        return RetNetState([m.clone() for m in self.memories], self.position.clone())
