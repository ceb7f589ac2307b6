"""Tests for proxy.mock_upstream, the fake OpenAI-compatible provider used by demos and e2e tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import selectors
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.mock_upstream import answer, build_app, load_answers
from tests.harness import MockUpstream, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
ICD10 = REPO_ROOT / "examples" / "eval" / "icd10.jsonl"
CODE_LINE = re.compile(r"[A-TV-Z][0-9][0-9AB](\.[0-9A-TV-Z]{1,4})?: \S.*")  # examples/eval/format.yaml's


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


def test_openai_client_against_real_server() -> None:
    """The official openai client streams (with usage) and completes against `run()` in a subprocess."""
    import openai

    port = free_port()
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


# -- answering a test set (--answers, --skill) and failing on purpose (--fail-first/--fail-status) --------


def _examples() -> list[tuple[list[dict[str, str]], str]]:
    """(request messages, expected answer) per example of the shipped test set."""
    out = []
    for line in ICD10.read_text().splitlines():
        messages = json.loads(line)["messages"]
        out.append((messages[:-1], messages[-1]["content"]))
    return out


def _openai(mock: MockUpstream) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{mock.url}/v1", api_key="k", max_retries=0, timeout=10)


def _ask(client: openai.OpenAI, messages: Any, *, stream: bool = False) -> str:
    if stream:
        chunks = client.chat.completions.create(model="m", messages=messages, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    done = client.chat.completions.create(model="m", messages=messages, temperature=0)
    return done.choices[0].message.content or ""


@contextlib.contextmanager
def _mocks(tmp_path: Path, *specs: tuple[str, dict[str, Any]]) -> Any:
    mocks = [MockUpstream(name, tmp_path, **options) for name, options in specs]
    try:
        for mock in mocks:
            mock.start()
        yield mocks
    finally:
        for mock in mocks:
            mock.stop()


def test_answers_full_skill_are_exact(tmp_path: Path) -> None:
    """--skill 1.0 answers every test-set prompt with its expected text, newlines kept, streamed or not."""
    examples = _examples()
    assert any("\n" in expected for _, expected in examples)
    with _mocks(tmp_path, ("ace", {"answers": ICD10, "skill": 1.0})) as (mock,):
        client = _openai(mock)
        for messages, expected in examples:
            assert _ask(client, messages) == expected
            assert _ask(client, messages, stream=True) == expected
        # Only the last user message matters, stripped; anything else gets the usual filler reply.
        padded = [{"role": "user", "content": "  " + examples[0][0][-1]["content"] + "\n"}]
        assert _ask(client, padded) == examples[0][1]
        other = _ask(client, [{"role": "user", "content": "Note: not in the test set."}])
        assert other.startswith("[ace] reply from model m to 1 messages")


def test_answers_zero_skill_are_wrong_in_known_ways(tmp_path: Path) -> None:
    """--skill 0 never answers exactly: a chatty answer is one line, a near miss keeps the line format."""
    modes: set[str] = set()
    with _mocks(tmp_path, ("dud", {"answers": str(ICD10), "skill": 0})) as (mock,):
        client = _openai(mock)
        for messages, expected in _examples():
            got = _ask(client, messages)
            assert got != expected and _ask(client, messages, stream=True) == got
            if got.startswith("Sure! Here are the codes for this note: "):
                modes.add("chatty")
                assert "\n" not in got and "; ".join(expected.splitlines()) in got
                assert not CODE_LINE.fullmatch(got)
            else:
                modes.add("near miss")
                lines = got.split("\n")
                assert all(CODE_LINE.fullmatch(line) for line in lines)
                assert len(lines) == max(1, len(expected.splitlines()) - 1)
    assert modes == {"chatty", "near miss"}


def test_answers_are_deterministic_per_name(tmp_path: Path) -> None:
    """Two processes with the same name and skill answer identically, as proxy.mock_upstream.answer says."""
    examples = _examples()
    options = {"answers": ICD10, "skill": 0.5}
    with _mocks(tmp_path, ("twin", options), ("twin", options)) as (one, two):
        first = [_ask(_openai(one), messages) for messages, _ in examples]
        second = [_ask(_openai(two), messages, stream=True) for messages, _ in examples]
    assert first == second
    expected = [answer("twin", m[-1]["content"].strip(), e, 0.5) for m, e in examples]
    assert first == expected
    assert 0 < sum(a == e for a, (_, e) in zip(first, examples, strict=True)) < len(examples)


def test_shipped_test_set_separates_the_demo_mocks() -> None:
    """With the demo's skills (base 0.35, finetuned 0.85) the fine-tuned mock is clearly better on the shipped set."""
    from statsmodels.stats.contingency_tables import mcnemar

    answers = load_answers(ICD10)
    assert len(answers) == 40

    def outcomes(name: str, skill: float) -> list[tuple[bool, bool]]:
        got = [(answer(name, p, e, skill), e) for p, e in answers.items()]
        return [(a == e, all(CODE_LINE.fullmatch(line) for line in a.split("\n"))) for a, e in got]

    base, tuned = outcomes("base", 0.35), outcomes("finetuned", 0.85)
    for i in (0, 1):  # exact match, format
        pairs = [(b[i], t[i]) for b, t in zip(base, tuned, strict=True)]
        table = [[pairs.count((True, True)), pairs.count((True, False))],
                 [pairs.count((False, True)), pairs.count((False, False))]]
        assert mcnemar(table, exact=True).pvalue < 0.01
        if i == 0:
            assert (pairs.count((False, True)) - pairs.count((True, False))) / 40 >= 0.3
            assert 1 <= table[0][1] <= 4  # some regressions to list


@pytest.mark.asyncio
async def test_answer_pieces_cap_and_usage() -> None:
    """An answer is counted in pieces (one per word, whitespace before it kept); max_tokens cuts whole pieces."""
    async with _client("p", answers={"q": "A01: x y\nB02: z"}) as client:
        full = await (await client.post(CHAT, json={"model": "m",
                                                    "messages": [{"role": "user", "content": "q"}]})).json()
        cut = await (await client.post(CHAT, json={"model": "m", "max_tokens": 3,
                                                   "messages": [{"role": "user", "content": " q "}]})).json()
        resp = await client.post(CHAT, json={"model": "m", "stream": True,
                                             "messages": [{"role": "user", "content": "q"}]})
        events = _events(await resp.text())
    assert full["choices"][0]["message"]["content"] == "A01: x y\nB02: z"
    assert full["usage"]["completion_tokens"] == 5
    assert cut["choices"][0]["message"]["content"] == "A01: x y"
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 3
    deltas = [c["choices"][0]["delta"].get("content") for c in events[:-1]]
    assert deltas[1:-1] == ["A01:", " x", " y", "\nB02:", " z"]


def test_bad_answers_file_is_one_line_error(tmp_path: Path) -> None:
    """A bad or missing --answers file stops the command with one line, not a traceback."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for path, reason in ((bad, "line 1: no assistant message"), (tmp_path / "missing.jsonl", "No such file")):
        done = subprocess.run([sys.executable, "-m", "proxy", "mock-upstream", "--port", str(free_port()),
                               "--name", "x", "--answers", str(path)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)  # fmt: skip
        assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"Error: --answers {path}: ") and reason in done.stderr


def test_fail_first_with_status_and_retry_after(tmp_path: Path) -> None:
    """--fail-first 2 --fail-status 503 --retry-after 2: two 503s telling to wait 2 s, then normal service."""
    messages: Any = [{"role": "user", "content": "hi"}]
    specs: list[tuple[str, dict[str, Any]]] = [("down", {"fail_first": 2, "fail_status": 503, "retry_after": 2}),
             ("bare", {"fail_first": 1, "fail_status": 500, "retry_after": ""}),
             ("limited", {"fail_first": 1})]  # fmt: skip
    with _mocks(tmp_path, *specs) as (down, bare, limited):
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as failed:
                _ask(_openai(down), messages)
            assert failed.value.status_code == 503 and failed.value.response.headers["retry-after"] == "2"
        assert _ask(_openai(down), messages).startswith("[down] reply")
        with pytest.raises(openai.InternalServerError) as failed:
            _ask(_openai(bare), messages)
        assert failed.value.status_code == 500 and "retry-after" not in failed.value.response.headers
        with pytest.raises(openai.RateLimitError) as limited_err:
            _ask(_openai(limited), messages)
        assert limited_err.value.response.headers["retry-after"] == "0"
        assert _ask(_openai(bare), messages).startswith("[bare] reply")
        assert down.stats()["requests"] == 3
