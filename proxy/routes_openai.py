"""The OpenAI-compatible surface, `/v1/*`, as a raw ASGI handler.

Raw ASGI rather than a Starlette or FastAPI route by measurement (README, "Speed"): the
routing layers cost 10-40 % of throughput on a path whose whole job is a dict lookup, a
hash and a forward. FastAPI serves everything else. Per request:
    read body -> parse once -> find experiment -> hash user -> pick arm -> forward -> record
The body stays a dict and is forwarded unchanged but for `model` (and, for streams,
`stream_options.include_usage`, which the proxy needs to count tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp
import orjson

from proxy.assignment import Variant, bucket, choose_variant
from proxy.errors import (
    ClientAuthFailed,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    ProxyError,
    UnknownModel,
    UnsupportedMediaType,
    UpstreamBusy,
    UpstreamError,
)
from proxy.event_stream import CLIENT_CLOSED
from proxy.events import EventLog
from proxy.experiments import Arm, Experiment, Router
from proxy.fallback_log import FallbackLog
from proxy.feedback import FeedbackIntake, accepted_body
from proxy.ids import RequestIds, UserHasher
from proxy.metrics import Metrics
from proxy.model_calls import retry_after
from proxy.pair_sampling import PairSampler
from proxy.recorder import Recorder
from proxy.rollout import RolloutCache
from proxy.sse import UsageTap, first_finish_reason, first_text
from proxy.types import Receive, Scope, Send
from proxy.upstream import (
    DROPPED_REQUEST_HEADERS,
    DROPPED_RESPONSE_HEADERS,
    TRANSPORT_ERRORS,
    RawHeaders,
    Upstream,
    UpstreamPool,
    never_sent,
    translate,
    translate_errors,
)

# path -> (endpoint label, may stream)
ENDPOINTS: dict[str, tuple[str, bool]] = {
    "/v1/chat/completions": ("chat.completions", True),
    "/v1/completions": ("completions", True),
    "/v1/embeddings": ("embeddings", False),
}
ENDPOINT_PATH = {label: path[3:] for path, (label, _stream) in ENDPOINTS.items()}  # "chat.completions" -> "/chat/..."
# endpoint -> the body field that holds what the user asked
PROMPT_FIELD = {"chat.completions": "messages", "completions": "prompt", "embeddings": "input"}
FEEDBACK_PATH = "/v1/feedback"
# A client's own request id (X-Client-Request-Id, OpenAI's header, or X-Request-Id) is kept as
# `client_request_id` for tracing; the id of record is always the one the proxy issues.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = b"application/json"
# A user id longer than this is refused: no real id is, and hashing megabytes per request is an attack.
MAX_USER_ID_CHARS = 512
# Upstream answers that mean "not done, try again": the upstream did not act on the request.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
RETRY_BACKOFF_S = 0.1  # after a refused connection: 0.1, 0.2, 0.4 ... s (capped at max_retry_wait_s)
_DROPPED_RESPONSE = frozenset(name.encode() for name in DROPPED_RESPONSE_HEADERS)
SHUTTING_DOWN = Overloaded("the proxy is shutting down; retry the request", code="shutting_down")


class ClientGone(Exception):
    """The client disconnected while the proxy was still reading its request."""


@dataclass(slots=True)
class Exchange:
    """One routed request: where it went, and what came back (for metrics and the event)."""

    request_id: str
    experiment: Experiment
    arm: Arm
    endpoint: str
    stream: bool
    user_id: str | None
    bucket: int | None
    episode_id: str | None
    started: float
    headers: tuple[tuple[bytes, bytes], ...]  # x-request-id, x-abproxy-experiment, x-abproxy-variant
    client_request_id: str | None
    rollout_percent: float
    # A keyed fingerprint of messages / prompt / input, taken when the request arrives, so the
    # parsed body is not kept alive for a whole stream only to be hashed at its end.
    prompt_hash: str | None
    prompt: Any  # messages / prompt / input as sent, kept only where the experiment stores prompts
    status: int = 0
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # timeout | connect | interrupted | 4xx | 5xx | busy | overloaded | cancelled
    upstream_status: int | None = None  # None: no response headers arrived
    finish_reason: str | None = None  # of the first choice, as the upstream reported it
    completion: str | None = None  # the answer's text, captured only where prompts are stored or pairs sampled
    pair_body: dict[str, Any] | None = None  # set when this request is sampled for a pair
    retries: int = 0  # extra attempts made (upstreams.X.retries)
    fallback: bool = False  # the treatment failed and the control answered (experiments.X.fallback_to_control)
    held: Upstream | None = None  # whose in-flight slot an open stream holds until it ends
    answer: bytes | None = None  # a whole 200 answer whose usage the record reads (after the request)


class OpenAIHandler:
    def __init__(
        self,
        router: Router,
        rollout: RolloutCache,
        upstreams: UpstreamPool,
        metrics: Metrics,
        events: EventLog,
        *,
        max_body_bytes: int,
        request_ids: RequestIds,
        hash_user: UserHasher,
        feedback: FeedbackIntake,
        pairs: PairSampler,
        recorder: Recorder,
        max_in_flight: int = 4096,
        client_keys: frozenset[str] = frozenset(),
        fallbacks: FallbackLog | None = None,
    ) -> None:
        self.router = router
        self.rollout = rollout
        self.upstreams = upstreams
        self.metrics = metrics
        self.events = events
        self.max_body_bytes = max_body_bytes
        self.request_ids = request_ids
        self.hash_user = hash_user
        self.feedback = feedback
        self.pairs = pairs
        self.recorder = recorder
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # this process's /v1 requests being forwarded now (one event-loop thread: no lock)
        self.client_keys = client_keys  # hex SHA-256 of accepted client keys; empty: no client auth
        self.fallbacks = fallbacks if fallbacks is not None else FallbackLog(metrics)
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": alias, "object": "model", "created": 0, "owned_by": f"abproxy:{exp.name}"}
                    for alias, exp in router.by_alias.items()
                ],
            }
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request_id = self.request_ids.issue(time.time())
        headers = _read_headers(scope["headers"])
        path: str = scope["path"]
        try:
            if self.client_keys and not _client_key_ok(headers.authorization, self.client_keys):
                raise ClientAuthFailed("missing or invalid API key for this proxy (Authorization: Bearer ...)")
            if path == "/v1/models" and scope["method"] == "GET":
                await _send_json(send, 200, self._models_body, request_id)
                return
            route = ENDPOINTS.get(path)
            if route is None and path == FEEDBACK_PATH and scope["method"] == "POST":
                await self._feedback(receive, send, request_id, headers.content_type)
                return
            if route is None:
                raise NotFound(f"no route {scope['method']} {path}", code="unknown_url")
            if scope["method"] != "POST":
                raise InvalidRequest(f"{path} accepts POST only", code="method_not_allowed")
            _check_content_type(headers.content_type)
            body = _parse_body(await self._read_body(receive))
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidRequest("you must provide a model parameter", param="model", code="missing_model")
            experiment = self.router.by_alias.get(model)
            if experiment is None:
                raise UnknownModel(f"the model {model[:100]!r} does not exist or is not routed by this proxy",
                                   param="model")  # fmt: skip
            user_id = headers.user_id or _body_user(body)
            if user_id is not None and len(user_id) > MAX_USER_ID_CHARS:
                raise InvalidRequest(f"the user id is longer than {MAX_USER_ID_CHARS} characters", param="user",
                                     code="invalid_user_id")  # fmt: skip
        except ClientGone:
            return
        except ProxyError as exc:
            self.metrics.rejected.labels(str(exc.status_code)).inc()
            await _send_error(send, exc, request_id, ())
            self._emit_rejected(request_id, path, exc, started)
            return

        variant: Variant
        if user_id is None:
            bucket_ = None
            variant = "control"
            self.metrics.unidentified.labels(experiment.name, variant, experiment.control.upstream_model).inc()
        else:
            bucket_ = bucket(experiment.salt, user_id)
            variant = choose_variant(bucket_, self.rollout.thresholds[experiment.name])
        percent = self.rollout.states[experiment.name].percent
        arm = experiment.arm(variant)
        endpoint, can_stream = route
        prompt = body.get(PROMPT_FIELD[endpoint])
        body["model"] = arm.upstream_model
        stream = can_stream and body.get("stream") is True
        client_wants_usage = True
        if stream:
            options = body.get("stream_options")
            if options is None or isinstance(options, dict):
                client_wants_usage = bool(options and options.get("include_usage") is True)
                if not client_wants_usage:
                    body["stream_options"] = {**(options or {}), "include_usage": True}
        ex = Exchange(
            request_id, experiment, arm, endpoint, stream, user_id, bucket_, headers.episode_id, started,
            (
                (b"x-request-id", request_id.encode()),
                (b"x-abproxy-experiment", experiment.name.encode()),
                (b"x-abproxy-variant", variant.encode()),
            ),
            headers.client_request_id,
            percent,
            self._prompt_hash(user_id, prompt),
            prompt if experiment.store_prompts else None,
        )
        if endpoint != "embeddings" and self.pairs.wants(experiment):
            ex.pair_body = body
        capture = experiment.store_prompts or ex.pair_body is not None
        in_flight = self.metrics.in_flight_gauge(experiment.name, variant, arm.upstream_model, endpoint)
        in_flight.inc()
        self.in_flight += 1
        try:
            if self.in_flight > self.max_in_flight:
                self.metrics.overloaded.labels("total").inc()
                raise Overloaded(f"the proxy has {self.max_in_flight} requests in flight; retry shortly",
                                 retry_after_s=1)  # fmt: skip
            answer = await self._forward(ex, path[3:], body, headers.forward)
            del body, prompt  # sent: not held for the length of a stream (pair sampling keeps its own reference)
            if isinstance(answer, aiohttp.ClientResponse):
                ex.status = 200
                if not ex.fallback:  # after a fallback, upstream_status and error stay the treatment's failure
                    ex.upstream_status = 200
                try:
                    tap = UsageTap(drop_usage_chunk=not client_wants_usage, capture_text=capture)
                    await _relay_stream(answer, receive, send, ex, tap)
                finally:
                    self.upstreams.release_stream(answer)
            else:
                await _send_body(send, ex, *answer)
        except ProxyError as exc:
            ex.status = exc.status_code
            if ex.error is None:
                ex.error = exc.reason if isinstance(exc, UpstreamError) else "busy" if isinstance(
                    exc, UpstreamBusy) else "overloaded"  # fmt: skip
            await _send_error(send, exc, request_id, (*ex.headers[1:], *exc.headers()))
        except asyncio.CancelledError:
            # The server is shutting down under us: still account for the request.
            ex.status, ex.error = CLIENT_CLOSED, "cancelled"
            raise
        finally:
            self.in_flight -= 1
            if ex.held is not None:
                ex.held.in_flight -= 1
            in_flight.dec()
            self.recorder.add(self._record, ex, time.perf_counter() - ex.started, time.time())
            # Now, not with the batch: a burst of sampled requests would meet pair_max_in_flight at once.
            if ex.pair_body is not None and ex.status == 200 and ex.completion:
                self.pairs.submit(
                    ex.experiment, ex.arm, ex.request_id, ENDPOINT_PATH[ex.endpoint], ex.pair_body, ex.completion
                )

    # -- forwarding ------------------------------------------------------------------------
    async def _forward(
        self, ex: Exchange, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse | tuple[int, RawHeaders, bytes]:
        """Ask the arm's upstream (with retries); if the treatment failed and the experiment allows
        it, ask the control instead. Returns an open stream (status 200, the caller releases it) or
        a whole answer (status, headers, body). Nothing has reached the client yet either way."""
        try:
            answer = await self._ask(ex, ex.arm.upstream, path, orjson.dumps(body), headers)
        except (UpstreamError, UpstreamBusy) as exc:
            if not self._falls_back(ex):
                raise
            ex.error = exc.reason if isinstance(exc, UpstreamError) else "busy"
        else:
            failed = not isinstance(answer, aiohttp.ClientResponse) and (answer[0] == 429 or answer[0] >= 500)
            if not failed or not self._falls_back(ex):
                return answer
            assert not isinstance(answer, aiohttp.ClientResponse)
            ex.upstream_status = answer[0]
            ex.error = "4xx" if answer[0] < 500 else "5xx"
        # The treatment failed before any byte left: the control answers, and the event says so.
        control = ex.experiment.control
        ex.fallback = True
        self.fallbacks.record(ex.experiment.name, ex.error or "error", ex.request_id)
        body["model"] = control.upstream_model
        return await self._ask(ex, control.upstream, path, orjson.dumps(body), headers)

    def _falls_back(self, ex: Exchange) -> bool:
        return ex.arm.variant == "treatment" and ex.experiment.fallback_to_control

    async def _ask(
        self, ex: Exchange, upstream_name: str, path: str, payload: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse | tuple[int, RawHeaders, bytes]:
        """One upstream, retried where the upstream cannot have acted on the request."""
        upstream = self.upstreams.upstreams[upstream_name]
        if upstream.max_in_flight is not None and upstream.in_flight >= upstream.max_in_flight:
            self.metrics.overloaded.labels(upstream_name).inc()
            raise UpstreamBusy(f"upstream {upstream_name} has {upstream.max_in_flight} requests in flight; "
                               "retry shortly", retry_after_s=1)  # fmt: skip
        upstream.in_flight += 1
        held = False
        try:
            attempt = 0
            while True:
                try:
                    answer = await self._attempt(ex.stream, upstream, path, payload, headers)
                except UpstreamError as exc:
                    if attempt >= upstream.retries or not never_sent(exc):
                        raise
                    wait = min(RETRY_BACKOFF_S * 2**attempt, upstream.max_retry_wait_s)
                    reason = "connect"
                else:
                    if isinstance(answer, aiohttp.ClientResponse):
                        held, ex.held = True, upstream  # released when the stream ends
                        return answer
                    if answer[0] not in RETRY_STATUSES:
                        return answer
                    told = retry_after(answer[1])
                    wait = min(RETRY_BACKOFF_S * 2**attempt, upstream.max_retry_wait_s) if told is None else told
                    if attempt >= upstream.retries or wait > upstream.max_retry_wait_s:
                        return answer
                    reason = str(answer[0])
                attempt += 1
                ex.retries += 1
                self.metrics.retries.labels(upstream_name, reason).inc()
                await asyncio.sleep(wait)
        finally:
            if not held:
                upstream.in_flight -= 1

    async def _attempt(
        self, stream: bool, upstream: Upstream, path: str, payload: bytes, headers: dict[str, str]
    ) -> aiohttp.ClientResponse | tuple[int, RawHeaders, bytes]:
        if not stream:
            return await self.upstreams.fetch(upstream.name, path, payload, headers)
        response = await self.upstreams.open_stream(upstream.name, path, payload, headers)
        if response.status == 200:
            return response
        try:
            with translate_errors(upstream.name):
                return response.status, response.raw_headers, await response.read()
        finally:
            response.release()

    # -- request side ----------------------------------------------------------------------
    async def _read_body(self, receive: Receive) -> bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body: bytes = message.get("body", b"")
        if not message.get("more_body"):
            if len(body) > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            return body
        parts = [body]
        size = len(body)
        while message.get("more_body"):
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            part = message.get("body", b"")
            size += len(part)
            if size > self.max_body_bytes:
                raise _too_large(self.max_body_bytes)
            parts.append(part)
        return b"".join(parts)

    async def _feedback(self, receive: Receive, send: Send, request_id: str, content_type: str | None) -> None:
        """Off the chat path: validate, append to the event stream, answer 202 (feedback.py)."""
        try:
            _check_content_type(content_type)
            event = self.feedback.validate(await self._read_body(receive), time.time())
            await self.feedback.submit(event)
        except ClientGone:
            return
        except ProxyError as exc:
            self.metrics.rejected.labels(str(exc.status_code)).inc()
            await _send_error(send, exc, request_id, ())
            return
        self.metrics.feedback.labels(event["metric"]).inc()
        await _send_json(send, 202, accepted_body(event), request_id)

    # -- recording -------------------------------------------------------------------------
    def _record(self, ex: Exchange, duration: float, now: float) -> None:
        """Metrics and event of a finished request: run by the recorder, after it."""
        if ex.answer is not None:
            _read_answer(ex.answer, ex)
        arm = ex.arm
        experiment = ex.experiment.name
        cost = arm.pricing.cost_usd(ex.prompt_tokens, ex.completion_tokens)
        self.metrics.observe(
            experiment, arm.variant, arm.upstream_model, ex.endpoint, ex.stream, ex.status,
            duration, ex.ttft_s, ex.prompt_tokens, ex.completion_tokens, cost,
        )
        if ex.error is not None:
            self.metrics.upstream_error(experiment, arm.variant, arm.upstream_model, ex.error)
        event: dict[str, Any] = {
            "ts": now,
            "time": datetime.fromtimestamp(now, UTC),
            "request_id": ex.request_id,
            "experiment": experiment,
            "variant": arm.variant,
            "model": arm.model_key,
            "upstream_model": arm.upstream_model,
            "user_hash": self.hash_user(ex.user_id),
            "bucket": ex.bucket,
            "rollout_percent": ex.rollout_percent,
            "episode_id": ex.episode_id,
            "endpoint": ex.endpoint,
            "stream": ex.stream,
            "status": ex.status,
            "upstream_status": ex.upstream_status,
            "error": ex.error,
            "finish_reason": ex.finish_reason,
            "latency_ms": round(duration * 1000, 3),
            "ttft_ms": None if ex.ttft_s is None else round(ex.ttft_s * 1000, 3),
            "prompt_tokens": ex.prompt_tokens,
            "completion_tokens": ex.completion_tokens,
            "cost_usd": cost,
            "prompt_hash": ex.prompt_hash,
            "client_request_id": ex.client_request_id,
            "retries": ex.retries,
            "fallback": ex.fallback,
        }
        if ex.experiment.store_prompts:
            event["prompt"] = ex.prompt
            event["completion"] = ex.completion
        self.events.emit(event)

    def _prompt_hash(self, user_id: str | None, prompt: Any) -> str | None:
        # Regeneration is the same user sending the same prompt again: a keyed fingerprint of
        # it is enough, and reveals nothing of the text.
        return self.hash_user.prompt(orjson.dumps(prompt)) if user_id is not None and prompt else None

    def _emit_rejected(self, request_id: str, path: str, exc: ProxyError, started: float) -> None:
        now = time.time()
        self.events.emit(
            {
                "ts": now,
                "time": datetime.fromtimestamp(now, UTC),
                "request_id": request_id,
                "experiment": None,
                "path": path,
                "status": exc.status_code,
                "error": exc.code,
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            }
        )


class ClientHeaders(NamedTuple):
    client_request_id: str | None
    user_id: str | None
    episode_id: str | None
    forward: dict[str, str]  # what goes on to the upstream
    authorization: str | None  # the client's own key for this proxy (never forwarded)
    content_type: str | None


def _read_headers(raw: list[tuple[bytes, bytes]]) -> ClientHeaders:
    """One pass over the client's headers: ids the proxy uses, and the ones to forward."""
    client_request_id = user_id = episode_id = authorization = content_type = None
    forward: dict[str, str] = {}
    connection = ""
    for name, value in raw:
        if name == b"x-user-id":
            # UTF-8, as the same id in a JSON body: the bucket formula hashes the id's UTF-8
            # bytes, so latin-1 here would give non-ASCII users a second, different bucket.
            try:
                user_id = value.decode() or None
            except UnicodeDecodeError:
                user_id = value.decode("latin-1") or None
        elif name == b"x-episode-id":
            episode_id = value.decode("latin-1")[:256] or None
        elif name == b"x-client-request-id" or name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _CLIENT_REQUEST_ID.fullmatch(candidate):
                client_request_id = candidate
        else:
            key = name.decode("latin-1")
            if key not in DROPPED_REQUEST_HEADERS:
                forward[key] = value.decode("latin-1")
            elif key == "connection":
                connection += "," + value.decode("latin-1")
            elif key == "authorization":
                authorization = value.decode("latin-1")
            elif key == "content-type":
                content_type = value.decode("latin-1")
    # RFC 9110 7.6.1: the headers Connection names are hop-by-hop too, whatever they are called.
    for option in connection.split(","):
        forward.pop(option.strip().lower(), None)
    return ClientHeaders(client_request_id, user_id, episode_id, forward, authorization, content_type)


def _client_key_ok(authorization: str | None, accepted: frozenset[str]) -> bool:
    """Compare digests, not keys: a set lookup on a SHA-256 leaks, through timing, only which
    digest prefixes exist, never a key (the digest of a guess is unrelated to its closeness)."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        return False
    return hashlib.sha256(key.strip().encode()).hexdigest() in accepted


def _check_content_type(content_type: str | None) -> None:
    """JSON, or no content type at all (curl -d without -H sends a form type, which is refused)."""
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise UnsupportedMediaType(f"the request body must be application/json, not {media or 'empty'!r}",
                                   code="unsupported_media_type")  # fmt: skip


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", code="invalid_body")
    return body


def _body_user(body: dict[str, Any]) -> str | None:
    for field in ("user", "safety_identifier"):
        value = body.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def _read_answer(payload: bytes, ex: Exchange) -> None:
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return
    if not isinstance(obj, dict):
        return
    if isinstance(obj.get("usage"), dict):
        _usage_into(obj["usage"], ex)
    ex.finish_reason = first_finish_reason(obj)
    if ex.experiment.store_prompts or ex.pair_body is not None:
        ex.completion = first_text(obj)


def _usage_into(usage: dict[str, Any], ex: Exchange) -> None:
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    ex.prompt_tokens = prompt if isinstance(prompt, int) else 0
    ex.completion_tokens = completion if isinstance(completion, int) else 0


async def _send_body(send: Send, ex: Exchange, status: int, raw_headers: RawHeaders, payload: bytes) -> None:
    ex.status = status
    if not ex.fallback:  # after a fallback, upstream_status and error stay the treatment's failure
        ex.upstream_status = status
    if status == 200:
        if ex.pair_body is None:
            ex.answer = payload  # read with the record, in its batch (proxy/recorder.py)
        else:
            _read_answer(payload, ex)  # pair sampling needs the answer's text now
    else:
        ex.error = "4xx" if status < 500 else "5xx"
    headers = _response_headers(raw_headers, ex.headers)
    if ex.fallback:
        headers.append((b"x-abproxy-fallback", b"control"))
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _relay_stream(
    response: aiohttp.ClientResponse, receive: Receive, send: Send, ex: Exchange, tap: UsageTap
) -> None:
    """Pump SSE events to the client in this task while a watcher waits for the client to leave.

    The pump runs here, not in a task of its own: one task and no asyncio.wait per open stream
    (README, "Open streams": each costs the stream memory). The watcher cancels this task when
    the client leaves; that cancellation is told apart from the server's by `watch.left`."""
    watch = _ClientWatch(receive)
    try:
        await _pump(response, send, ex, tap)
    except asyncio.CancelledError:
        if not watch.left:
            # The server is stopping and its shutdown deadline (server.shutdown_timeout_s) has
            # passed: end the stream well-formed, with an error event the client's SDK raises.
            try:
                event = b"data: " + SHUTTING_DOWN.to_json() + b"\n\n"
                await send({"type": "http.response.body", "body": tap.finish() + event, "more_body": False})
            except Exception:  # the connection may be gone already; the request is recorded either way
                pass
            raise
        ex.status, ex.error = CLIENT_CLOSED, "cancelled"
        # Closing (not releasing) drops the connection: that is the upstream's cancel.
        response.close()
        if watch.absorb():
            raise  # the server is stopping as well
    finally:
        watch.stop()


class _ClientWatch:
    """Waits for the client to leave (the ASGI receive channel's http.disconnect) and then cancels
    the task relaying its stream, unless `stop` came first.

    uvicorn's receive() also says http.disconnect once the response is complete: by then the
    relay has called `stop` (the last send and `stop` run with no await between them), so the
    watcher is cancelled before it can act."""

    __slots__ = ("_relay", "_watcher", "left")

    def __init__(self, receive: Receive) -> None:
        self._relay: asyncio.Task[Any] | None = asyncio.current_task()
        self.left = False
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        self._watcher.add_done_callback(self._done)

    def _done(self, watcher: asyncio.Future[None]) -> None:
        if watcher.cancelled():
            return
        watcher.exception()  # retrieved: a receive() that failed means the client is gone too
        if self._relay is not None:
            self.left = True
            self._relay.cancel()

    def absorb(self) -> bool:
        """Take back the cancellation this watch made (after the client left); True if another, the
        server's, is still pending on the relaying task."""
        assert self._relay is not None
        return self._relay.uncancel() > 0

    def stop(self) -> None:
        self._relay = None
        self._watcher.cancel()


async def _pump(response: aiohttp.ClientResponse, send: Send, ex: Exchange, tap: UsageTap) -> None:
    headers = _response_headers(response.raw_headers, ex.headers)
    if ex.fallback:
        headers.append((b"x-abproxy-fallback", b"control"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    try:
        async for chunk in response.content.iter_any():
            if ex.ttft_s is None:
                ex.ttft_s = time.perf_counter() - ex.started
            out = tap.feed(chunk)
            if out:
                await send({"type": "http.response.body", "body": out, "more_body": True})
    except TRANSPORT_ERRORS as exc:  # `translate_errors` inlined: no context manager held per stream
        # Headers are gone already: tell the client in-band, the way OpenAI does.
        error = translate(exc, ex.arm.upstream, mid_stream=True)
        ex.status, ex.error = error.status_code, error.reason
        event = b"data: " + error.to_json() + b"\n\n"
        await send({"type": "http.response.body", "body": tap.finish() + event, "more_body": False})
        return
    if tap.usage is not None:
        _usage_into(tap.usage, ex)
    ex.finish_reason = tap.finish_reason
    ex.completion = tap.text
    if tap.error is not None:
        ex.error = "5xx"
    await send({"type": "http.response.body", "body": tap.finish(), "more_body": False})


def _response_headers(raw_headers: RawHeaders, ours: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    headers = list(ours)
    for name, value in raw_headers:
        lower = name.lower()
        if lower == b"x-request-id":
            headers.append((b"x-upstream-request-id", value))
        elif lower not in _DROPPED_RESPONSE:
            headers.append((lower, value))
    return headers


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send_json(
    send: Send, status: int, payload: bytes, request_id: str, extra: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    headers = [
        (b"content-type", _JSON),
        (b"content-length", str(len(payload)).encode()),
        (b"x-request-id", request_id.encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_error(send: Send, exc: ProxyError, request_id: str, extra: tuple[tuple[bytes, bytes], ...]) -> None:
    await _send_json(send, exc.status_code, exc.to_json(), request_id, extra)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than {limit} bytes")
