"""POST /v1/feedback: an outcome the app observed, checked against its declaration, then queued.

    {"request_id": "<x-request-id>", "metric": "csat", "value": 4}            request-level metric
    {"user_id": "u-42", "metric": "returned_next_day", "value": true}         user-level metric
    optional: "episode_id" (conversation), "experiment" (user level: scope to one experiment)

Everything is checked before anything is written, so a bad request stores nothing: the metric
must be declared, the value must have its type and range, and a request id must be one this
deployment issued within `feedback.ttl_s` (`proxy.ids`: checked by its signature, no lookup),
spelled as issued: 40 hex digits, in either case (stored in lower case, as the request is).

Accepted feedback is appended to the event stream with an awaited XADD, so a 202 means Redis
holds it; if Redis cannot take it the answer is 503 and the app may retry (after a timeout the
XADD may still have landed: the retry is then a duplicate, which is harmless). The collector
stores it; one value per (request, metric) or (user, experiment, metric): the last one sent
wins, so the same feedback posted twice is stored, and analysed, once. None of this touches the
chat path: it is its own request with its own Redis round trip.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from proxy.config import MetricConfig, Settings
from proxy.errors import FeedbackUnavailable, Gone, InvalidRequest, NotFound
from proxy.event_stream import SCHEMA_VERSION, entry_fields
from proxy.ids import RequestIds, RequestIdStatus

MAX_FEEDBACK_BYTES = 16 * 1024
# The form the proxy issues (x-request-id): 40 hex digits, which feedback may send in either case.
_REQUEST_ID = re.compile(r"[0-9a-fA-F]{40}")


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    metric: str = Field(min_length=1, max_length=64)
    value: Any  # typed by the metric's declaration, checked in `_value`
    request_id: str | None = Field(default=None, min_length=1, max_length=128)
    user_id: str | None = Field(default=None, min_length=1, max_length=256)
    experiment: str | None = Field(default=None, min_length=1, max_length=128)
    episode_id: str | None = Field(default=None, min_length=1, max_length=256)


class FeedbackIntake:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        request_ids: RequestIds,
        hash_user: Callable[[str | None], str | None],
    ) -> None:
        self.metrics = settings.metrics
        self.experiments = frozenset(settings.experiments)
        self.ttl_s = settings.feedback.ttl_s
        self.redis = redis
        self.request_ids = request_ids
        self.hash_user = hash_user
        stream = settings.events.redis_stream
        self.key, self.maxlen = stream.key, stream.maxlen

    def validate(self, raw: bytes, now: float) -> dict[str, Any]:
        """The feedback event for a well-formed submission; raises a ProxyError otherwise."""
        if not self.metrics:
            raise NotFound("feedback is off: this proxy declares no outcome metrics (config `metrics:`)",
                           code="feedback_disabled")
        body = _parse(raw)
        spec = self.metrics.get(body.metric)
        if spec is None:
            known = ", ".join(sorted(self.metrics))
            raise InvalidRequest(f"unknown metric {body.metric!r} (declared: {known})", param="metric",
                                 code="unknown_metric")
        value = _value(body.metric, spec, body.value)
        event: dict[str, Any] = {
            "kind": "feedback",
            "schema_version": SCHEMA_VERSION,
            "ts": now,
            "time": datetime.fromtimestamp(now, UTC),
            "feedback_id": "fb_" + os.urandom(8).hex(),
            "level": spec.level,
            "metric": body.metric,
            "value": value,
            "episode_id": body.episode_id,
            "request_id": None,
            "user_hash": None,
            "experiment": None,
        }
        if spec.level == "request":
            if body.user_id is not None or body.experiment is not None:
                raise InvalidRequest(
                    f"{body.metric!r} is a request-level metric: name the request by request_id, not user_id",
                    param="user_id" if body.user_id is not None else "experiment", code="wrong_level",
                )
            if body.request_id is None:
                raise InvalidRequest(f"{body.metric!r} needs the request_id the proxy returned (x-request-id)",
                                     param="request_id", code="missing_request_id")
            event["request_id"] = self._check_request_id(body.request_id, now)
        else:
            if body.request_id is not None:
                raise InvalidRequest(
                    f"{body.metric!r} is a user-level metric: name the user by user_id, not request_id",
                    param="request_id", code="wrong_level",
                )
            if body.user_id is None:
                raise InvalidRequest(f"{body.metric!r} needs the user_id the app sends as user / X-User-Id",
                                     param="user_id", code="missing_user_id")
            if body.experiment is not None and body.experiment not in self.experiments:
                raise InvalidRequest(f"unknown experiment {body.experiment!r}", param="experiment",
                                     code="unknown_experiment")
            event["user_hash"] = self.hash_user(body.user_id)
            event["experiment"] = body.experiment
        return event

    async def submit(self, event: dict[str, Any]) -> None:
        fields = entry_fields(event["request_id"] or "", orjson.dumps(event))
        try:
            await self.redis.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)
        except (RedisError, OSError) as exc:
            # Not "was not stored": after a timeout the XADD may still be applied (a frozen Redis
            # thawing). Saying so is what makes the advice to retry safe to follow.
            raise FeedbackUnavailable(
                f"feedback may not have been stored (event stream unavailable: {type(exc).__name__}); "
                "retry: the same feedback sent twice is stored once"
            ) from None

    def _check_request_id(self, request_id: str, now: float) -> str:
        """The id as the proxy issued it (lower case), if it is one; raises NotFound or Gone otherwise."""
        # bytes.fromhex (RequestIds.check) skips whitespace and ignores case, so " <id>\n" or the id in
        # capitals passed its signature check, yet was stored under a spelling no request has: a 202
        # for feedback the analysis could never join. Only the issued form is taken, in either case,
        # and stored in the proxy's own spelling.
        if not _REQUEST_ID.fullmatch(request_id):
            status = RequestIdStatus.UNKNOWN
        else:
            request_id = request_id.lower()
            status = self.request_ids.check(request_id, now, self.ttl_s)
        if status is RequestIdStatus.UNKNOWN:
            raise NotFound(f"unknown request id {request_id!r}: send the x-request-id this proxy returned",
                           param="request_id", code="request_not_found")
        if status is RequestIdStatus.EXPIRED:
            raise Gone(f"request {request_id!r} is older than the feedback window ({self.ttl_s} s)",
                       param="request_id", code="request_expired")
        return request_id


def accepted_body(event: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "object": "feedback",
            "id": event["feedback_id"],
            "status": "accepted",
            "metric": event["metric"],
            "value": event["value"],
            "request_id": event["request_id"],
        }
    )


def _parse(raw: bytes) -> FeedbackBody:
    if len(raw) > MAX_FEEDBACK_BYTES:
        raise InvalidRequest(f"the feedback body is larger than {MAX_FEEDBACK_BYTES} bytes", code="body_too_large")
    try:
        return FeedbackBody.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "json_invalid":
            raise InvalidRequest("the request body is not valid JSON", code="invalid_json") from None
        if error["type"] == "model_type":
            raise InvalidRequest("the request body must be a JSON object", code="invalid_body") from None
        message = "unknown field" if error["type"] == "extra_forbidden" else error["msg"]
        raise InvalidRequest(f"{param}: {message}", param=param, code="invalid_value") from None


def _value(metric: str, spec: MetricConfig, value: Any) -> float:
    """The value as the store keeps it: booleans as 1.0/0.0, floats within the declared range."""
    if spec.type == "boolean":
        if not isinstance(value, bool):
            raise InvalidRequest(f"{metric!r} is a boolean metric: value must be true or false",
                                 param="value", code="invalid_type")
        return 1.0 if value else 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{metric!r} is a numeric metric: value must be a finite number",
                             param="value", code="invalid_type")
    if (spec.min is not None and value < spec.min) or (spec.max is not None and value > spec.max):
        low = "-inf" if spec.min is None else f"{spec.min:g}"
        high = "inf" if spec.max is None else f"{spec.max:g}"
        raise InvalidRequest(f"{metric!r} must be between {low} and {high}; got {value}",
                             param="value", code="value_out_of_range")
    return float(value)
