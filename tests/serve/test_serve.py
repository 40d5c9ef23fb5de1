"""``retnet quantize``, ``retnet chat`` and ``retnet serve``: driven as a user would (stdin, a real
HTTP client against a real server on the loopback interface)."""

from __future__ import annotations

import asyncio
import codecs
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from yet_another_retnet.cli import main
from yet_another_retnet.models import RetNet, RetNetConfig
from yet_another_retnet.serve.chat import ASSISTANT, USER
from yet_another_retnet.training.data import ByteTokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = RetNet(RetNetConfig.from_preset("tiny", num_layers=2, chunk_size=16, init_std=0.2,
                                            tie_embeddings=False))  # else it repeats its last token
    out = tmp_path_factory.mktemp("serve") / "model"
    model.save_pretrained(out)
    return out


def test_quantize_command_writes_a_loadable_int8_model(model_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8"
    assert main(["quantize", str(model_dir), str(out)]) == 0
    assert "int8" in capsys.readouterr().out
    ids = torch.tensor([list(b"hello ")])
    assert torch.equal(RetNet.from_pretrained(out).generate(ids, 10),
                       RetNet.from_pretrained(model_dir, quantize="int8").generate(ids, 10))
    before = sorted(p.name for p in out.iterdir())
    assert main(["quantize", str(model_dir), str(out)]) == 2  # not an empty directory: nothing written
    assert sorted(p.name for p in out.iterdir()) == before
    assert "not an empty directory" in capsys.readouterr().err


def test_generate_quantize_matches_the_int8_model(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["generate", str(model_dir), "--prompt", "abc", "--max-new-tokens", "12", "--temperature", "0",
                 "--device", "cpu", "--quantize", "int8"]) == 0
    model = RetNet.from_pretrained(model_dir, quantize="int8")
    ids = model.generate(torch.tensor([list(b"abc")]), 12)[0].tolist()
    assert capsys.readouterr().out == bytes(ids).decode("utf-8", errors="replace") + "\n"


def test_chat_keeps_the_state_between_turns(model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[int] = []
    original = RetNet.prefill

    def recording(self: RetNet, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(int(input_ids.shape[1]))
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(RetNet, "prefill", recording)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi there\nand again\n\n"))
    assert main(["chat", str(model_dir), "--temperature", "0", "--max-new-tokens", "12"]) == 0
    replies = capsys.readouterr().out.split("\n")[:2]
    # Turn two read only its own line and the token that ended turn one, not the transcript.
    first = f"{USER}hi there\n{ASSISTANT}".encode()
    second = f"{USER}and again\n{ASSISTANT}".encode()
    assert seen[0] == len(first) and seen[1] in (len(second) + 1, len(second) + 2)
    # Each reply is what greedy decoding of the whole transcript so far gives.
    model = RetNet.from_pretrained(model_dir)
    transcript = list(first)
    for reply, line in zip(replies, (None, second), strict=True):
        if line is not None:
            transcript += list(line)
        out = model.generate(torch.tensor([transcript]), 12)[0, len(transcript):].tolist()
        text = bytes(out).decode("utf-8", errors="replace")
        assert reply == text.split("\n")[0]
        cut = text.find("\n")
        transcript += out[: cut + 1] if cut >= 0 else [*out, *b"\n"]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@contextmanager
def _serving(app: Any) -> Iterator[Any]:
    """``app``, running on a real server on the loopback interface (``app.state.url``)."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started
    app.state.url = f"http://127.0.0.1:{port}"
    try:
        yield app
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[Any]:
    """The app serving the test model with the byte tokenizer, on a real server."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from yet_another_retnet.serve.server import build_app

    with _serving(build_app(RetNet.from_pretrained(model_dir), ByteTokenizer(), max_batch=16,
                            max_tokens_limit=500)) as app:
        yield app


def _body(i: int, stream: bool) -> dict[str, Any]:
    return {"prompt": f"request {i}: ", "max_tokens": 10 + i % 3, "temperature": 0 if i % 2 else 1.0,
            "top_p": 0.9, "seed": 100 + i, "stream": stream}


async def _complete(client: Any, body: dict[str, Any]) -> str:
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["text"])
    text, done = [], False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            text.append(json.loads(line[6:])["choices"][0]["text"])
    assert done
    return "".join(text)


@pytest.fixture()
def server(served: Any) -> str:
    return str(served.state.url)


def test_concurrent_clients_get_what_they_get_alone(served: Any) -> None:
    httpx = pytest.importorskip("httpx")
    engine = served.state.engine
    bodies = [_body(i, stream=i % 3 != 0) for i in range(12)]
    # A request reads its prompt one token per step, then samples max_tokens tokens, the first
    # from its last prompt token's logits.
    needs = [len(ByteTokenizer().encode(str(b["prompt"]))) + int(b["max_tokens"]) - 1 for b in bodies]

    async def go() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=served.state.url, timeout=120) as client:
            # Hold the engine until all twelve are queued, so that they are admitted together
            # whatever the speed of this machine: the step count is then exact.
            engine.stop()
            try:
                steps = (await client.get("/health")).json()["steps"]
                pending = asyncio.gather(*(_complete(client, b) for b in bodies))
                deadline = time.monotonic() + 60
                while (await client.get("/health")).json()["waiting"] < len(bodies):
                    assert time.monotonic() < deadline, "the requests never reached the engine's queue"
                    await asyncio.sleep(0.01)
            finally:
                engine.start()
            together = await pending
            batched_steps = (await client.get("/health")).json()["steps"] - steps
            # Decoded together: as many batch steps as the longest request needs, not the sum.
            assert batched_steps == max(needs), (batched_steps, needs)
            alone = [await _complete(client, b) for b in bodies]
            return list(together), alone

    together, alone = asyncio.run(go())
    assert together == alone
    assert len(set(alone)) > 1 and all(alone)


def test_chat_completions_shape(server: str) -> None:
    httpx = pytest.importorskip("httpx")
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 5, "temperature": 0}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 5
    prompt = list(b"System: be brief\nUser: hi\nAssistant:")
    assert data["usage"]["prompt_tokens"] == len(prompt)


def test_disconnect_frees_the_slot_and_bad_requests_get_400(server: str) -> None:
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=server, timeout=60) as client:
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "long ", "max_tokens": 500, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 30
        while client.get("/health").json()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/health").json()
        assert health["active"] == 0 and health["waiting"] == 0
        for body, field in (({"max_tokens": 3}, "prompt"), ({"prompt": "x", "temperature": -1}, "temperature"),
                            ({"prompt": "x", "max_tokens": 501}, "max_tokens"), ({"prompt": ""}, "prompt"),
                            ({"prompt": "x", "max_tokens": "many"}, "max_tokens")):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            assert field in r.json()["error"]["message"]
        r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
        assert r.status_code == 400 and "role" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json={"prompt": "still serving ", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_quantize_command_builds_out_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A sharded SRC quantizes (its size from its shards); a failure half-way (a full disk while
    copying the tokenizer) leaves no OUT, which would otherwise load with the byte tokenizer."""
    import errno
    import shutil

    torch.manual_seed(0)
    src = tmp_path / "sharded"
    RetNet(RetNetConfig.from_preset("tiny", num_layers=2)).save_pretrained(src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    (src / "tokenizer_config.json").write_text(json.dumps({"type": "byte"}))
    out = tmp_path / "int8"
    real_copyfile = shutil.copyfile

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    assert main(["quantize", str(src), str(out)]) == 2
    assert "No space left" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["sharded"]  # no temporary left
    monkeypatch.setattr(shutil, "copyfile", real_copyfile)
    assert main(["quantize", str(src), str(out)]) == 0
    shards = sum(p.stat().st_size for p in src.glob("model-*.safetensors"))
    assert f"(was {shards / 2**20:,.1f} MiB)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "quantization.json",
                                                      "tokenizer_config.json"]
    assert RetNet.from_pretrained(out).config == RetNet.from_pretrained(src).config


# --------------------------------------------------------------------------------------------
# Ends of a generation, refused requests, clients that leave
# --------------------------------------------------------------------------------------------


def _wait_idle(client: Any) -> dict[str, Any]:
    """``/health`` once nothing is in flight or waiting (or after a deadline that only a hang meets)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health: dict[str, Any] = client.get("/health").json()
        if not health["active"] and not health["waiting"]:
            return health
        time.sleep(0.05)
    return dict(client.get("/health").json())


def _completion(client: Any, body: dict[str, Any]) -> tuple[str, str]:
    """(text, finish_reason) of a completion, streamed or not."""
    if not body.get("stream"):
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
    pieces, finish = [], None
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                finish = json.loads(line[6:])["choices"][0]["finish_reason"]
    return "".join(pieces), str(finish)


def test_a_client_that_leaves_a_non_streaming_request_frees_its_slot(served: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A non-streaming client that disconnects has its request cancelled: a queued one never runs
    (so no step at all), where it used to run to max_tokens for nobody."""
    httpx = pytest.importorskip("httpx")
    engine = served.state.engine
    submitted: list[Any] = []
    submit = engine.submit
    monkeypatch.setattr(engine, "submit", lambda request: (submitted.append(request), submit(request))[1])
    port = int(served.state.url.rsplit(":", 1)[1])
    body = json.dumps({"prompt": "long ", "max_tokens": 500, "temperature": 0}).encode()
    with httpx.Client(base_url=served.state.url, timeout=60) as client:
        steps = client.get("/health").json()["steps"]
        # Held in the queue, so that the request is still waiting when its client leaves.
        engine.stop()
        try:
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                deadline = time.monotonic() + 30
                while client.get("/health").json()["waiting"] < 1:
                    assert time.monotonic() < deadline, "the request never reached the engine's queue"
                    time.sleep(0.01)
            assert submitted[0].cancelled.wait(30), "the server never cancelled the request of a client that left"
        finally:
            engine.start()
        health = _wait_idle(client)
    assert health["active"] == 0 and health["waiting"] == 0
    assert health["steps"] == steps  # cancelled before it ran: no step for nobody


class _PretrainedBytes(ByteTokenizer):
    """Bytes, with a pretrained model's special tokens: ``bos`` starts every prompt (``add_bos``),
    ``eos`` (here a byte the test model is known to write) ends a generation."""

    def __init__(self, bos: int, eos: int) -> None:
        super().__init__()
        self.add_bos, self.bos_token_id, self.eos_token_id = True, bos, eos


def test_the_server_and_chat_start_with_bos_and_stop_at_eos(model_dir: Path) -> None:
    """As `retnet generate`: a prompt starts with the tokenizer's bos when it asks for one, and a
    generation ends at its eos, which is not shown (finish_reason "stop")."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from yet_another_retnet.serve.chat import Chat
    from yet_another_retnet.serve.server import build_app

    # One transcript for all three: a completion's prompt, a chat request's, `retnet chat`'s turn.
    model, bos, transcript = RetNet.from_pretrained(model_dir), 1, f"{USER}hi\n{ASSISTANT}"
    out = model.generate(torch.tensor([[bos, *transcript.encode()]]), 60)[0, 1 + len(transcript):].tolist()
    # The eos: a token the model writes greedily for the first time a few tokens in.
    k = next(k for k in range(3, len(out)) if out[k] not in out[:k])
    eos, before = out[k], out[:k]
    assert 10 not in out[:k + 1]  # no line break: the chat replies end at the eos
    text = bytes(before).decode("utf-8", errors="replace")
    tokenizer = _PretrainedBytes(bos, eos)
    body = {"max_tokens": 50, "temperature": 0}
    with _serving(build_app(model, tokenizer, max_tokens_limit=500)) as app, \
            httpx.Client(base_url=app.state.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"prompt": transcript, **body})
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["choices"][0]["text"] == text and data["choices"][0]["finish_reason"] == "stop"
        assert data["usage"]["prompt_tokens"] == 1 + len(transcript)
        assert data["usage"]["completion_tokens"] == len(before) + 1  # the eos was generated
        assert _completion(client, {"prompt": transcript, "stream": True, **body}) == (text, "stop")
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == text
        assert r.json()["choices"][0]["finish_reason"] == "stop"
    # `retnet chat`: the conversation starts with bos; the reply ends at eos, unseen, and the model
    # reads the eos and a line break first next turn.
    chat = Chat(model, tokenizer, max_new_tokens=50, temperature=0)
    assert "".join(chat.turn("hi")) == text
    assert chat.transcript[0] == bos and chat.prefilled == [1 + len(transcript)]
    assert chat.pending == [eos, 10]


def test_a_chat_reply_ends_at_its_line_break(server: str) -> None:
    """/v1/chat/completions stops where the assistant's turn ends (its line break, where the
    transcript's next "User:" line would begin), as `retnet chat` does: finish_reason "stop"."""
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=server, timeout=60) as client:
        # The same transcript as a plain completion, sampled with seeds until one writes a line break.
        for seed in range(20):
            body = {"max_tokens": 400, "temperature": 1.0, "seed": seed}
            full = client.post("/v1/completions", json={"prompt": f"User: hi\n{ASSISTANT}", **body}).json()
            text = full["choices"][0]["text"]
            if "\n" in text[1:]:
                break
        else:
            pytest.fail("no seed gave a line break")
        reply = text.split("\n", 1)[0]
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == reply
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert r.json()["usage"]["completion_tokens"] < 400
        streamed, finish = [], None
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}], "stream": True, **body}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"]
        assert "".join(streamed) == reply and finish == "stop"
        assert _wait_idle(client)["active"] == 0  # the stop freed the slot


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(server: str, stream: bool) -> None:
    httpx = pytest.importorskip("httpx")
    base = {"prompt": "request 1: ", "max_tokens": 40, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=server, timeout=60) as client:
        full, finish = _completion(client, base)
        assert finish == "length"
        # Three characters (three tokens or more) met first at `at`.
        at = next(i for i in range(2, len(full) - 3) if "\ufffd" not in full[i:i + 3] and full.find(full[i:i + 3]) == i)
        stop = full[at:at + 3]
        assert _completion(client, {**base, "stop": stop}) == (full[:at], "stop")
        assert _completion(client, {**base, "stop": ["\x00never\x00", stop]}) == (full[:at], "stop")
        # The start of a stop string at the very end is held back, then sent when the text ends.
        unmet = full[-1] + "\x00\x00"
        assert unmet not in full
        assert _completion(client, {**base, "stop": unmet}) == (full, "length")
        assert _wait_idle(client)["active"] == 0  # a stop string freed its slot


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_and_penalties_reach_the_tokens(server: str, stream: bool) -> None:
    """Over HTTP: a +100 bias on one byte's id makes every token that byte (the byte tokenizer's
    ids are the bytes); a -100 bias on the greedy text's first byte keeps it out; a negative
    frequency penalty (repeats rewarded) changes the greedy text."""
    httpx = pytest.importorskip("httpx")
    base = {"prompt": "hello ", "max_tokens": 12, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=server, timeout=60) as client:
        full, _ = _completion(client, base)
        assert _completion(client, {**base, "logit_bias": {str(ord("q")): 100}}) == ("q" * 12, "length")
        banned, _ = _completion(client, {**base, "logit_bias": {str(ord(full[0])): -100}})
        assert full[0] not in banned
        assert _completion(client, {**base, "frequency_penalty": -2, "presence_penalty": -2})[0] != full
        assert _completion(client, {**base, "frequency_penalty": 0, "logit_bias": {}}) == (full, "length")


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_the_models_own(served: Any, model_dir: Path, stream: bool) -> None:
    """``logprobs`` in both shapes: each generated token's log-probability and its alternatives
    are the log-softmax of the model's logits at that step (computed here by hand), in OpenAI's
    layout; streamed, the chunks' entries join to the same list."""
    httpx = pytest.importorskip("httpx")
    model = RetNet.from_pretrained(model_dir)
    prompt = "logprobs: "
    ids = list(prompt.encode())
    out = model.generate(torch.tensor([ids]), 8)[0, len(ids):].tolist()  # greedy, as asked below
    with torch.no_grad():
        logits = model(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1:]
    want = torch.log_softmax(logits.float(), dim=-1)

    def post(path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        body = {**body, "max_tokens": 8, "temperature": 0, "stream": stream}
        if not stream:
            r = httpx.post(server + path, json=body, timeout=60)
            assert r.status_code == 200, r.text
            return [r.json()["choices"][0]["logprobs"]]
        with httpx.stream("POST", server + path, json=body, timeout=60) as r:
            return [json.loads(line[6:])["choices"][0]["logprobs"] for line in r.iter_lines()
                    if line.startswith("data: {")]

    server = str(served.state.url)
    parts = post("/v1/completions", {"prompt": prompt, "logprobs": 3})
    tokens = [t for p in parts for t in p["tokens"]]
    # (A byte of a longer character is named as OpenAI names such tokens.)
    assert tokens == [f"bytes:\\x{t:02x}" if t >= 0x80 else chr(t) for t in out]
    for i, lp in enumerate(t for p in parts for t in p["token_logprobs"]):
        assert abs(lp - float(want[i, out[i]])) < 1e-4
    tops = [t for p in parts for t in p["top_logprobs"]]
    assert all(len(top) <= 3 for top in tops) and len(tops) == len(out)
    # A token's text offset: the characters the tokens before it decoded to (a byte that starts
    # a character adds none until the character is complete).
    utf8, at, offsets = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0, []
    for t in out:
        offsets.append(at)
        at += len(utf8.decode(bytes([t])))
    assert [o for p in parts for o in p["text_offset"]] == offsets
    # Chat: the tokens' own bytes, and top_logprobs in order (most likely first).
    transcript = list(f"User: hi\n{ASSISTANT}".encode())
    chat_out = model.generate(torch.tensor([transcript]), 8)[0, len(transcript):].tolist()
    with torch.no_grad():
        chat_logits = model(torch.tensor([transcript + chat_out[:-1]])).logits[0, len(transcript) - 1:]
    chat_want = torch.log_softmax(chat_logits.float(), dim=-1)
    parts = post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                          "top_logprobs": 4})
    entries = [e for p in parts for e in p["content"]]
    reply = chat_out[:chat_out.index(10) + 1] if 10 in chat_out else chat_out  # the reply ends at its line break
    assert [e["bytes"] for e in entries] == [[t] for t in reply]
    for i, e in enumerate(entries):
        assert abs(e["logprob"] - float(chat_want[i, reply[i]])) < 1e-4
        best = torch.topk(chat_want[i], 4)
        assert [a["bytes"] for a in e["top_logprobs"]] == [[t] for t in best.indices.tolist()]
        assert all(abs(a["logprob"] - float(v)) < 1e-4 for a, v in zip(e["top_logprobs"], best.values, strict=True))
    r = httpx.post(server + "/v1/completions", json={"prompt": prompt, "max_tokens": 2}, timeout=60)
    assert r.json()["choices"][0]["logprobs"] is None  # not asked, not computed


def test_n_choices_are_the_requests_of_their_seeds(server: str) -> None:
    """``n`` choices, streamed or not: choice i is what a request of its own with seed + i gets
    (with logprobs too), each chunk names its choice, the usage counts them all; a client leaving
    a stream of several choices frees every slot; choices beyond the batch wait for its rows, and
    more than may wait is a 400 naming the field."""
    httpx = pytest.importorskip("httpx")
    base = {"prompt": "three ways ", "max_tokens": 9, "temperature": 0.9, "seed": 7}
    with httpx.Client(base_url=server, timeout=60) as client:
        alone = [client.post("/v1/completions", json={**base, "seed": 7 + i, "logprobs": 1}).json()["choices"][0]
                 for i in range(3)]
        r = client.post("/v1/completions", json={**base, "n": 3, "logprobs": 1})
        assert r.status_code == 200, r.text
        got = r.json()
        assert [c["index"] for c in got["choices"]] == [0, 1, 2]
        assert [c["text"] for c in got["choices"]] == [a["text"] for a in alone]
        for c, a in zip(got["choices"], alone, strict=True):  # (batched rows round a little differently)
            assert c["logprobs"]["tokens"] == a["logprobs"]["tokens"]
            assert c["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)
        assert len({a["text"] for a in alone}) > 1  # the seeds differ, so do the choices
        assert got["usage"]["completion_tokens"] == 27
        texts: dict[int, str] = {0: "", 1: "", 2: ""}
        with client.stream("POST", "/v1/completions", json={**base, "n": 3, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    (c,) = json.loads(line[6:])["choices"]
                    texts[c["index"]] += c["text"]
        assert [texts[i] for i in range(3)] == [a["text"] for a in alone]
        with client.stream("POST", "/v1/completions",
                           json={"prompt": "long ", "max_tokens": 500, "n": 3, "stream": True}) as s:
            assert next(line for line in s.iter_lines() if line.startswith("data: "))
        health = _wait_idle(client)
        assert health["active"] == 0 and health["waiting"] == 0
        # More choices than the batch's 16 rows wait for free ones: all answered, each its seed's.
        r = client.post("/v1/completions", json={**base, "n": 18, "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["choices"]) == 18
        assert r.json()["choices"][17]["text"] == client.post("/v1/completions", json={
            **base, "seed": 7 + 17, "max_tokens": 3}).json()["choices"][0]["text"]
        r = client.post("/v1/completions", json={**base, "prompt": ["a", "b", "c"], "n": 100})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt: at most 256")


@pytest.mark.parametrize("stream", [False, True])
def test_echo_returns_the_prompt_and_scores_its_tokens(served: Any, model_dir: Path, stream: bool) -> None:
    """``echo``: the prompt's text before the completion's (stop strings cut the completion only);
    with ``logprobs``, the prompt's tokens come first, the first with a null logprob and each
    other scored by the model's logits at the position before it (by hand here), as a client
    scoring text over the API (lm-eval's completions models) reads them."""
    httpx = pytest.importorskip("httpx")
    server = str(served.state.url)
    prompt = "score this text"
    ids = list(prompt.encode())
    with torch.no_grad():
        logits = RetNet.from_pretrained(model_dir)(torch.tensor([ids])).logits[0]
    want = torch.log_softmax(logits.float(), dim=-1)
    base = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
    with httpx.Client(base_url=server, timeout=60) as client:
        plain, _ = _completion(client, {**base})
        assert _completion(client, {**base, "echo": True}) == (prompt + plain, "length")
        if plain[2:4] and "\ufffd" not in plain[2:4]:
            assert _completion(client, {**base, "echo": True, "stop": plain[2:4]})[0] == prompt + plain[:2]
        body = {**base, "echo": True, "logprobs": 2, "max_tokens": 1}
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as r:
                parts = [json.loads(line[6:])["choices"][0]["logprobs"] for line in r.iter_lines()
                         if line.startswith("data: {")]
        else:
            parts = [client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]]
    tokens = [t for p in parts for t in p["tokens"]]
    scores = [v for p in parts for v in p["token_logprobs"]]
    tops = [v for p in parts for v in p["top_logprobs"]]
    offsets = [v for p in parts for v in p["text_offset"]]
    assert tokens[:len(ids)] == list(prompt) and len(tokens) == len(ids) + 1
    assert scores[0] is None and tops[0] is None
    for i in range(1, len(ids)):
        assert abs(scores[i] - float(want[i - 1, ids[i]])) < 1e-4, i
        best = torch.topk(want[i - 1], 2).values.tolist()
        assert len(tops[i]) == 2 and sorted(tops[i].values(), reverse=True) == pytest.approx(best, abs=1e-4)
    assert scores[-1] == pytest.approx(float(want[-1].max()), abs=1e-4)  # the greedy token, from the last position
    assert offsets == list(range(len(ids) + 1))


def test_prompts_of_token_ids_and_several_prompts(server: str) -> None:
    """OpenAI's other prompt forms: token ids (what a client with the model's tokenizer sends,
    lm-eval's completions models among them), and a list of prompts, each with its n choices
    (index = prompt * n + choice), each what it gets alone."""
    httpx = pytest.importorskip("httpx")
    base = {"max_tokens": 6, "temperature": 0.8, "seed": 3}
    with httpx.Client(base_url=server, timeout=60) as client:
        def texts(body: dict[str, Any]) -> list[str]:
            r = client.post("/v1/completions", json={**base, **body})
            assert r.status_code == 200, r.text
            return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

        alone = {p: texts({"prompt": p, "n": 2}) for p in ("first ", "second one ")}
        assert texts({"prompt": list(b"first "), "n": 2}) == alone["first "]
        assert texts({"prompt": ["first ", "second one "], "n": 2}) == alone["first "] + alone["second one "]
        assert texts({"prompt": [list(b"second one "), list(b"first ")]}) == [alone["second one "][0],
                                                                              alone["first "][0]]
        r = client.post("/v1/completions", json={**base, "prompt": list(b"echo"), "echo": True})
        assert r.json()["choices"][0]["text"].startswith("echo")
        for prompt, field in (([], "prompt"), ([1, 999], "prompt"), ([[1], []], "prompt[1]"),
                              ([["a"]], "prompt"), ([1, "a"], "prompt"), (["a"] * 257, "prompt")):
            r = client.post("/v1/completions", json={**base, "prompt": prompt})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), (prompt, r.text)


def test_unknown_and_unsupported_fields_are_refused(server: str) -> None:
    """A field this server does not know (a typo) or does not implement, set to anything but its
    default, or set out of its range, is a 400 naming it, not a 200 that ignores what was asked."""
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=server, timeout=60) as client:
        for body, field in (({"max_token": 3}, "max_token"), ({"presence_penalty": 2.5}, "presence_penalty"),
                            ({"frequency_penalty": -2.01}, "frequency_penalty"),
                            ({"logprobs": 6}, "logprobs"), ({"logprobs": True}, "logprobs"),
                            ({"logprobs": -1}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                            ({"echo": "maybe"}, "echo"), ({"logit_bias": {"abc": 10}}, "logit_bias"),
                            ({"logit_bias": {"256": 1}}, "logit_bias"), ({"logit_bias": {"65": 100.5}}, "logit_bias"),
                            ({"max_completion_tokens": 501}, "max_completion_tokens"),
                            ({"max_completion_tokens": 3, "max_tokens": 4}, "max_completion_tokens"),
                            ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
                            ({"stop": 3}, "stop")):
            for stream in (False, True):
                r = client.post("/v1/completions", json={"prompt": "x", "stream": stream, **body})
                assert r.status_code == 400, (body, r.text)
                assert r.json()["error"]["message"].startswith(field), (body, r.text)
        for body, field in (({"logprobs": 2}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")):
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], **body})
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(field), (body, r.text)
        # Their defaults are accepted; max_completion_tokens is max_tokens' other name.
        r = client.post("/v1/completions", json={"prompt": "x", "temperature": 0, "logprobs": None, "echo": False,
                                                 "logit_bias": None, "max_completion_tokens": 3})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        # What OpenAI's own client sends along: an end-user id, zero penalties, stream options.
        r = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "temperature": 0, "user": "u-1",
            "presence_penalty": 0, "frequency_penalty": 0.0})
        assert r.status_code == 200, r.text
        chunks = []
        with client.stream("POST", "/v1/completions", json={
                "prompt": "x", "max_tokens": 3, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
        assert all(c["choices"] for c in chunks[:-1])
        r = client.post("/v1/completions", json={"prompt": "x", "stream_options": {"include_usage": 1, "x": 2}})
        assert r.status_code == 400


def test_seeds_outside_the_generators_range_get_400(server: str) -> None:
    httpx = pytest.importorskip("httpx")
    with httpx.Client(base_url=server, timeout=60) as client:
        for seed in (2**64, -(2**63) - 1, 10**30):
            for stream in (False, True):
                r = client.post("/v1/completions", json={"prompt": "x", "seed": seed, "stream": stream})
                assert r.status_code == 400, (seed, r.text)
                assert r.json()["error"]["message"].startswith("seed"), r.text
        for seed in (2**64 - 1, -(2**63), -1, 0):  # what torch.Generator.manual_seed takes
            r = client.post("/v1/completions", json={"prompt": "x", "seed": seed, "max_tokens": 2})
            assert r.status_code == 200, (seed, r.text)


def test_a_full_queue_gets_503_and_a_long_prompt_400(model_dir: Path) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from yet_another_retnet.serve.server import build_app

    # "User: xxxxxxxx\nAssistant:" is 25 tokens, one too many.
    app = build_app(RetNet.from_pretrained(model_dir), ByteTokenizer(), max_waiting=2, max_prompt_tokens=24)

    async def go(url: str) -> None:
        engine = app.state.engine
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            engine.stop()  # nothing leaves the queue until the engine starts again
            try:
                queued = asyncio.gather(*(client.post("/v1/completions", json={"prompt": f"q{i}", "max_tokens": 2})
                                          for i in range(2)))
                deadline = time.monotonic() + 60
                while (await client.get("/health")).json()["waiting"] < 2:
                    assert time.monotonic() < deadline, "the requests never reached the engine's queue"
                    await asyncio.sleep(0.01)
                r = await client.post("/v1/completions", json={"prompt": "one too many", "max_tokens": 2})
                assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
                assert "busy" in r.json()["error"]["message"]
                r = await client.post("/v1/completions", json={"prompt": "x" * 25, "max_tokens": 2})
                assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt"), r.text
                r = await client.post("/v1/chat/completions",
                                      json={"messages": [{"role": "user", "content": "x" * 8}], "max_tokens": 2})
                assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages"), r.text
            finally:
                engine.start()
            assert [r.status_code for r in await queued] == [200, 200]
            r = await client.post("/v1/completions", json={"prompt": "x" * 24, "max_tokens": 2})
            assert r.status_code == 200, r.text

    with _serving(app) as running:
        asyncio.run(go(running.state.url))


def test_an_abandoned_chat_turn_is_read_at_the_next(model_dir: Path) -> None:
    """A reply whose reader stopped early: the token it ended on was never read by the model, so
    it goes first next turn, then a line break, as for a reply cut off at --max-new-tokens."""
    from yet_another_retnet.serve.chat import Chat

    model = RetNet.from_pretrained(model_dir)
    chat = Chat(model, ByteTokenizer(), max_new_tokens=12, temperature=0)
    reply = chat.turn("hi there")
    first = next(reply)
    assert first and "\n" not in first
    reply.close()  # the caller stops reading
    line = f"{USER}and again\n{ASSISTANT}".encode()
    transcript = [*chat.transcript, *line]
    assert transcript[-len(line) - 1] == 10  # a line break ended the abandoned reply
    second = "".join(chat.turn("and again"))
    assert chat.prefilled[1] == 2 + len(line)  # the unread token, the line break, the new line
    # Each reply is what greedy decoding of the whole transcript so far gives.
    out = model.generate(torch.tensor([transcript]), 12)[0, len(transcript):].tolist()
    assert second == bytes(out).decode("utf-8", errors="replace").split("\n")[0]


@pytest.mark.parametrize("argv, flag", [
    (["chat", "--top-p", "0"], "--top-p"), (["chat", "--top-p", "-1"], "--top-p"),
    (["chat", "--top-p", "nan"], "--top-p"), (["chat", "--top-p", "2"], "--top-p"),
    (["chat", "--temperature", "-1"], "--temperature"), (["chat", "--temperature", "nan"], "--temperature"),
    (["chat", "--temperature", "inf"], "--temperature"),
    (["serve", "--max-tokens-limit", "0"], "--max-tokens-limit"),
    (["serve", "--max-tokens-limit", "-5"], "--max-tokens-limit"),
    (["serve", "--max-waiting", "0"], "--max-waiting"), (["serve", "--max-prompt-tokens", "0"], "--max-prompt-tokens"),
])
def test_chat_and_serve_check_their_flags(argv: list[str], flag: str, model_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("served despite a bad flag"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n\n"))
    capsys.readouterr()
    assert main([argv[0], str(model_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err, err


def test_lm_evals_completions_model_scores_and_generates_through_the_server(tmp_path: Path) -> None:
    """lm-eval's own OpenAI-completions model (``local-completions``) against ``retnet serve``:
    it tokenizes with the model's tokenizer (transformers loads it from the directory), sends
    token ids with ``echo`` and ``logprobs``, and reads the continuation's scores out of the
    prompt's entries. Its log-likelihoods and greedy flags equal the model's own (computed here
    by hand); its generation, with a stop word, is the model's greedy text cut there."""
    pytest.importorskip("lm_eval")
    tokenizers = pytest.importorskip("tokenizers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from yet_another_retnet.serve.server import build_app
    from yet_another_retnet.training.data import HFTokenizer

    words = {f"w{i}": i for i in range(32)} | {"</s>": 32}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # words joined by spaces
    tok.save(str(tmp_path / "tokenizer.json"))
    ours = HFTokenizer(tmp_path / "tokenizer.json")
    ours.save(tmp_path)  # tokenizer_config.json: what transformers' AutoTokenizer reads
    torch.manual_seed(1)
    model = RetNet(RetNetConfig.from_preset("tiny", num_layers=2, vocab_size=33, init_std=0.2,
                                            tie_embeddings=False)).eval()
    pairs = [("w1 w2 w3", " w4 w5"), ("w7", " w7 w7 w7"), ("w3 w9 w12 w3", " w30")]
    with _serving(build_app(model, ours, max_batch=4)) as app:
        lm = LocalCompletionsAPI(base_url=f"{app.state.url}/v1/completions", model="retnet",
                                 tokenizer_backend="huggingface", tokenizer=str(tmp_path), tokenized_requests=True,
                                 max_retries=1)
        scored = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
        generated = lm.generate_until([Instance("generate_until", {}, ("w1 w2", {"until": ["w5"], "max_gen_toks": 8}),
                                                0)])
    for (context, continuation), (logprob, greedy) in zip(pairs, scored, strict=True):
        ctx, cont = ours.encode(context), ours.encode(continuation)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), dim=-1)
        rows = logp[len(ctx) - 1:-1]
        assert abs(logprob - float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum())) < 1e-3
        assert greedy == bool((rows.argmax(-1) == torch.tensor(cont)).all())
    out = model.generate(torch.tensor([ours.encode("w1 w2")]), 8)[0, 2:].tolist()
    text = ours.decode(out)
    assert generated == [text.split("w5")[0]]
