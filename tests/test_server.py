"""The OpenAI-compatible server: the HTTP surface against a fake engine (fast), then `shardwise serve` for real.

The fake engine follows the engine contract (tokenizer, model_name, seq_len, eos_token_ids,
check_request, submit -> handle.cancel) with a byte-level tokenizer: one token per UTF-8 byte, so
multi-byte characters arrive split over tokens, which is what incremental detokenization must handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from conftest import TORCHPRIME_FSDP_TP
from fastapi.testclient import TestClient  # noqa: E402

from shardwise.engine.types import EngineBusy, EngineClosed, TokenEvent  # noqa: E402
from shardwise.errors import ShardwiseError  # noqa: E402
from shardwise.server.app import create_app  # noqa: E402
from shardwise.server.detokenize import TextStream  # noqa: E402

REPLY = "Hi, wörld 🤖 ok."  # 2-byte and 4-byte characters: split over tokens by the byte tokenizer


class ByteTokenizer:
    """Token id = UTF-8 byte + 3; ids 0 (pad), 1 (bos) and 2 (eos) are special."""

    chat_template = "<role>content per line, then <assistant>"
    eos_token_id = 2

    def __len__(self) -> int:
        return 259

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [b + 3 for b in text.encode()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
        return text if skip_special_tokens or 2 not in ids else text + "<eos>"

    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = True):
        for m in messages:
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {m['role']}\nsecond line of a jinja error")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        text += "<assistant>" if add_generation_prompt else ""
        return {"input_ids": self(text)["input_ids"]} if tokenize else text


class FakeHandle:
    def __init__(self, engine: FakeEngine, request_id: int):
        self.engine, self.request_id = engine, request_id
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.engine.cancelled.append(self.request_id)
        self.cancelled.set()


class FakeEngine:
    """Answers REPLY then EOS (or loops it forever: ``endless``), one token per ``delay`` seconds, on a thread."""

    model_name = "fake-model"
    seq_len = 128
    eos_token_ids = (2,)

    def __init__(self, reply: str = REPLY, delay: float = 0.0, endless: bool = False, fail: str | None = None):
        self.tokenizer = ByteTokenizer()
        self.reply, self.delay, self.endless, self.fail = reply, delay, endless, fail
        self.busy = self.closed = False
        self.submitted: list[tuple[list[int], object, int]] = []
        self.cancelled: list[int] = []
        self.threads: list[threading.Thread] = []

    def check_request(self, prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise ShardwiseError("the prompt is empty")
        if len(prompt_ids) + max_tokens > self.seq_len:
            raise ShardwiseError(f"prompt + max_tokens is more than the context of {self.seq_len} tokens")

    def submit(self, prompt_ids, sampling, max_tokens, on_event, ignore_eos=False) -> FakeHandle:
        if self.busy:
            raise EngineBusy("the queue is full (256 requests are waiting)")
        if self.closed:
            raise EngineClosed("the engine was closed")
        self.check_request(prompt_ids, max_tokens)
        handle = FakeHandle(self, len(self.submitted))
        self.submitted.append((list(prompt_ids), sampling, max_tokens))
        thread = threading.Thread(target=self._run, args=(handle, max_tokens, on_event), daemon=True)
        self.threads.append(thread)
        thread.start()
        return handle

    def _run(self, handle: FakeHandle, max_tokens: int, on_event) -> None:
        reply = self.tokenizer(self.reply)["input_ids"]
        tokens = iter(lambda: 0, 1) if self.endless else iter(range(len(reply) + 1))
        for n, i in enumerate(tokens):
            if handle.cancelled.wait(self.delay):
                on_event(TokenEvent(handle.request_id, None, "cancelled"))
                return
            if self.fail and n == 3:
                on_event(TokenEvent(handle.request_id, None, "error", self.fail))
                return
            token = reply[n % len(reply)] if self.endless or i < len(reply) else 2
            finish = "stop" if token == 2 else "length" if n + 1 == max_tokens else None
            on_event(TokenEvent(handle.request_id, token, finish))
            if finish:
                return


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine)) as c:
        yield c


def events(response) -> list:
    """The SSE body as decoded JSON objects, with "[DONE]" kept as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("data: [DONE]\n\n"), body[-200:]
    out = []
    for block in body.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(response, status: int, param: str | None = None, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error["message"]


# --- responses ---------------------------------------------------------------------------------------------


def test_completion_shape_and_usage(client, engine):
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "abc", "max_tokens": 40,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "fake-model"
    assert body["choices"] == [{"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop"}]
    n = len(REPLY.encode()) + 1  # the EOS token counts as generated
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}
    prompt, sampling, max_tokens = engine.submitted[0]
    assert prompt == [ord(c) + 3 for c in "abc"] and max_tokens == 40
    assert sampling.greedy and sampling.top_k == 1


def test_completion_defaults_and_length(client, engine):
    r = client.post("/v1/completions", json={"prompt": "abc"})  # model optional; max_tokens defaults to 16
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == REPLY.encode()[:16].decode()
    assert body["usage"]["completion_tokens"] == 16
    _, sampling, max_tokens = engine.submitted[0]
    assert max_tokens == 16
    # OpenAI's defaults: temperature 1 (sampling), top_p 1; no top-k filter is top_k=0 for sample().
    assert not sampling.greedy and (sampling.top_k, sampling.top_p, sampling.temperature) == (0, 1.0, 1.0)


@pytest.mark.parametrize("prompt", ["abc", ["abc"], [100, 101, 102], [[100, 101, 102]]])
def test_prompt_forms(client, engine, prompt):
    assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200
    expected = [ord(c) + 3 for c in "abc"] if "abc" in json.dumps(prompt) else [100, 101, 102]
    assert engine.submitted[0][0] == expected


def test_sampling_mapping(client, engine):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1, "temperature": 0.7, "top_p": 0.9,
                                             "seed": -5, "top_k": 40})
    assert r.status_code == 200, r.text
    sampling = engine.submitted[0][1]
    assert (sampling.top_k, sampling.top_p, sampling.temperature) == (40, 0.9, 0.7)
    assert 0 <= sampling.seed < 1 << 63 and sampling.seed == -5 % (1 << 63)


def test_chat_uses_template(client, engine):
    r = client.post("/v1/chat/completions", json={
        "model": "fake-model", "max_tokens": 50, "temperature": 0,
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = engine.submitted[0][0]
    assert bytes(i - 3 for i in prompt).decode() == "<system>be brief\n<user>hi\n<assistant>"
    assert body["usage"]["prompt_tokens"] == len(prompt)


def test_chat_default_max_tokens_fills_the_context(client, engine):
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    prompt, _, max_tokens = engine.submitted[0]
    assert len(prompt) + max_tokens == engine.seq_len


def test_stop_strings(client, engine):
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 40, "stop": ["rld", "zzz"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == "Hi, wö" and choice["finish_reason"] == "stop"
    assert engine.cancelled == [0]  # the engine stops generating once the stop string is seen
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 40, "stop": "🤖", "stream": True})
    chunks = events(r)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hi, wörld "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


# --- streaming ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens", [40, 9])
def test_completion_stream(client, max_tokens):
    plain = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": max_tokens}).json()
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": max_tokens, "stream": True,
                                             "stream_options": {"include_usage": True}})
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    usage_chunk, finish_chunk, deltas = chunks[-2], chunks[-3], chunks[:-3]
    for c in chunks[:-1]:
        assert c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["model"] == "fake-model"
    assert all(c["choices"][0]["finish_reason"] is None and c["choices"][0]["text"] for c in deltas)
    assert "\ufffd" not in "".join(c["choices"][0]["text"] for c in deltas)
    assert "".join(c["choices"][0]["text"] for c in deltas) == plain["choices"][0]["text"]
    assert finish_chunk["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]


def test_chat_stream(client):
    messages = [{"role": "user", "content": "hi"}]
    plain = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 60}).json()
    chunks = events(client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 60,
                                                              "stream": True}))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == plain["choices"][0]["message"]["content"] == REPLY


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    tok = ByteTokenizer()
    ids = tok("a🤖b stop c")["input_ids"]
    stream = TextStream(tok, stop=("stop",))
    deltas = [stream.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1:5] == ["", "", "", "🤖"]  # four bytes, one character, released with the last
    assert "".join(deltas) == "a🤖b " and stream.stopped
    # Text that only looked like the start of a stop string is released when it turns out not to be one.
    stream = TextStream(tok, stop=("sto!",))
    out = "".join(stream.add(i) for i in ids) + stream.finish()
    assert out == "a🤖b stop c" and not stream.stopped
    # A sequence that never completes is released at the end, as the full decode has it.
    stream = TextStream(tok)
    assert stream.add(0xF0 + 3) == "" and stream.finish() == "\ufffd"


def test_text_stream_matches_full_decode_of_real_tokenizer(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2))
    text = "Hello , world. Don't   é 日本語 🤖🤖 ok?  \n\tend"
    ids = tok(text)["input_ids"]
    stream = TextStream(tok)
    out = "".join(stream.add(i) for i in ids) + stream.finish()
    assert out == tok.decode(ids, skip_special_tokens=True) == text


def test_disconnect_mid_stream_cancels_the_request():
    engine = FakeEngine(endless=True, delay=0.005)
    app = create_app(engine)
    body = json.dumps({"prompt": "hi", "max_tokens": 60, "stream": True}).encode()
    chunks: list[bytes] = []

    async def scenario() -> None:
        gone = asyncio.Event()
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if len(chunks) >= 3:
                    gone.set()

        await asyncio.wait_for(app(_scope("/v1/completions", body), receive, send), 10)

    asyncio.run(scenario())
    assert engine.cancelled == [0]
    assert 3 <= len(chunks) < 60 and b"[DONE]" not in b"".join(chunks)


def test_disconnect_while_waiting_for_a_plain_response_cancels_it():
    engine = FakeEngine(endless=True, delay=0.02)  # 60 tokens: 1.2 s if nobody cancels
    app = create_app(engine)
    body = json.dumps({"prompt": "hi", "max_tokens": 60}).encode()
    sent: list[dict] = []

    async def scenario() -> None:
        requested = False

        async def receive():
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": body, "more_body": False}
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(app(_scope("/v1/completions", body), receive, send), 10)

    start = time.perf_counter()
    asyncio.run(scenario())
    assert engine.cancelled == [0]
    assert time.perf_counter() - start < 1.0
    assert sent[0]["status"] == 499


def _scope(path: str, body: bytes) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_model(client):
    r = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "a"})
    assert "gpt-4" in assert_error(r, 404, "model", "model_not_found")
    assert_error(client.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user",
                                                                                      "content": "a"}]}),
                 404, code="model_not_found")
    assert_error(client.get("/v1/models/gpt-4"), 404, code="model_not_found")


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "a", "n": 2}, "n"),
    ({"prompt": "a", "temperature": 2.5}, "temperature"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "logprobs": 2}, "logprobs"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, "stop"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 999]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 1.5}, "max_tokens"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "stream": "yes"}, "stream"),
    ({"prompt": "a", "model": 3}, "model"),
])
def test_bad_completion_requests(client, engine, body, param):
    assert_error(client.post("/v1/completions", json=body), 400, param)
    assert engine.submitted == []


def test_too_long_prompt(client, engine):
    r = client.post("/v1/completions", json={"prompt": "x" * 200})
    assert "maximum context length is 128" in assert_error(r, 400, "prompt", "context_length_exceeded")
    r = client.post("/v1/completions", json={"prompt": "x" * 120, "max_tokens": 20})
    assert_error(r, 400, "prompt", "context_length_exceeded")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 200}]})
    assert_error(r, 400, "messages", "context_length_exceeded")
    assert engine.submitted == []


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
])
def test_bad_chat_requests(client, engine, body, param):
    assert_error(client.post("/v1/chat/completions", json=body), 400, param)
    assert engine.submitted == []


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_bodies(client, content):
    r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_engine_busy_closed_and_failed(engine):
    with TestClient(create_app(engine)) as client:
        engine.busy = True
        assert_error(client.post("/v1/completions", json={"prompt": "a"}), 429, code="queue_full")
        engine.busy, engine.closed = False, True
        assert_error(client.post("/v1/completions", json={"prompt": "a"}), 503, code="engine_unavailable")
    failing = FakeEngine(fail="rank 1 died")
    with TestClient(create_app(failing)) as client:
        r = client.post("/v1/completions", json={"prompt": "a"})
        assert "rank 1 died" in assert_error(r, 500, code="engine_error")
        chunks = events(client.post("/v1/completions", json={"prompt": "a", "stream": True}))
        assert "rank 1 died" in chunks[-2]["error"]["message"] and chunks[-1] == "[DONE]"


def test_bug_is_a_one_line_json_500(engine, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nwith a second line")

    engine.submit = broken
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        r = client.post("/v1/completions", json={"prompt": "a"})
    message = assert_error(r, 500, code="internal_error")
    assert "boom" in message and "Traceback" not in r.text
    assert any("boom" in rec.getMessage() for rec in caplog.records)


def test_body_size_limit(client):
    from shardwise.server.middleware import MAX_BODY_BYTES

    big = b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert_error(client.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)
    # Without a length (chunked), the limit is enforced while the body arrives.
    app, sent = client.app, []

    async def scenario() -> None:
        pieces = [big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]

        async def receive():
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}

        async def send(message):
            sent.append(message)

        scope = _scope("/v1/completions", b"")
        scope["headers"] = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
        await app(scope, receive, send)

    asyncio.run(scenario())
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["message"].startswith("request body")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get("/v1/completions"), 405)


def test_api_key():
    with TestClient(create_app(FakeEngine(), api_key="sekrit")) as client:
        assert client.get("/health").status_code == 200  # liveness probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            assert_error(client.get("/v1/models", headers=headers), 401, code="invalid_api_key")
            assert_error(client.post("/v1/completions", json={"prompt": "a"}, headers=headers), 401)
            assert_error(client.get("/metrics", headers=headers), 401)
        ok = {"Authorization": "Bearer sekrit"}
        assert client.get("/v1/models", headers=ok).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=ok).status_code == 200


# --- models, health, metrics -------------------------------------------------------------------------------


def test_models_and_served_name():
    engine = FakeEngine()
    with TestClient(create_app(engine, served_model_name="smol")) as client:
        body = client.get("/v1/models").json()
        assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["smol"]
        assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 128
        assert client.get("/v1/models/smol").json()["id"] == "smol"
        for name in ("smol", "fake-model"):  # the checkpoint's own name keeps working
            r = client.post("/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "smol"


def test_openapi_description(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(paths)


def test_health(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    engine.closed = True
    assert_error(client.get("/health"), 503)


def test_metrics(client):
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5})
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5, "stream": True})
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "max_tokens": 4})
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0})
    client.get("/v1/typo")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text

    def value(name: str) -> float:
        match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
        assert match, f"{name} not in /metrics"
        return float(match.group(1))

    assert value('shardwise_requests_total{endpoint="/v1/completions",status="200"}') == 2
    assert value('shardwise_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert value('shardwise_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    assert value('shardwise_requests_total{endpoint="other",status="404"}') == 1
    chat_prompt = len(b"<user>a\n<assistant>")
    assert value("shardwise_prompt_tokens_total") == 3 + 3 + chat_prompt
    assert value("shardwise_generation_tokens_total") == 5 + 5 + 4
    assert value("shardwise_time_to_first_token_seconds_count") == 3
    assert value("shardwise_inter_token_latency_seconds_count") == 4 + 4 + 3
    assert value('shardwise_request_latency_seconds_count{endpoint="/v1/completions"}') == 3
    assert value("shardwise_requests_running") == 0
    assert value("shardwise_requests_cancelled_total") == 0


def test_serve_cli_errors_before_loading(capsys):
    from shardwise.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err
    assert main(["serve", "--max-batch-size", "0"]) == 2
    assert "--max-batch-size must be at least 1" in capsys.readouterr().err


def test_listen_socket_port_in_use():
    import socket

    from shardwise.server.launch import listen_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ShardwiseError, match="cannot listen on 127.0.0.1"):
            listen_socket("127.0.0.1", taken.getsockname()[1]).close()
    sock = listen_socket("127.0.0.1", 0)
    assert sock.getsockname()[1] > 0
    sock.close()


def test_run_app_serves_over_tcp_and_stops(engine):
    """uvicorn on a real socket (port 0), a streamed request over HTTP, then a clean stop."""
    import httpx

    from shardwise.server import launch

    sock = launch.listen_socket("127.0.0.1", 0)
    urls: list[str] = []
    servers: list = []
    original = launch._Server

    class Recorded(original):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    launch._Server = Recorded
    try:
        thread = threading.Thread(target=launch.run_app, args=(create_app(engine), sock, urls.append), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not urls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert urls == [f"http://127.0.0.1:{sock.getsockname()[1]}"]
        with httpx.stream("POST", urls[0] + "/v1/completions", json={"prompt": "a", "max_tokens": 40,
                                                                      "stream": True}) as r:
            body = "".join(r.iter_text())
        assert body.endswith("data: [DONE]\n\n")
        servers[0].should_exit = True
        thread.join(10)
        assert not thread.is_alive()
    finally:
        launch._Server = original
        sock.close()


# --- the real server ---------------------------------------------------------------------------------------

API_KEY = "test-key"
SEQ_LEN = 512


@contextlib.contextmanager
def serving(args: list[str], log_path: Path):
    """`shardwise serve ARGS --port 0` in a subprocess: yields (url, served model name); stopped by its PID."""
    src = str(Path(__import__("shardwise").__file__).resolve().parents[1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "shardwise", "serve", *args, "--port", "0"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                                start_new_session=True)  # its own process group: ranks included in the last resort
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = None
        deadline = time.monotonic() + 300
        while url is None:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            match = re.match(r"shardwise: serving (\S+) on (http://\S+)", line or "")
            if match:
                url = match.group(2)
            elif line is None:
                pytest.fail(f"shardwise serve did not start (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}")
        yield url, match.group(1)
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: graceful shutdown, then the engine stops its ranks
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group of the server we started, by its PID
                proc.wait()
        assert proc.returncode == 0, log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def real_server(smollm2, tmp_path_factory):
    """`shardwise serve` on the real SmolLM2 at TP 2, port 0, once for the module; stopped by its PID."""
    pytest.importorskip("openai")
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with serving(["--model-path", str(smollm2), "--tp-degree", "2", "--seq-len", str(SEQ_LEN),
                  "--max-batch-size", "8", "--api-key", API_KEY], log_path) as served:
        yield served


@pytest.fixture(scope="module")
def openai_client(real_server):
    import openai

    url, _ = real_server
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.mark.slow
def test_real_models_and_completion(real_server, openai_client):
    _, model = real_server
    assert [m.id for m in openai_client.models.list().data] == [model] == ["SmolLM2-135M-Instruct"]
    r = openai_client.completions.create(model=model, prompt="The capital of France is", max_tokens=16,
                                         temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 0
    sampled = [openai_client.completions.create(model=model, prompt="My favourite food is", max_tokens=16,
                                                temperature=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # each request samples from its own generator, seeded


@pytest.mark.slow
def test_real_chat_and_streams_equal_plain(real_server, openai_client):
    _, model = real_server
    messages = [{"role": "user", "content": "Name three colours."}]
    plain = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.choices[0].message.content.strip()
    stream = openai_client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    prompt = "Once upon a time"
    plain = openai_client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
    streamed = "".join(c.choices[0].text for c in openai_client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert streamed == plain.choices[0].text


@pytest.mark.slow
def test_real_concurrent_requests_equal_solo(real_server, openai_client):
    _, model = real_server
    prompts = [f"Write one sentence about the number {i}." for i in range(8)]

    def ask(prompt: str) -> str:
        r = openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=16, temperature=0)
        return r.choices[0].message.content

    solo = [ask(p) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together == solo
    assert len(set(solo)) > 1


@pytest.mark.slow
def test_real_bad_requests(real_server, openai_client):
    import openai

    _, model = real_server
    with pytest.raises(openai.NotFoundError):
        openai_client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        openai_client.completions.create(model=model, prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        openai_client.completions.create(model=model, prompt="hello " * SEQ_LEN, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        openai_client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2)
    url, _ = real_server
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.slow
def test_real_client_disconnect_mid_stream(real_server, openai_client):
    import httpx

    url, model = real_server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while True:
        metrics = httpx.get(url + "/metrics", headers=headers).text
        if re.search(r"^shardwise_requests_cancelled_total 1\.0$", metrics, re.M):
            break
        assert time.monotonic() < deadline, "the server never cancelled the abandoned stream"
        time.sleep(0.2)
    r = openai_client.completions.create(model=model, prompt="2 + 2 =", max_tokens=8, temperature=0)
    assert r.choices[0].text
    assert httpx.get(url + "/health").json() == {"status": "ok"}


# torchprime's flat form: no `mesh:` section, the mesh comes from --mesh.
FLAT_FSDP = TORCHPRIME_FSDP_TP


@pytest.mark.slow
def test_serve_with_mesh_flag_answers_what_run_generates(tiny_models, tmp_path, capsys):
    """`serve --mesh fsdp=2,tensor=1` with a flat plan file (refused without the flag: the file has no mesh)
    answers a greedy completion with what `shardwise run` generates for the same prompt."""
    pytest.importorskip("openai")
    import openai
    from conftest import TINY, save_word_tokenizer

    from shardwise.cli import main

    model = tmp_path / "model"  # a private copy: the session's checkpoint stays without a tokenizer
    shutil.copytree(tiny_models["gqa9_tied"], model)
    save_word_tokenizer(model, TINY["vocab_size"])
    plan = tmp_path / "flat.yaml"
    plan.write_text(FLAT_FSDP)
    prompt, flags = "w52 w100 w56 w8 w36 w68", ["--sharding-config", str(plan), "--mesh", "fsdp=2,tensor=1"]
    assert main(["run", "--model-path", str(model), *flags, "--no-chat-template", "--prompt", prompt,
                 "--max-new-tokens", "8", "--seq-len", "64"]) == 0
    ran = re.search(r"^Output: (.*)$", capsys.readouterr().out, re.M).group(1)
    assert len(set(ran.split())) > 1  # not one token repeated: a wrong mesh or plan would show
    log = tmp_path / "serve.log"
    with serving(["--model-path", str(model), *flags, "--seq-len", "64", "--max-batch-size", "2"], log) as (url, name):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == ran and r.usage.completion_tokens == 8
    assert "Sharding weights for ranks: 0...1" in log.read_text()  # two ranks: fsdp=2 x tensor=1
