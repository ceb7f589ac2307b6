"""Tests for proxy.mock_upstream, the fake OpenAI-compatible provider used by demos and e2e tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.mock_upstream import build_app

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"


@contextlib.asynccontextmanager
async def _client(name: str = "alpha", **kwargs: Any) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(name, **kwargs))) as client:
        yield client


def _events(raw: str) -> list[Any]:
    """Split an SSE body into decoded `data:` payloads ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for block in raw.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _chat_body(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    return {"model": "gpt-test", "messages": messages, **extra}


@pytest.mark.asyncio
async def test_chat_completion_non_streaming() -> None:
    """A plain chat completion names the mock and model and reports deterministic usage."""
    async with _client() as client:
        resp = await client.post(CHAT, json=_chat_body())
        assert resp.status == 200
        assert resp.headers["x-request-id"] == "mock-1"
        assert int(resp.headers["openai-processing-ms"]) >= 0
        body = await resp.json()
    content = body["choices"][0]["message"]["content"]
    assert content.startswith("[alpha] reply from model gpt-test to 2 messages")
    assert body["id"] == "chatcmpl-mock-1" and body["object"] == "chat.completion"
    assert body["model"] == "gpt-test"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["role"] == "assistant"
    completion = 8 + len("hello there") % 17
    assert len(content.split()) == completion
    assert body["usage"] == {"prompt_tokens": 2 + 3 + 2 + 3, "completion_tokens": completion,
                             "total_tokens": 10 + completion}


@pytest.mark.asyncio
async def test_chat_stream_without_include_usage() -> None:
    """Without include_usage the stream carries no usage at all and rebuilds the same content."""
    async with _client() as client:
        plain = await (await client.post(CHAT, json=_chat_body())).json()
        resp = await client.post(CHAT, json=_chat_body(stream=True))
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = _events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(chunks) == 2 + plain["usage"]["completion_tokens"]


@pytest.mark.asyncio
async def test_chat_stream_with_include_usage() -> None:
    """With include_usage every chunk has usage null and the last one before [DONE] has choices [] and usage."""
    async with _client() as client:
        resp = await client.post(CHAT, json=_chat_body(stream=True, stream_options={"include_usage": True}))
        events = _events(await resp.text())
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == len(chunks) - 2
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]


@pytest.mark.asyncio
async def test_tokens_per_s_paces_stream() -> None:
    """tokens_per_s spaces token chunks out, so an 8-token reply at 40 tok/s takes about 7/40 s."""
    async with _client(tokens_per_s=40) as client:
        start = time.monotonic()
        resp = await client.post(CHAT, json={"model": "m", "messages": [{"role": "user", "content": ""}],
                                             "stream": True})
        await resp.text()
    assert time.monotonic() - start >= 7 / 40 - 0.01


@pytest.mark.asyncio
async def test_legacy_completions() -> None:
    """Legacy /v1/completions answers text_completion objects, streamed or not, with usage."""
    async with _client() as client:
        body = await (await client.post("/v1/completions", json={"model": "davinci", "prompt": "one two"})).json()
        resp = await client.post("/v1/completions", json={
            "model": "davinci", "prompt": "one two", "stream": True, "stream_options": {"include_usage": True}})
        events = _events(await resp.text())
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith("[alpha] reply from model davinci to 1 prompts")
    assert body["usage"]["prompt_tokens"] == 2
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert last["choices"] == [] and last["usage"] == body["usage"]


@pytest.mark.asyncio
async def test_embeddings() -> None:
    """Embeddings are 8 deterministic floats per input that depend on the text and the mock name."""
    async with _client("alpha") as a, _client("beta") as b:
        one = await (await a.post("/v1/embeddings", json={"model": "emb", "input": ["x y", "z"]})).json()
        again = await (await a.post("/v1/embeddings", json={"model": "emb", "input": "x y"})).json()
        other = await (await b.post("/v1/embeddings", json={"model": "emb", "input": "x y"})).json()
        tokens = await (await a.post("/v1/embeddings", json={"model": "emb", "input": [[1, 2, 3], [4]]})).json()
        b64 = await (await a.post("/v1/embeddings", json={
            "model": "emb", "input": "x y", "encoding_format": "base64"})).json()
    assert one["object"] == "list" and one["model"] == "emb"
    assert [d["index"] for d in one["data"]] == [0, 1]
    assert one["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    vec = one["data"][0]["embedding"]
    assert len(vec) == 8 and all(isinstance(v, float) for v in vec)
    assert again["data"][0]["embedding"] == vec
    assert other["data"][0]["embedding"] != vec
    assert tokens["usage"]["prompt_tokens"] == 4 and len(tokens["data"]) == 2
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert decoded == pytest.approx(vec, abs=1e-6)


@pytest.mark.asyncio
async def test_models_lists_mock_name() -> None:
    """GET /v1/models lists exactly one model named after the mock."""
    async with _client("gamma") as client:
        body = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in body["data"]] == ["gamma"]


@pytest.mark.asyncio
async def test_bad_requests_get_openai_errors() -> None:
    """Bad JSON and a missing model are 400s with the OpenAI error shape."""
    async with _client() as client:
        bad = await client.post(CHAT, data=b"{nope", headers={"Content-Type": "application/json"})
        no_model = await client.post(CHAT, json={"messages": []})
        assert bad.status == 400 and no_model.status == 400
        bad_err = (await bad.json())["error"]
        no_model_err = (await no_model.json())["error"]
    assert set(bad_err) == {"message", "type", "param", "code"}
    assert bad_err["type"] == "invalid_request_error"
    assert no_model_err["param"] == "model"


@pytest.mark.asyncio
async def test_mock_status_and_latency_hooks() -> None:
    """mock_status forces an OpenAI-shaped error status and mock_latency_ms delays the reply."""
    async with _client() as client:
        start = time.monotonic()
        resp = await client.post(CHAT, json=_chat_body(mock_status=429, mock_latency_ms=150))
        elapsed = time.monotonic() - start
        assert resp.status == 429
        assert "x-request-id" in resp.headers
        body = await resp.json()
    assert elapsed >= 0.14
    assert body == {"error": {"message": "mock error 429", "type": "mock_error", "param": None,
                              "code": "mock_429"}}


@pytest.mark.asyncio
async def test_api_key_enforced() -> None:
    """With api_key set, /v1 needs the exact bearer token while /mock stays open."""
    async with _client(api_key="sk-up") as client:
        missing = await client.get("/v1/models")
        wrong = await client.post(CHAT, json=_chat_body(), headers={"Authorization": "Bearer sk-other"})
        right = await client.post(CHAT, json=_chat_body(), headers={"Authorization": "Bearer sk-up"})
        stats = await client.get("/mock/stats")
        assert (missing.status, wrong.status, right.status, stats.status) == (401, 401, 200, 200)
        err = (await wrong.json())["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"


@pytest.mark.asyncio
async def test_request_log_and_reset() -> None:
    """/mock/requests records lowercased headers and bodies (last 50) and /mock/reset clears everything."""
    async with _client() as client:
        for i in range(55):
            await client.post(CHAT, json=_chat_body(n=i), headers={"X-Custom": "v"})
        log = await (await client.get("/mock/requests")).json()
        stats = await (await client.get("/mock/stats")).json()
        await client.post("/mock/reset")
        log_after = await (await client.get("/mock/requests")).json()
        stats_after = await (await client.get("/mock/stats")).json()
    assert len(log) == 50 and log[0]["body"]["n"] == 5 and log[-1]["body"]["n"] == 54
    assert log[-1]["path"] == CHAT and log[-1]["headers"]["x-custom"] == "v"
    assert stats["requests"] == 55 and stats["name"] == "alpha"
    assert log_after == [] and stats_after["requests"] == 0


@pytest.mark.asyncio
async def test_stats_count_cancelled_stream() -> None:
    """A client that reads one chunk and hangs up is counted as a cancelled stream, promptly."""
    async with _client(tokens_per_s=20) as client:
        resp = await client.post(CHAT, json=_chat_body(stream=True))
        assert (await resp.content.readline()).startswith(b"data: ")
        resp.close()
        stats: dict[str, Any] = {}
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            stats = await (await client.get("/mock/stats")).json()
            if stats["streams_cancelled"]:
                break
            await asyncio.sleep(0.02)
        full = await client.post(CHAT, json=_chat_body(stream=True))
        await full.text()
        final = await (await client.get("/mock/stats")).json()
    assert stats["streams_started"] == 1 and stats["streams_cancelled"] == 1
    assert stats["streams_completed"] == 0
    assert final["streams_completed"] == 1 and final["streams_cancelled"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_openai_client_against_real_server() -> None:
    """The official openai client streams (with usage) and completes against `run()` in a subprocess."""
    import openai

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    code = f"from proxy.mock_upstream import run; run(port={port}, name='x')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=15), "mock upstream did not start"
        assert proc.stdout.readline().strip() == f"mock-upstream x listening on http://127.0.0.1:{port}"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=10)
        messages: Any = [{"role": "user", "content": "hi"}]
        stream = client.chat.completions.create(model="m1", messages=messages, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.startswith("[x] reply from model m1")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text.split())

        done = client.chat.completions.create(model="m2", messages=messages)
        assert (done.choices[0].message.content or "").startswith("[x] reply from model m2")
        assert done.usage is not None and done.usage.total_tokens > 0
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)  # also closes the pipes
        if stderr.strip():
            print(stderr, file=sys.stderr)
