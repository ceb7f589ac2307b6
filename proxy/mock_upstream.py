"""Mock OpenAI-compatible upstream for llm-ab-proxy demos, tests and benchmarks.

Exercising the gateway against real providers is slow, costs money and is not
deterministic. This server speaks enough of the OpenAI HTTP API (chat and legacy
completions, embeddings, models, SSE streaming with ``stream_options.include_usage``)
to stand in for one. Every reply names the mock that produced it, so tests can tell
which upstream served a request, and ``/mock/*`` plus the ``mock_status`` /
``mock_latency_ms`` / ``mock_stall_after`` / ``mock_die_after`` (streams: go silent, or drop the
connection, after that many events) body fields let end-to-end tests inject faults and inspect what
the gateway actually forwarded (headers included, to prove upstream-key injection).

With ``answers`` (``--answers FILE``, a held-out test set in the OpenAI fine-tuning chat format) the
mock also answers that test set with a known, tunable accuracy (``skill``), so offline evaluation
(``abproxy eval run``) has a "base" and a "fine-tuned" model whose difference it must detect; the
rule is next to the judge's below.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

JSON = dict[str, Any]
Frame = tuple[bool, JSON]  # (is a token, i.e. paced by tokens_per_s; SSE payload)

_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")
_MAX_RECORDED = 50
_BAD_JSON = object()


@dataclass
class MockState:
    """Configuration and counters of one mock; lives on the app so instances never share state."""

    name: str
    latency_ms: float
    tokens_per_s: float
    api_key: str | None
    fail_first: int = 0  # the next this-many POSTs answer fail_status (retry tests)
    fail_status: int = 429
    retry_after: str = "0"  # the Retry-After header of those failures; "" = none
    answers: Mapping[str, str] = field(default_factory=dict)  # test-set prompt (stripped) -> expected answer
    skill: float = 1.0  # the share of those prompts answered exactly (see answer())
    error_rate: float = 0.0  # this share of POSTs answers 500, drawn from a generator seeded by the name
    errors: random.Random = field(default_factory=random.Random)
    last_id: int = 0  # never reset, so ids stay unique for the life of the process
    requests: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    recent: deque[JSON] = field(default_factory=lambda: deque(maxlen=_MAX_RECORDED))

    def stats(self) -> JSON:
        return {
            "name": self.name,
            "requests": self.requests,
            "streams_started": self.streams_started,
            "streams_completed": self.streams_completed,
            "streams_cancelled": self.streams_cancelled,
        }

    def reset(self) -> None:
        self.requests = self.streams_started = self.streams_completed = self.streams_cancelled = 0
        self.recent.clear()


STATE = web.AppKey("mock_upstream_state", MockState)


class _OpenAIError(Exception):
    """Raised by handlers; rendered as an OpenAI-shaped error body so clients parse it natively."""

    def __init__(
        self, status: int, message: str, *, type_: str = "invalid_request_error",
        param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body: JSON = {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class _Ctx:
    state: MockState
    request_id: int
    started: float
    body: JSON = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        elapsed_ms = int((time.monotonic() - self.started) * 1000)
        return {"x-request-id": f"mock-{self.request_id}", "openai-processing-ms": str(elapsed_ms)}


_V1Handler = Callable[[web.Request, _Ctx], Awaitable[web.StreamResponse]]


def _v1(handler: _V1Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Wrap a /v1 handler with the bookkeeping, auth and fault injection all endpoints share."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        state.last_id += 1
        state.requests += 1
        ctx = _Ctx(state, state.last_id, time.monotonic())
        raw = await request.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = _BAD_JSON
        state.recent.append({
            "path": request.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": None if parsed is _BAD_JSON else parsed,
        })
        try:
            await _prologue(request, ctx, parsed)
            resp = await handler(request, ctx)
        except _OpenAIError as err:
            resp = web.json_response(err.body, status=err.status, headers=err.headers)
        if not resp.prepared:  # streams set these themselves before their first byte
            resp.headers.update(ctx.headers())
        return resp

    return wrapped


async def _prologue(request: web.Request, ctx: _Ctx, parsed: Any) -> None:
    state = ctx.state
    if state.api_key is not None and request.headers.get("Authorization") != f"Bearer {state.api_key}":
        raise _OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
    latency_ms = state.latency_ms
    if request.method == "POST" and state.error_rate > 0 and state.errors.random() < state.error_rate:
        raise _OpenAIError(500, "mock server error", type_="server_error", code="mock_error_rate")
    if request.method == "POST" and state.fail_first > 0:
        state.fail_first -= 1
        headers = {"Retry-After": state.retry_after} if state.retry_after else {}
        if state.fail_status == 429:
            raise _OpenAIError(429, "mock rate limit", type_="requests", code="rate_limit_exceeded", headers=headers)
        raise _OpenAIError(state.fail_status, f"mock failure {state.fail_status}",
                           type_="server_error" if state.fail_status >= 500 else "invalid_request_error",
                           code=f"mock_{state.fail_status}", headers=headers)
    if request.method == "POST":
        if parsed is _BAD_JSON or not isinstance(parsed, dict):
            raise _OpenAIError(400, "We could not parse the JSON body of your request.")
        ctx.body = parsed
        override = parsed.get("mock_latency_ms")
        if isinstance(override, (int, float)) and not isinstance(override, bool):
            latency_ms = float(override)
    if latency_ms > 0:
        await asyncio.sleep(latency_ms / 1000)
    status = ctx.body.get("mock_status")
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status <= 599:
        raise _OpenAIError(status, f"mock error {status}", type_="mock_error", code=f"mock_{status}")
    if request.method == "POST" and not (isinstance(ctx.body.get("model"), str) and ctx.body["model"]):
        raise _OpenAIError(400, "you must provide a model parameter", param="model")


def _words(text: str) -> int:
    return len(text.split())


def _text(content: Any) -> str:
    """Text of a chat message content: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _inputs(value: Any, param: str) -> list[tuple[str, int]]:
    """(text, token count) per input; token arrays count one token per int, like OpenAI."""
    if isinstance(value, str):
        return [(value, _words(value))]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return [(v, _words(v)) for v in value]
        if all(_is_int(v) for v in value):
            return [(",".join(map(str, value)), len(value))]
        if all(isinstance(v, list) and all(_is_int(x) for x in v) for v in value):
            return [(",".join(map(str, v)), len(v)) for v in value]
    raise _OpenAIError(400, f"'{param}' must be a string, an array of strings or token arrays", param=param)


# A reply is a list of pieces whose concatenation is its exact text: each piece is one word with the
# whitespace before it (newlines included), so answers keep their lines, streamed or not. One piece is
# one completion token here.
_PIECE = re.compile(r"\s*\S+(?:\s+\Z)?|\s+\Z")


def _pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def _spaced(words: list[str]) -> list[str]:
    """Pieces of words joined by single spaces, one piece per word even if a word holds a space (a model name)."""
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _reply(name: str, model: str, count: int, noun: str, seed: str) -> list[str]:
    # Deterministic length so tests and benchmarks can predict usage exactly.
    words = [f"[{name}]", "reply", "from", "model", model, "to", str(count), noun]
    target = 8 + len(seed) % 17
    return _spaced(words + [_FILLER[i % len(_FILLER)] for i in range(target - len(words))])


def _cap(pieces: list[str], body: JSON) -> tuple[list[str], str]:
    """Honour max_tokens (one piece = one token here): a cut reply finishes with "length"."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(pieces):
        return pieces[:limit], "length"
    return pieces, "stop"


def _usage(prompt_tokens: int, completion_tokens: int) -> JSON:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _include_usage(body: JSON) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


async def _send(request: web.Request, resp: web.StreamResponse, data: bytes) -> None:
    # aiohttp >= 3.9 does not cancel handlers when the client leaves, so look for it
    # ourselves rather than keep "streaming" into a dead socket.
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client disconnected")
    await resp.write(data)


async def _stream(request: web.Request, ctx: _Ctx, frames: list[Frame]) -> web.StreamResponse:
    state = ctx.state
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **ctx.headers()}
    resp = web.StreamResponse(headers=headers)
    state.streams_started += 1
    delay = 1 / state.tokens_per_s if state.tokens_per_s > 0 else 0.0
    # Fault injection per request: after this many events, go silent (stall) or drop the connection (die).
    stall_after, die_after = (_count(ctx.body.get(key)) for key in ("mock_stall_after", "mock_die_after"))
    try:
        await resp.prepare(request)
        seen_token = False
        for sent, (is_token, payload) in enumerate(frames):
            if sent == stall_after:
                await asyncio.sleep(3600)  # until the client gives up
            if sent == die_after and request.transport is not None:
                request.transport.abort()  # no terminating chunk: the client sees a broken body
                raise ConnectionResetError("mock died mid-stream")
            if is_token and seen_token and delay:
                await asyncio.sleep(delay)
            seen_token = seen_token or is_token
            await _send(request, resp, b"data: " + json.dumps(payload).encode() + b"\n\n")
        await _send(request, resp, b"data: [DONE]\n\n")
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError) as exc:
        state.streams_cancelled += 1
        if isinstance(exc, asyncio.CancelledError):
            raise
        return resp
    state.streams_completed += 1
    return resp


# A judge with a known, simple preference, so tests know what it must answer. When the system message holds
# proxy.humaneval.judge's marker, the reply is its JSON verdict for the LONGER of Response A / Response B
# (a tie at equal length), every rubric criterion answered like the winner (scores 5 / 3, 4 / 4 on a tie).
_JUDGE_MARKER = "You are judging two answers"
_JUDGE_SECTION = r"\[{0}\]\n(.*?)\n\[End of {0}\]"
_JUDGE_CRITERION = re.compile(r"^- ([a-z0-9_]+) \((preference|score)", re.MULTILINE)


def _judge_verdict(user: str) -> list[str]:
    a, b, criteria = (re.search(_JUDGE_SECTION.format(s), user, re.DOTALL) for s in
                      ("Response A", "Response B", "Criteria"))  # fmt: skip
    len_a, len_b = (len(m.group(1)) if m else 0 for m in (a, b))
    winner = "A" if len_a > len_b else "B" if len_b > len_a else "tie"
    scores = {"A": {"A": 5, "B": 3}, "B": {"A": 3, "B": 5}, "tie": {"A": 4, "B": 4}}[winner]
    answers = {name: winner if kind == "preference" else scores
               for name, kind in _JUDGE_CRITERION.findall(criteria.group(1) if criteria else "")}  # fmt: skip
    return _spaced(json.dumps({"winner": winner, "criteria": answers, "reason": "longer"}).split(" "))


# A test-set answerer with a known accuracy, so offline-evaluation tests and the demo know what to expect.
# With answers loaded, a chat request whose last user message (stripped) is a test-set prompt gets:
#   u = int.from_bytes(sha256(f"{name}\x00{prompt}".encode()).digest()[:8], "big") / 2**64  (name: the mock's)
#   u < skill: the expected answer, exactly. Otherwise a deterministic wrong one, chosen by v, computed the
#   same way from f"{name}\x01{prompt}":
#   v < 2/3, "chatty": the expected lines joined by "; " in one sentence ("Sure! Here are the codes for this
#       note: ...") - one line, so a per-line format check fails;
#   else "near miss": drop the last line of a multi-line answer; of a one-line answer, change the last digit
#       before the first ":" to (d + 1) % 10 (no digit there: append " (unspecified)") - format kept.
# Other prompts get the usual filler reply.
def _unit(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _near_miss(expected: str) -> str:
    lines = expected.splitlines()
    if len(lines) >= 2:
        return "\n".join(lines[:-1])
    line = lines[0] if lines else ""
    head, colon, tail = line.partition(":")
    digits = [i for i, ch in enumerate(head) if ch in "0123456789"]
    if not digits:
        return line + " (unspecified)"
    i = digits[-1]
    return f"{head[:i]}{(int(head[i]) + 1) % 10}{head[i + 1:]}{colon}{tail}"


def answer(name: str, prompt: str, expected: str, skill: float) -> str:
    """What mock `name` with this skill answers to a test-set prompt whose expected answer is `expected`."""
    if _unit(f"{name}\x00{prompt}") < skill:
        return expected
    if _unit(f"{name}\x01{prompt}") < 2 / 3:
        return (f"Sure! Here are the codes for this note: {'; '.join(expected.splitlines())}. "
                "Let me know if you need anything else.")
    return _near_miss(expected)


def load_answers(path: str | Path) -> dict[str, str]:
    """Test-set prompt -> expected answer, from an OpenAI fine-tuning chat JSONL file.

    The prompt is the content of the last user message before the final assistant message, stripped;
    the expected answer is that assistant message's content. Raises ValueError (OSError for an
    unreadable file) with a one-line reason.
    """
    answers: dict[str, str] = {}
    where: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number}: not JSON ({exc})") from None
            messages = example.get("messages") if isinstance(example, dict) else None
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError(f"line {number}: expected an object with a \"messages\" array of objects")
            final = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"),
                         None)  # fmt: skip
            if final is None or not isinstance(messages[final].get("content"), str):
                raise ValueError(f"line {number}: no assistant message with string content")
            prompt = next((_text(m.get("content")).strip() for m in reversed(messages[:final])
                           if m.get("role") == "user"), "")  # fmt: skip
            if not prompt:
                raise ValueError(f"line {number}: no non-empty user message before the final assistant message")
            expected: str = messages[final]["content"]
            if prompt in answers and answers[prompt] != expected:
                raise ValueError(f"line {number}: same prompt as line {where[prompt]} with a different answer")
            answers[prompt] = expected
            where.setdefault(prompt, number)
    if not answers:
        raise ValueError("no examples")
    return answers


async def _chat(request: web.Request, ctx: _Ctx) -> web.StreamResponse:
    body, model = ctx.body, ctx.body["model"]
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _OpenAIError(400, "'messages' must be a non-empty array", param="messages")
    texts = [_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
    last_user = next((t for m, t in zip(reversed(messages), reversed(texts), strict=True)
                      if isinstance(m, dict) and m.get("role") == "user"), "")
    judging = any(isinstance(m, dict) and m.get("role") == "system" and _JUDGE_MARKER in t
                  for m, t in zip(messages, texts, strict=True))  # fmt: skip
    state, prompt = ctx.state, last_user.strip()
    if judging:
        pieces, finish = _cap(_judge_verdict(last_user), body)
    elif prompt in state.answers:
        pieces, finish = _cap(_pieces(answer(state.name, prompt, state.answers[prompt], state.skill)), body)
    else:
        pieces, finish = _cap(_reply(state.name, model, len(messages), "messages", last_user), body)
    usage = _usage(max(1, sum(_words(t) + 3 for t in texts)), len(pieces))
    base: JSON = {"id": f"chatcmpl-mock-{ctx.request_id}", "created": int(time.time()), "model": model}
    if body.get("stream") is not True:
        message = {"role": "assistant", "content": "".join(pieces)}
        return web.json_response({**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]})
    with_usage = _include_usage(body)

    def chunk(delta: JSON, finish: str | None) -> JSON:
        c: JSON = {**base, "object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if with_usage:  # OpenAI sends an explicit null usage on every chunk once it was asked for
            c["usage"] = None
        return c

    frames: list[Frame] = [(False, chunk({"role": "assistant", "content": ""}, None))]
    frames += [(True, chunk({"content": piece}, None)) for piece in pieces]
    frames.append((False, chunk({}, finish)))
    if with_usage:
        frames.append((False, {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
    return await _stream(request, ctx, frames)


async def _completions(request: web.Request, ctx: _Ctx) -> web.StreamResponse:
    body, model = ctx.body, ctx.body["model"]
    prompts = _inputs(body.get("prompt"), "prompt")
    pieces, finish = _cap(_reply(ctx.state.name, model, len(prompts), "prompts", prompts[-1][0]), body)
    usage = _usage(max(1, sum(n for _, n in prompts)), len(pieces))
    base: JSON = {"id": f"cmpl-mock-{ctx.request_id}", "object": "text_completion",
                  "created": int(time.time()), "model": model}

    def choice(text: str, finish: str | None) -> JSON:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    if body.get("stream") is not True:
        return web.json_response({**base, "choices": [choice("".join(pieces), finish)], "usage": usage})
    with_usage = _include_usage(body)
    extra: JSON = {"usage": None} if with_usage else {}
    frames: list[Frame] = [(True, {**base, "choices": [choice(piece, None)], **extra}) for piece in pieces]
    frames.append((False, {**base, "choices": [choice("", finish)], **extra}))
    if with_usage:
        frames.append((False, {**base, "choices": [], "usage": usage}))
    return await _stream(request, ctx, frames)


async def _embeddings(request: web.Request, ctx: _Ctx) -> web.StreamResponse:
    inputs = _inputs(ctx.body.get("input"), "input")
    # The official client asks for base64 unless told otherwise, so honour it.
    as_base64 = ctx.body.get("encoding_format") == "base64"
    data: list[JSON] = []
    for i, (text, _) in enumerate(inputs):
        digest = hashlib.sha256(f"{ctx.state.name}\x00{text}".encode()).digest()
        vector = [round(b / 127.5 - 1.0, 6) for b in digest[:8]]
        embedding: Any = base64.b64encode(struct.pack("<8f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    n = sum(tokens for _, tokens in inputs)
    return web.json_response({"object": "list", "data": data, "model": ctx.body["model"],
                              "usage": {"prompt_tokens": n, "total_tokens": n}})


async def _models(request: web.Request, ctx: _Ctx) -> web.StreamResponse:
    model = {"id": ctx.state.name, "object": "model", "created": 0, "owned_by": "mock-upstream"}
    return web.json_response({"object": "list", "data": [model]})


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats())


async def _recent(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[STATE].recent))


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.reset()
    return web.json_response(state.stats())


async def _fail(request: web.Request) -> web.Response:
    """`POST /mock/fail {"count": N, "status": 503, "retry_after": "0"}`: the next N POSTs fail so."""
    state = request.app[STATE]
    try:
        spec = await request.json()
        count, status, retry_after = int(spec["count"]), int(spec.get("status", 429)), str(spec.get("retry_after", "0"))
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "body: {count, status?, retry_after?}"}, status=400)
    if not 400 <= status <= 599 or count < 0:
        return web.json_response({"error": "status must be 4xx/5xx and count >= 0"}, status=400)
    state.fail_first, state.fail_status, state.retry_after = count, status, retry_after
    return web.json_response({"fail_first": count, "fail_status": status, "retry_after": retry_after})


def build_app(
    name: str, *, latency_ms: float = 0.0, tokens_per_s: float = 0.0, api_key: str | None = None,
    fail_first: int = 0, fail_status: int = 429, retry_after: str = "0",
    answers: Mapping[str, str] | None = None, skill: float = 1.0, error_rate: float = 0.0,
) -> web.Application:
    """Build the mock upstream application (see module docstring for the endpoints).

    The first ``fail_first`` POSTs answer ``fail_status`` (a 4xx or 5xx) with ``Retry-After: retry_after``
    (no header when it is ""). ``answers`` (see load_answers) are answered with accuracy ``skill`` (0..1).
    """
    if not 400 <= fail_status <= 599:
        raise ValueError(f"fail_status must be a 4xx or 5xx status, not {fail_status}")
    if not 0.0 <= skill <= 1.0:
        raise ValueError(f"skill must be between 0 and 1, not {skill}")
    app = web.Application()
    app[STATE] = MockState(name=name, latency_ms=max(0.0, latency_ms), tokens_per_s=max(0.0, tokens_per_s),
                           api_key=api_key, fail_first=max(0, fail_first), fail_status=fail_status,
                           retry_after=retry_after, answers=dict(answers or {}), skill=skill,
                           error_rate=min(max(error_rate, 0.0), 1.0), errors=random.Random(name))
    app.router.add_post("/v1/chat/completions", _v1(_chat))
    app.router.add_post("/v1/completions", _v1(_completions))
    app.router.add_post("/v1/embeddings", _v1(_embeddings))
    app.router.add_get("/v1/models", _v1(_models))
    app.router.add_get("/mock/stats", _stats)
    app.router.add_get("/mock/requests", _recent)
    app.router.add_post("/mock/reset", _reset)
    app.router.add_post("/mock/fail", _fail)
    return app


def run(
    *, host: str = "127.0.0.1", port: int, name: str, latency_ms: float = 0.0,
    tokens_per_s: float = 0.0, api_key: str | None = None, fail_first: int = 0, fail_status: int = 429,
    retry_after: str = "0", answers: Mapping[str, str] | None = None, skill: float = 1.0, error_rate: float = 0.0,
) -> None:
    """Serve a mock upstream until interrupted (blocking); backs ``abproxy mock-upstream``."""
    app = build_app(name, latency_ms=latency_ms, tokens_per_s=tokens_per_s, api_key=api_key, fail_first=fail_first,
                    fail_status=fail_status, retry_after=retry_after, answers=answers, skill=skill,
                    error_rate=error_rate)

    def announce(*_: Any) -> None:
        # run_app calls its ``print`` hook only after the sockets are bound, so whoever
        # waits for this line (tests, scripts) can connect as soon as it appears.
        print(f"mock-upstream {name} listening on http://{host}:{port}", flush=True)

    # A stalled stream (mock_stall_after) sleeps for an hour: on SIGTERM give open answers 1 s, not
    # aiohttp's 60 (a test's teardown otherwise waits for its kill timeout).
    web.run_app(app, host=host, port=port, access_log=None, print=announce, shutdown_timeout=1.0)
