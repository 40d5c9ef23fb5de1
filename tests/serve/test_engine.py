"""The continuous-batching engine (``serve/engine.py``) driven directly: prompts of every length
read inside the batch or prefilled first, each request's tokens against the same request alone
and against the model's own decoding, cancellation mid-prompt, bad requests, ``max_batch``."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from yet_another_retnet.models import RetNet, RetNetConfig
from yet_another_retnet.models.quantized import quantize_model
from yet_another_retnet.serve.engine import PREFILL_FROM, Engine, Request
from yet_another_retnet.serve.sampling import pick_token

TIMEOUT = 300  # a hang, not a slow machine: the waits below end as soon as the engine answers


def _tiny(quantize: str | None = None) -> RetNet:
    # Untied embeddings: with the tied head a random model's logits favour the token it just read,
    # so it repeats that token whatever the context (a wrong position would change nothing).
    torch.manual_seed(0)
    model = RetNet(RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, init_std=0.2,
                                            tie_embeddings=False)).eval()
    model = quantize_model(model, quantize).eval() if quantize else model
    # Build the CPU kernels here, not inside an engine's first step while a test waits on it.
    model.generate(torch.tensor([list(range(40))]), 2)
    return model


@pytest.fixture(scope="module")
def model() -> RetNet:
    return _tiny()


class Collect:
    """A request's ``emit``: its tokens, how it ended, and an event set at the end."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.done = threading.Event()

    def __call__(self, token: int | None, finish: str | None) -> None:
        if finish is None:
            assert token is not None and not self.done.is_set()
            self.tokens.append(token)
        else:
            self.finish = finish
            self.done.set()


def _prompt(length: int, salt: int) -> list[int]:
    return [(7 * t + 13 * salt + 1) % 256 for t in range(length)]


def _run_requests(engine: Engine, specs: list[dict[str, Any]],
                  start: bool = False) -> tuple[list[Request], list[Collect]]:
    """Submit every request at once and wait for all of them; ``start``: start the engine once all
    are queued, so that they are admitted together however fast this machine's threads switch.
    Returns the requests (with what the engine filled in) and what each emitted."""
    outs = [Collect() for _ in specs]
    requests = [Request(emit=out, **spec) for spec, out in zip(specs, outs, strict=True)]
    for request in requests:
        engine.submit(request)
    if start:
        engine.start()
    for out in outs:
        assert out.done.wait(TIMEOUT), "request never finished"
    return requests, outs


def _run(engine: Engine, specs: list[dict[str, Any]], start: bool = False) -> list[Collect]:
    """:func:`_run_requests`' emitted tokens alone."""
    return _run_requests(engine, specs, start)[1]


def _specs() -> list[dict[str, Any]]:
    lengths = [1, 3, 8, 9, 20, 33, PREFILL_FROM + 9, 70]
    return [{"ids": _prompt(n, i), "max_tokens": 5 + i % 4, "temperature": 0.0 if i % 2 else 0.9,
             "top_p": 0.95, "seed": 10 + i} for i, n in enumerate(lengths)]


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("prefill_from", [PREFILL_FROM, 8, 0])
def test_a_request_gets_in_a_batch_what_it_gets_alone(quantize: str | None, prefill_from: int,
                                                      model: RetNet) -> None:
    net = _tiny(quantize) if quantize else model
    # A piece smaller than the prompts: the 70-token prompt is prefilled over several loop turns.
    engine = Engine(net, max_batch=16, prefill_from=prefill_from, prefill_piece=24)
    try:
        specs = _specs()
        together = _run(engine, specs, start=True)
        steps = engine.steps
        alone = [_run(engine, [spec])[0] for spec in specs]
    finally:
        engine.stop()
    assert [o.finish for o in together] == ["length"] * len(specs)
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    assert all(len(o.tokens) == s["max_tokens"] for o, s in zip(together, specs, strict=True))
    # Read together: as many steps as the longest request needs, not the sum of them all (plus
    # the steps run while the long prompts are prefilled, a piece per loop turn).
    prefilled = [len(s["ids"]) for s in specs if len(s["ids"]) > max(prefill_from, 1)]
    longest = max(min(len(s["ids"]), prefill_from + 1) + s["max_tokens"] - 1 for s in specs)
    assert steps <= longest + sum(-(-(n - 1) // 24) for n in prefilled) + 2


def test_rows_freed_mid_batch_are_reused_and_no_row_is_mixed_up(model: RetNet) -> None:
    """Three slots for eight requests of different lengths: rows leave from the middle of the
    batch (the rows after them move up), waiting requests join the freed rows, and the row buffer
    grows as the batch does; each request still gets what it gets alone."""
    engine = Engine(model, max_batch=3, prefill_piece=24)
    try:
        specs = _specs()[::-1]  # the long prompts first: the others join while they are prefilled
        together = _run(engine, specs, start=True)
        alone = [_run(engine, [spec])[0] for spec in specs]
        capacity = int(engine._rows.position.shape[0])
    finally:
        engine.stop()
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    assert capacity == 3  # never more rows than max_batch


def test_the_engine_decodes_as_the_model_does(model: RetNet) -> None:
    """Short prompts are read token by token, long ones prefilled then stepped: the same routes
    by hand give identical tokens; greedy ``generate`` (a chunkwise prefill of the whole prompt)
    gives the same tokens (its logits agree to float32 rounding)."""
    engine = Engine(model, max_batch=4, prefill_from=16, prefill_piece=16)
    specs = [{"ids": _prompt(n, n), "max_tokens": 12, "temperature": t, "seed": 3}
             for n in (5, 40) for t in (0.0, 0.8)]
    try:
        outs = _run(engine, specs, start=True)
    finally:
        engine.stop()
    for spec, out in zip(specs, outs, strict=True):
        ids, greedy = spec["ids"], spec["temperature"] == 0
        gen = torch.Generator().manual_seed(spec["seed"])
        with torch.inference_mode():
            state, feed = None, ids
            if len(ids) > 16:  # the long route: prefill all but the last token, in pieces of 16
                for start in range(0, len(ids) - 1, 16):
                    piece = torch.tensor([ids[start:min(start + 16, len(ids) - 1)]])
                    state = model.prefill(piece, state=state).state
                feed = ids[-1:]
            for token in feed:
                step = model(torch.tensor([[token]]), state=state)
                state = step.state
            by_hand = []
            for _ in range(spec["max_tokens"]):
                by_hand.append(pick_token(step.logits[0, -1], spec["temperature"], None, None, gen))
                step = model(torch.tensor([by_hand[-1:]]), state=step.state)
        assert out.tokens == by_hand
        if greedy:
            generated = model.generate(torch.tensor([ids]), spec["max_tokens"])
            assert out.tokens == generated[0, len(ids):].tolist()


def test_logit_bias_and_penalties_follow_openais_definition(model: RetNet) -> None:
    """Requests with a logit bias and presence/frequency penalties, batched with plain ones: each
    gets the tokens of a loop by hand that adds the bias and subtracts the penalties from the
    logits (written out here, not through the engine's helper)."""
    specs = [{"ids": _prompt(5, 3), "max_tokens": 14, "temperature": 0.0, "frequency_penalty": -2.0},
             {"ids": _prompt(4, 2), "max_tokens": 14, "temperature": 0.7, "seed": 5, "presence_penalty": 2.0,
              "frequency_penalty": -0.5, "logit_bias": {7: 4.0, 9: -100.0}},
             {"ids": _prompt(5, 3), "max_tokens": 6, "temperature": 0.0, "logit_bias": {42: 100.0}},
             {"ids": _prompt(5, 3), "max_tokens": 14, "temperature": 0.0}]
    engine = Engine(model, max_batch=4)
    try:
        outs = _run(engine, specs, start=True)
    finally:
        engine.stop()
    assert outs[2].tokens == [42] * 6  # a bias of +100 decides every token
    assert len(set(outs[0].tokens)) < len(set(outs[3].tokens))  # a negative penalty: it repeats itself
    for spec, out in zip(specs, outs, strict=True):
        gen = torch.Generator().manual_seed(spec.get("seed", 0))
        bias = spec.get("logit_bias", {})
        presence, frequency = spec.get("presence_penalty", 0.0), spec.get("frequency_penalty", 0.0)
        by_hand: list[int] = []
        with torch.inference_mode():
            step = model(torch.tensor([spec["ids"]]), mode="recurrent")
            for _ in range(spec["max_tokens"]):
                logits = step.logits[0, -1].float().clone()
                for token, value in bias.items():
                    logits[token] += value
                for token in set(by_hand):
                    logits[token] -= by_hand.count(token) * frequency + presence
                by_hand.append(pick_token(logits, spec["temperature"], None, None, gen))
                step = model(torch.tensor([by_hand[-1:]]), state=step.state)
        assert out.tokens == by_hand, spec


def test_bad_bias_or_penalty_fails_its_request_alone(model: RetNet) -> None:
    engine = Engine(model, max_batch=2)
    bad = [{"presence_penalty": 2.5}, {"frequency_penalty": -3.0}, {"logit_bias": {256: 1.0}},
           {"logit_bias": {3: 101.0}}, {"logit_bias": {3: float("nan")}}]
    try:
        outs = _run(engine, [{"ids": [1, 2], "max_tokens": 2, **b} for b in bad] + [{"ids": [1, 2], "max_tokens": 2}],
                    start=True)
    finally:
        engine.stop()
    for b, out in zip(bad, outs[:-1], strict=True):
        assert out.finish is not None and out.finish.startswith("error: ValueError") and next(iter(b)) in out.finish
    assert outs[-1].finish == "length" and len(outs[-1].tokens) == 2


def test_prompt_logprobs_score_every_prompt_token_across_pieces(model: RetNet) -> None:
    """A prompt scored (``echo`` with logprobs) goes through the prefill route in pieces, short or
    long, and its entries are the log-softmax of the model's logits at the position before each
    token; the tokens generated after it are what the request gets without scoring."""
    engine = Engine(model, max_batch=2, prefill_from=8, prefill_piece=16)
    ids = [_prompt(40, 4), _prompt(5, 5)]
    specs = [{"ids": p, "max_tokens": 4, "temperature": 0.0, "prompt_logprobs": 3} for p in ids]
    try:
        requests, outs = _run_requests(engine, specs, start=True)
        plain = _run(engine, [{k: v for k, v in spec.items() if k != "prompt_logprobs"} for spec in specs])
    finally:
        engine.stop()
    for prompt, request, out, alone in zip(ids, requests, outs, plain, strict=True):
        assert out.tokens == alone.tokens
        with torch.inference_mode():
            want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        entries = request.prompt_entries
        assert entries is not None and [e.token for e in entries] == prompt[1:]
        for i, e in enumerate(entries):
            assert e.logprob is not None and abs(e.logprob - float(want[i, prompt[i + 1]])) < 1e-4
            assert [t for t, _ in e.top] == torch.topk(want[i], 3).indices.tolist()


class Gated:
    """``model`` whose prefill and batched step wait, the first time each runs, for the test."""

    def __init__(self, model: RetNet) -> None:
        self.model = model
        self.entered = {"prefill": threading.Event(), "step": threading.Event()}
        self.go = {"prefill": threading.Event(), "step": threading.Event()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def _gate(self, which: str) -> None:
        if not self.entered[which].is_set():
            self.entered[which].set()
            assert self.go[which].wait(TIMEOUT)

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        self._gate("prefill")
        return self.model.prefill(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._gate("step")
        return self.model(*args, **kwargs)

    def step_(self, *args: Any, **kwargs: Any) -> Any:  # the engine's batched step
        self._gate("step")
        return self.model.step_(*args, **kwargs)


@pytest.mark.parametrize("route", ["step", "prefill"])
def test_a_cancel_mid_prompt_frees_the_slot(route: str, model: RetNet) -> None:
    gated = Gated(model)
    gated.go["step" if route == "prefill" else "prefill"].set()
    engine = Engine(gated, max_batch=1, prefill_from=16, prefill_piece=8)
    engine.start()
    try:
        first, second = Collect(), Collect()
        request = Request(_prompt(6 if route == "step" else 60, 1), 50, first, temperature=0)
        engine.submit(request)
        engine.submit(Request(_prompt(4, 2), 3, second, temperature=0))
        assert gated.entered[route].wait(TIMEOUT)  # the first prompt is being read
        assert engine.active == 1 and engine.waiting == 1  # the only slot is taken
        request.cancel()
        gated.go[route].set()
        assert first.done.wait(TIMEOUT) and second.done.wait(TIMEOUT)
    finally:
        engine.stop()
    assert first.finish == "cancelled" and first.tokens == []
    assert second.finish == "length" and len(second.tokens) == 3
    assert engine.active == 0


def test_a_bad_request_fails_alone_and_max_batch_holds(model: RetNet) -> None:
    engine = Engine(model, max_batch=2)
    seen: list[int] = []

    class Watch(Collect):
        def __call__(self, token: int | None, finish: str | None) -> None:
            seen.append(engine.active)  # called on the engine's thread, between steps
            super().__call__(token, finish)

    good = [{"ids": _prompt(3 + i, i), "max_tokens": 4, "temperature": 0.0} for i in range(4)]
    bad = [{"ids": [1, 2, 256], "max_tokens": 4}, {"ids": [], "max_tokens": 4},
           {"ids": [1], "max_tokens": 0}, {"ids": [1], "max_tokens": 2, "temperature": -1.0}]
    specs = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[3]]
    outs = [Watch() for _ in specs]
    try:
        for spec, out in zip(specs, outs, strict=True):
            engine.submit(Request(emit=out, **spec))
        engine.start()  # with all queued: the same batches however fast this machine's threads switch
        for out in outs:
            assert out.done.wait(TIMEOUT)
        alone = [_run(engine, [spec])[0].tokens for spec in good]
    finally:
        engine.stop()
    errors = [o.finish for o in outs if o.finish != "length"]
    assert [o.tokens for o in outs if o.finish == "length"] == alone
    assert len(errors) == 4 and all(e is not None and e.startswith("error: ValueError") for e in errors)
    assert "ids" in str(errors[0]) and "max_tokens" in str(errors[2]) and "temperature" in str(errors[3])
    assert max(seen) <= 2


def test_engine_arguments_are_checked(model: RetNet) -> None:
    for kwargs, name in (({"max_batch": 0}, "max_batch"), ({"prefill_from": -1}, "prefill_from"),
                         ({"prefill_piece": 0}, "prefill_piece")):
        with pytest.raises(ValueError, match=name):
            Engine(model, **kwargs)


def test_an_emit_that_raises_drops_its_request_alone(model: RetNet) -> None:
    """An ``emit`` that raises (its client's event loop closed) cancels that request: nothing
    more is sent to it, the batch goes on, and the engine serves later requests."""
    engine = Engine(model, max_batch=4)
    calls: list[tuple[int | None, str | None]] = []

    def closed_loop(token: int | None, finish: str | None) -> None:
        calls.append((token, finish))
        raise RuntimeError("Event loop is closed")

    good = Collect()
    engine.submit(Request(_prompt(5, 1), 20, closed_loop, temperature=0))
    engine.submit(Request(_prompt(6, 2), 6, good, temperature=0))
    engine.start()
    try:
        while not good.done.wait(0.05):
            assert engine.running, "the engine's thread died"
        later = _run(engine, [{"ids": _prompt(4, 3), "max_tokens": 3, "temperature": 0.0}])[0]
        alone = _run(engine, [{"ids": _prompt(6, 2), "max_tokens": 6, "temperature": 0.0}])[0]
    finally:
        engine.stop()
    assert len(calls) == 1 and calls[0][1] is None  # its first token, then nothing
    assert good.finish == "length" and good.tokens == alone.tokens
    assert later.finish == "length" and len(later.tokens) == 3
    assert engine.active == 0


class _Fatal(BaseException):
    """Not an ``Exception``: the engine's loop does not catch it, its thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_answers_its_requests_and_refuses_more(model: RetNet) -> None:
    class Dying(Gated):
        def step_(self, *args: Any, **kwargs: Any) -> Any:
            raise _Fatal("the thread dies here")

    engine = Engine(Dying(model), max_batch=1)
    first, queued = Collect(), Collect()
    engine.submit(Request(_prompt(3, 1), 5, first))
    engine.submit(Request(_prompt(3, 2), 5, queued))
    engine.start()
    try:
        for out in (first, queued):  # answered, not left hanging
            while not out.done.wait(0.05):
                assert engine.running or out.done.is_set(), "the engine died without answering"
        with pytest.raises(RuntimeError, match="not running"):
            engine.submit(Request(_prompt(3, 3), 5, Collect()))
    finally:
        engine.stop()
    assert str(first.finish).startswith("error: _Fatal") and str(queued.finish).startswith("error: _Fatal")


def test_max_waiting_refuses_requests_beyond_it(model: RetNet) -> None:
    from yet_another_retnet.serve.engine import QueueFull

    with pytest.raises(ValueError, match="max_waiting"):
        Engine(model, max_waiting=0)
    engine = Engine(model, max_waiting=2)
    outs = [Collect() for _ in range(2)]
    for i, out in enumerate(outs):
        engine.submit(Request(_prompt(3, i), 2, out, temperature=0))
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(Request(_prompt(3, 2), 2, Collect()))
    engine.start()
    try:
        for out in outs:
            assert out.done.wait(TIMEOUT)
        assert _run(engine, [{"ids": _prompt(3, 2), "max_tokens": 2}])[0].finish == "length"  # room again
    finally:
        engine.stop()
    assert [o.finish for o in outs] == ["length", "length"]


class Counted(Gated):
    """:class:`Gated` that counts the prefill calls (and the full forwards of scored prompts)."""

    def __init__(self, model: RetNet, gate: bool = False) -> None:
        super().__init__(model)
        self.prefills = 0
        if not gate:
            for event in self.go.values():
                event.set()

    def prefill(self, *args: Any, **kwargs: Any) -> Any:
        self.prefills += 1
        return super().prefill(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.prefills += 1
        return super().__call__(*args, **kwargs)


def test_requests_with_one_prompt_share_its_prefill(model: RetNet) -> None:
    """Four choices of one 70-token prompt (each its own seed and temperature) and one other
    prompt: each long prompt is prefilled once, in 3 pieces of 24, and every request gets what it
    gets alone."""
    counted = Counted(model)
    engine = Engine(counted, max_batch=8, prefill_from=8, prefill_piece=24)
    shared = _prompt(70, 1)
    specs = [{"ids": shared, "max_tokens": 6, "temperature": 0.0 if i == 0 else 1.0, "seed": i} for i in range(4)]
    specs.append({"ids": _prompt(70, 2), "max_tokens": 6, "temperature": 1.0, "seed": 9})
    try:
        together = _run(engine, specs, start=True)
        assert counted.prefills == 2 * 3
        alone = [_run(engine, [spec])[0] for spec in specs]
    finally:
        engine.stop()
    assert [o.finish for o in together] == ["length"] * len(specs)
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    assert len({tuple(o.tokens) for o in together[1:4]}) > 1  # the seeds did differ
    assert engine.active == 0


def test_a_cancelled_leader_hands_its_prefill_to_a_follower(model: RetNet) -> None:
    """The request reading a shared prompt is cancelled during its first piece, and one follower
    too: the next follower carries the prefill on from the second piece (3 pieces in all, none
    read twice), the cancelled ones end with no tokens, and the rest get what they get alone."""
    counted = Counted(model, gate=True)
    counted.go["step"].set()
    engine = Engine(counted, max_batch=4, prefill_from=8, prefill_piece=24)
    shared = _prompt(70, 3)
    specs = [{"ids": shared, "max_tokens": 5, "temperature": 1.0, "seed": 20 + i} for i in range(4)]
    outs = [Collect() for _ in specs]
    requests = [Request(emit=out, **spec) for spec, out in zip(specs, outs, strict=True)]
    try:
        for request in requests:
            engine.submit(request)
        engine.start()
        assert counted.entered["prefill"].wait(TIMEOUT)  # the first piece is being read
        assert engine.active == 4
        requests[0].cancel()
        requests[2].cancel()
        counted.go["prefill"].set()
        for out in outs:
            assert out.done.wait(TIMEOUT)
        assert counted.prefills == 3
        alone = [_run(engine, [spec])[0] for spec in specs]
    finally:
        engine.stop()
    assert [o.finish for o in outs] == ["cancelled", "length", "cancelled", "length"]
    assert outs[0].tokens == outs[2].tokens == []
    assert [outs[1].tokens, outs[3].tokens] == [alone[1].tokens, alone[3].tokens]
    assert engine.active == 0


def test_scored_choices_share_the_scoring_and_get_the_same_entries(model: RetNet) -> None:
    """Three choices of a prompt scored with ``prompt_logprobs`` (``echo``): one pass over it, and
    each gets the whole prompt's entries; a choice of the same prompt unscored does not share."""
    counted = Counted(model)
    engine = Engine(counted, max_batch=4, prefill_from=8, prefill_piece=16)
    prompt = _prompt(40, 6)
    specs: list[dict[str, Any]] = [{"ids": prompt, "max_tokens": 3, "temperature": 1.0, "seed": i,
                                    "prompt_logprobs": 2} for i in range(3)]
    specs.append({"ids": prompt, "max_tokens": 3, "temperature": 1.0, "seed": 7})
    try:
        requests, outs = _run_requests(engine, specs, start=True)
        assert [o.finish for o in outs] == ["length"] * 4
        assert counted.prefills == 2 * 3  # 39 tokens in pieces of 16, once scored, once not
    finally:
        engine.stop()
    first = requests[0].prompt_entries
    assert first is not None and [e.token for e in first] == prompt[1:]
    for other in requests[1:3]:
        assert other.prompt_entries is not None and other.prompt_entries is not first
        assert [(e.token, e.logprob, e.top) for e in other.prompt_entries] == [(e.token, e.logprob, e.top) for e in first]
