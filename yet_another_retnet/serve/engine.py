"""Continuous batching: many requests decoded together, one token per request per step.

A RetNet request's whole context is its recurrent state, a fixed size whatever its length, so
batching requests is stacking their states along the batch axis; nothing is padded or paged.
:class:`Engine` runs one thread that owns the model and loops:

1. admit waiting requests (up to ``max_batch`` in flight): each prompt is prefilled alone and its
   state appended to the batch's;
2. pick each request's next token from its own logits with its own seeded generator (so a
   request's output does not depend on who else is in the batch);
3. drop the requests that finished or whose client went away (their rows leave the batch state);
4. one decoding step for all the rest: the batched layer kernels read each weight once per step
   for the whole batch, so 16 requests cost little more than one.

Tokens go back through each request's ``emit`` callback (called on the engine's thread).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..generation import next_tokens

#: ``emit(token, finish_reason)``: a token (``finish_reason`` ``None``), or the end (``token`` ``None``,
#: ``finish_reason`` ``"length"``, ``"stop"``, ``"cancelled"`` or ``"error: ..."``).
Emit = Callable[[int | None, str | None], None]


@dataclass
class Request:
    """One generation: prompt token ids, sampling settings, and where its tokens go."""

    ids: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    eos_token_id: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the engine.
    generated: int = 0
    next_token: int = 0
    logits: Tensor | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client went away: the engine frees the slot at its next step."""
        self.cancelled.set()


class Engine:
    """Owns ``model`` on one background thread; :meth:`submit` hands it requests."""

    def __init__(self, model: Any, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._active: list[Request] = []
        self._state: Any = None  # the active requests' states stacked, row i for _active[i]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decoding steps run (each for the whole batch)

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="retnet-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Request) -> None:
        self._waiting.put(request)

    @property
    def active(self) -> int:
        """Requests being decoded now (their slots are taken)."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if not self._active:
                    continue
                self._sample()
                if self._active:
                    self._step()
            except Exception as err:  # keep serving: fail the requests in flight, not the server
                for request in self._active:
                    request.emit(None, f"error: {type(err).__name__}: {err}")
                self._active, self._state = [], None

    def _admit(self) -> None:
        block = not self._active  # idle: wait for work (bounded, so stop() is seen)
        while len(self._active) < self.max_batch:
            try:
                request = self._waiting.get(timeout=0.05) if block else self._waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.cancelled.is_set():
                request.emit(None, "cancelled")
                continue
            try:
                with torch.inference_mode():
                    out = self.model.prefill(torch.tensor([request.ids], device=self.model.device))
            except Exception as err:
                request.emit(None, f"error: {type(err).__name__}: {err}")
                continue
            request.logits = out.logits[:, -1]
            request.generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
            self._active.append(request)
            self._state = out.state if self._state is None else _cat_states(self._state, out.state)

    def _sample(self) -> None:
        """Each request's next token; finished and cancelled ones leave the batch."""
        keep: list[int] = []
        for i, request in enumerate(self._active):
            if request.cancelled.is_set():
                request.emit(None, "cancelled")
                continue
            assert request.logits is not None
            greedy = request.temperature == 0
            with torch.inference_mode():
                token = int(next_tokens(request.logits, not greedy, 1.0 if greedy else request.temperature,
                                        request.top_k, None if greedy else request.top_p, request.generator)[0])
            request.generated += 1
            request.emit(token, None)
            if request.eos_token_id is not None and token == request.eos_token_id:
                request.emit(None, "stop")
            elif request.generated >= request.max_tokens:
                request.emit(None, "length")
            else:
                request.next_token = token
                keep.append(i)
        if len(keep) != len(self._active):
            self._active = [self._active[i] for i in keep]
            self._state = _select_rows(self._state, keep) if keep else None

    def _step(self) -> None:
        tokens = torch.tensor([r.next_token for r in self._active], device=self.model.device)
        with torch.inference_mode():
            out = self.model(tokens[:, None], state=self._state)
        self._state = out.state
        for i, request in enumerate(self._active):
            request.logits = out.logits[i:i + 1, -1]
        self.steps += 1


def _cat_states(a: Any, b: Any) -> Any:
    return type(a)([torch.cat([x, y]) for x, y in zip(a.memories, b.memories, strict=True)],
                   torch.cat([a.position, b.position]))


def _select_rows(state: Any, rows: list[int]) -> Any:
    index = torch.tensor(rows, device=state.position.device)
    return type(state)([m.index_select(0, index) for m in state.memories], state.position.index_select(0, index))
