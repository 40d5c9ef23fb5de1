"""``retnet quantize``, ``retnet chat`` and ``retnet serve``: driven as a user would (stdin, a real
HTTP client against a real server on the loopback interface)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def served(model_dir: Path) -> Iterator[Any]:
    """The app, running on a real server on the loopback interface (``app.state.url``)."""
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from yet_another_retnet.serve.server import build_app

    app = build_app(RetNet.from_pretrained(model_dir), ByteTokenizer(), max_batch=16, max_tokens_limit=500)
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
    yield app
    srv.should_exit = True
    thread.join(30)
    sock.close()


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
