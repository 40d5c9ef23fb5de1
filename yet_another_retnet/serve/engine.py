"""Continuous batching: many requests decoded together, one token per request per step.

A RetNet request's whole context is its recurrent state, a fixed size whatever its length, so
batching requests is stacking their states along the batch axis; nothing is padded or paged.
:class:`Engine` runs one thread that owns the model and loops:

1. admit waiting requests (up to ``max_batch`` in flight). A prompt of at most
   :data:`PREFILL_FROM` tokens joins the batch at once with an empty state: the batched step
   reads it one token per step, as it reads the other rows' generated tokens, so admitting 16
   short prompts costs no pass over the weights of its own. A longer prompt is prefilled first
   (all but its last token, chunkwise, :data:`PREFILL_PIECE` tokens per loop turn so the batch
   keeps decoding meanwhile) and joins with that state; its last token goes through the batch;
2. drop the requests whose client went away (their rows leave the batch state);
3. one decoding step for the whole batch: each row consumes its next prompt token or its last
   sampled token, at its own position (``RetNetState.position`` is per row). The batched layer
   kernels read each weight once per step for the whole batch;
4. each request that has read its whole prompt picks its next token from its own logits (with its
   own logit bias and penalties) with its own seeded generator (:mod:`.sampling`: one uniform draw
   a token); the finished ones leave the batch. Logits of prompt tokens before the last are not
   looked at.

Requests admitted with the same long prompt while it is prefilled (the ``n`` choices of one API
request, say) share that prefill: the first reads it, the others wait as its followers (holding
their slots) and join the batch with the same state once it is done; if the first is cancelled, a
follower carries the work on from where it stopped.

Which way a prompt goes depends on its length alone, never on the batch, and each row of a
batched step is computed from that row alone, so a request's tokens are the ones it gets alone
with the same seed. (The kernels' summation order can depend on the number of rows, which moves
logits by float32 rounding: a token could differ only at a near tie; docs/serving.md.) Tokens go
back through each request's ``emit`` callback (called on the engine's thread). An ``emit`` that
raises (its client's event loop closed, say) drops that request alone: the loop goes on.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .logprobs import MAX_TOP_LOGPROBS, TokenLogprobs, score_tokens, token_logprobs
from .sampling import adjust_logits, pick_token

#: ``emit(token, finish_reason)``: a token (``finish_reason`` ``None``), or the end (``token`` ``None``,
#: ``finish_reason`` ``"length"``, ``"stop"``, ``"cancelled"`` or ``"error: ..."``).
Emit = Callable[[int | None, str | None], None]

#: Prompts longer than this are prefilled before they join the batch; the others are read one
#: token per batched step. A token riding in a batch of 16 costs one more row of a step (the
#: weights are read once for all rows), while a prefill is a pass over the weights of its own
#: that stalls every other request; past a few dozen tokens the prefill's chunkwise products win
#: (measured in docs/serving.md).
PREFILL_FROM = 32
#: Tokens of a long prompt prefilled per loop turn, between two batched steps: the other requests
#: wait for one piece, not for the whole prompt. A multiple of the usual chunk sizes.
PREFILL_PIECE = 512
#: Requests that may wait for a slot at most (:meth:`Engine.submit` refuses more): a burst beyond
#: it is told to come back later instead of piling up behind the batch without bound.
MAX_WAITING = 256


class QueueFull(RuntimeError):
    """:meth:`Engine.submit` refused a request: ``max_waiting`` requests already wait (retry later)."""


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
    # OpenAI's adjustments (serve/sampling.py's adjust_logits): a bias per token id, and penalties on
    # the tokens generated so far.
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # With a number: each token's log-probability and that many alternatives' (.logprobs), set on
    # the request just before its token is emitted.
    top_logprobs: int | None = None
    # With a number: the prompt's tokens' log-probabilities too (each from the positions before it,
    # that many alternatives), in .prompt_entries before the first token is emitted. Such a prompt
    # is prefilled with its logits (the prefill route, whatever its length).
    prompt_logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Filled in by the engine.
    generated: int = 0
    counts: dict[int, int] = field(default_factory=dict)  # times each token was generated
    logprobs: TokenLogprobs | None = None  # the token being emitted's (with top_logprobs)
    prompt_entries: list[TokenLogprobs] | None = None  # the prompt's tokens after the first (prompt_logprobs)
    next_token: int = 0
    logits: Tensor | None = None
    generator: torch.Generator | None = None
    read: int = 0  # prompt tokens the model has read (prefilled or stepped)
    prefix_state: Any = None  # a long prompt's state while it is being prefilled
    # Requests with the same prompt that share this one's prefill (module docstring).
    followers: list[Request] = field(default_factory=list)

    def cancel(self) -> None:
        """The client went away: the engine frees the slot at its next step."""
        self.cancelled.set()


class Engine:
    """Owns ``model`` on one background thread; :meth:`submit` hands it requests.

    ``prefill_from``: prompts longer than this many tokens are prefilled before they join the
    batch (default :data:`PREFILL_FROM`); ``prefill_piece``: tokens prefilled per loop turn;
    ``max_waiting``: requests queued for a slot at most (default :data:`MAX_WAITING`).

    Requests submitted before :meth:`start` (or between :meth:`stop` and :meth:`start`) wait in
    the queue; once the engine's thread has died, :meth:`submit` refuses them.
    """

    def __init__(self, model: Any, max_batch: int = 16, prefill_from: int = PREFILL_FROM,
                 prefill_piece: int = PREFILL_PIECE, max_waiting: int = MAX_WAITING) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        if prefill_from < 0:
            raise ValueError(f"prefill_from must be >= 0, got {prefill_from}")
        if prefill_piece < 1:
            raise ValueError(f"prefill_piece must be >= 1, got {prefill_piece}")
        self.model, self.max_batch = model, max_batch
        self.prefill_from, self.prefill_piece = prefill_from, prefill_piece
        self._waiting: queue.Queue[Request] = queue.Queue(maxsize=max_waiting)
        self._active: list[Request] = []  # rows of the batch
        self._state: Any = None  # the active requests' states stacked, row i for _active[i]
        # Where _state lives: the first rows of a state of `capacity` rows kept across steps, so
        # that a request joining or leaving copies its own row, never the whole batch's (at 1.3B a
        # row is 100 MB, and a fresh batch state is faulted in page by page).
        self._rows: Any = None
        self._prefilling: list[Request] = []  # long prompts being prefilled, first first
        self._blank: Any = None  # the state of one row before any token
        self._joining: list[Any] = []  # states of the rows appended to _active since the last step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Why the thread died, if it did; set under _lock, which submit() holds while queueing,
        # so that the dying thread fails every request that made it into the queue.
        self._died: str | None = None
        self._lock = threading.Lock()
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
        """Queue ``request``. Raises :class:`QueueFull` when ``max_waiting`` requests already
        wait, and ``RuntimeError`` when the engine's thread has died (nothing would answer)."""
        with self._lock:
            if self._died is not None:
                raise RuntimeError(f"the engine is not running: its thread died ({self._died})")
            try:
                self._waiting.put_nowait(request)
            except queue.Full:
                raise QueueFull(f"{self._waiting.maxsize} requests are already waiting; retry later") from None

    @property
    def running(self) -> bool:
        """Whether the engine's thread is alive: started, not stopped, not dead."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def active(self) -> int:
        """Requests in flight (their slots are taken): in the batch or being prefilled."""
        return len(self._active) + sum(1 + len(r.followers) for r in self._prefilling)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._admit()
                    self._prefill_piece()
                    self._drop_cancelled()
                    if self._active:
                        self._step()
                        self._sample()
                except Exception as err:  # keep serving: fail the requests in the batch, not the server
                    for request in self._active:
                        self._emit(request, None, _error(err))
                    self._active, self._state, self._joining = [], None, []
        except BaseException as err:  # the thread dies: answer everyone rather than leave them hanging
            with self._lock:
                self._died = f"{type(err).__name__}: {err}"
            followers = [f for r in self._prefilling for f in r.followers]
            for request in [*self._active, *self._prefilling, *followers, *_drain(self._waiting)]:
                self._emit(request, None, _error(err))
            raise

    def _emit(self, request: Request, token: int | None, finish: str | None) -> bool:
        """``request.emit(token, finish)``; ``False`` if it raised. A raising ``emit`` (its event
        loop closed, its client gone) must not reach the loop's error handler, which would fail
        the whole batch and call the same ``emit`` again: the request is cancelled (its slot is
        freed at the next step) and nothing more is sent to it."""
        try:
            request.emit(token, finish)
        except Exception:
            request.cancel()
            return False
        return True

    def _admit(self) -> None:
        block = not self._active and not self._prefilling  # idle: wait for work (bounded, so stop() is seen)
        while self.active < self.max_batch:
            try:
                request = self._waiting.get(timeout=0.05) if block else self._waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if request.cancelled.is_set():
                self._emit(request, None, "cancelled")
                continue
            try:
                self._check(request)
                request.generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
                if request.prompt_logprobs is not None:
                    request.prompt_entries = []  # filled piece by piece as the prompt is prefilled
                scored = request.prompt_logprobs is not None and len(request.ids) > 1
                if len(request.ids) > max(self.prefill_from, 1) or scored:  # something to prefill
                    leader = self._same_prompt(request)
                    if leader is None:
                        self._prefilling.append(request)
                    else:
                        leader.followers.append(request)
                else:
                    self._join(request, self._blank_state())
            except Exception as err:  # this request alone
                self._emit(request, None, _error(err))

    def _check(self, request: Request) -> None:
        """A bad request fails alone here, before its tokens can reach the batch's step."""
        vocab = int(self.model.config.vocab_size)
        if not request.ids:
            raise ValueError("ids: the prompt must hold at least one token")
        if min(request.ids) < 0 or max(request.ids) >= vocab:
            raise ValueError(f"ids: token ids must lie in [0, {vocab})")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(request, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        for token, bias in (request.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(f"logit_bias: token ids must lie in [0, {vocab}), got {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: biases must be in [-100, 100], got {bias} for token {token}")
        for name in ("top_logprobs", "prompt_logprobs"):
            top = getattr(request, name)
            if top is not None and (isinstance(top, bool) or not isinstance(top, int)
                                    or not 0 <= top <= MAX_TOP_LOGPROBS):
                raise ValueError(f"{name} must be an int in [0, {MAX_TOP_LOGPROBS}] or None, got {top!r}")

    def _blank_state(self) -> Any:
        if self._blank is None:
            self._blank = self.model.empty_state(1)
        return self._blank

    def _join(self, request: Request, state: Any) -> None:
        """``request`` takes the next row; its state joins at :meth:`_step`, with the others'."""
        self._active.append(request)
        self._joining.append(state)

    def _same_prompt(self, request: Request) -> Request | None:
        """The request being prefilled whose prefill ``request`` can share: the same prompt, scored
        the same way (``None``: there is none)."""
        for leader in self._prefilling:
            if (leader.ids == request.ids and leader.prompt_logprobs == request.prompt_logprobs
                    and not leader.cancelled.is_set()):
                return leader
        return None

    def _prefill_piece(self) -> None:
        """The next piece of the first long prompt; once only its last token is left, it joins
        (with its followers)."""
        while self._prefilling:
            request = self._prefilling[0]
            for follower in [f for f in request.followers if f.cancelled.is_set()]:
                request.followers.remove(follower)
                self._emit(follower, None, "cancelled")
            if request.cancelled.is_set():
                self._prefilling.pop(0)
                self._emit(request, None, "cancelled")
                if request.followers:  # the first follower carries the prefill on from here
                    heir = request.followers.pop(0)
                    heir.followers, request.followers = request.followers, []
                    heir.read, heir.prefix_state = request.read, request.prefix_state
                    if request.prompt_entries is not None:
                        heir.prompt_entries = request.prompt_entries
                    self._prefilling.insert(0, heir)
                continue
            end = min(request.read + self.prefill_piece, len(request.ids) - 1)
            try:
                with torch.inference_mode():
                    piece = torch.tensor([request.ids[request.read:end]], device=self.model.device)
                    if request.prompt_logprobs is None:
                        request.prefix_state = self.model.prefill(piece, state=request.prefix_state).state
                    else:  # every position's logits: they score the prompt's next tokens
                        out = self.model(piece, state=request.prefix_state)
                        request.prefix_state = out.state
                        assert request.prompt_entries is not None
                        request.prompt_entries += score_tokens(out.logits[0], request.ids[request.read + 1:end + 1],
                                                               request.prompt_logprobs)
            except Exception as err:  # this prompt alone (and its followers: the same prompt)
                self._prefilling.pop(0)
                for failed in [request, *request.followers]:
                    self._emit(failed, None, _error(err))
                request.followers = []
                return
            request.read = end
            if end == len(request.ids) - 1:
                self._prefilling.pop(0)
                state, request.prefix_state = request.prefix_state, None
                self._join(request, state)
                for follower in request.followers:  # each copies the state in as its own row
                    follower.read = end
                    if request.prompt_entries is not None:
                        follower.prompt_entries = list(request.prompt_entries)
                    self._join(follower, state)
                request.followers = []
            return

    def _drop_cancelled(self) -> None:
        keep = [i for i, request in enumerate(self._active) if not request.cancelled.is_set()]
        for request in self._active:
            if request.cancelled.is_set():
                self._emit(request, None, "cancelled")
        self._keep(keep)

    def _step(self) -> None:
        """One token per row: the next prompt token, or the last sampled one."""
        self._flush_joins()
        rows = [r.ids[r.read] if r.read < len(r.ids) else r.next_token for r in self._active]
        tokens = torch.tensor(rows, device=self.model.device)
        with torch.inference_mode():
            # The engine owns the batch state and keeps no earlier copy: step it in place (a fresh
            # state is 4 MB a layer per row at 1.3B, which glibc maps and faults in every step).
            logits = self.model.step_(tokens, self._state)
        for i, request in enumerate(self._active):
            if request.read < len(request.ids):
                request.read += 1
            request.logits = logits[i] if request.read == len(request.ids) else None
        self.steps += 1

    def _sample(self) -> None:
        """Each request past its prompt picks its next token; finished ones leave the batch."""
        keep: list[int] = []
        for i, request in enumerate(self._active):
            if request.logits is None:  # still reading its prompt
                keep.append(i)
                continue
            try:
                with torch.inference_mode():
                    logits = adjust_logits(request.logits, request.counts, request.presence_penalty,
                                           request.frequency_penalty, request.logit_bias)
                    token = pick_token(logits, request.temperature, request.top_k, request.top_p, request.generator)
                    if request.top_logprobs is not None:  # the model's own distribution (serve/logprobs.py)
                        request.logprobs = token_logprobs(request.logits, token, request.top_logprobs)
            except Exception as err:  # bad sampling settings: this request alone
                self._emit(request, None, _error(err))
                continue
            request.generated += 1
            request.counts[token] = request.counts.get(token, 0) + 1
            if not self._emit(request, token, None):  # nobody to send its tokens to: it leaves
                continue
            if request.eos_token_id is not None and token == request.eos_token_id:
                self._emit(request, None, "stop")
            elif request.generated >= request.max_tokens:
                self._emit(request, None, "length")
            else:
                request.next_token = token
                keep.append(i)
        self._keep(keep)

    def _flush_joins(self) -> None:
        """The joining rows' states copied in after the batch's rows (each row once)."""
        if not self._joining:
            return
        at = 0 if self._state is None else int(self._state.position.shape[0])
        self._reserve(at + sum(int(s.position.shape[0]) for s in self._joining), self._joining[0])
        for state in self._joining:
            at = _copy_rows(state, self._rows, at)
        self._joining = []
        self._state = self._first_rows(at)

    def _reserve(self, rows: int, like: Any) -> None:
        """A row buffer of at least ``rows`` rows shaped like the state ``like``, the batch's rows
        kept; it grows by doubling (up to ``max_batch``), so a burst of joins allocates once."""
        capacity = 0 if self._rows is None else int(self._rows.position.shape[0])
        if rows <= capacity:
            return
        capacity = max(rows, min(self.max_batch, 2 * capacity))
        grown = type(like)([m.new_empty((capacity, *m.shape[1:])) for m in like.memories],
                           like.position.new_empty(capacity))
        if self._state is not None:
            _copy_rows(self._state, grown, 0)
        self._rows = grown

    def _first_rows(self, rows: int) -> Any:
        """The state of the buffer's first ``rows`` rows (views: stepped in place)."""
        return type(self._rows)([m[:rows] for m in self._rows.memories], self._rows.position[:rows])

    def _keep(self, rows: list[int]) -> None:
        """Keep the batch rows ``rows`` (increasing), moved up in order: each kept row is copied
        at most once, to a place no later kept row is read from."""
        if len(rows) != len(self._active):
            self._flush_joins()
            self._active = [self._active[i] for i in rows]
            for i, row in enumerate(rows):
                if row != i:
                    for memory in self._rows.memories:
                        memory[i].copy_(memory[row])
                    self._rows.position[i] = self._rows.position[row]
            self._state = self._first_rows(len(rows)) if rows else None


def _copy_rows(state: Any, into: Any, at: int) -> int:
    """``state``'s rows copied into the rows of ``into`` from ``at`` on; returns the row after them."""
    rows = int(state.position.shape[0])
    for target, memory in zip(into.memories, state.memories, strict=True):
        target[at:at + rows].copy_(memory)
    into.position[at:at + rows].copy_(state.position)
    return at + rows


def _error(err: BaseException) -> str:
    return f"error: {type(err).__name__}: {err}"


def _drain(waiting: queue.Queue[Request]) -> list[Request]:
    """Every request still in ``waiting``, taken out of it."""
    out = []
    while True:
        try:
            out.append(waiting.get_nowait())
        except queue.Empty:
            return out
