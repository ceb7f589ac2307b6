"""The proxy's error tree and the one place that renders OpenAI-shaped error bodies.

    ProxyError                       status  type
    ├── InvalidRequest               400     invalid_request_error
    │   ├── PayloadTooLarge          413     invalid_request_error
    │   └── UnsupportedMediaType     415     invalid_request_error
    ├── AuthenticationFailed         401     authentication_error  (admin token)
    ├── ClientAuthFailed             401     invalid_request_error (client key, as OpenAI answers a bad key)
    ├── AdminDisabled                403     permission_error
    │   └── ReadOnlyToken            403     permission_error      (the read-only admin token on a write)
    ├── TooManyRequests              429     rate_limit_error      (Retry-After set)
    │   └── UpstreamBusy             429     rate_limit_error      (upstreams.X.max_in_flight reached)
    ├── NotFound                     404     invalid_request_error
    │   ├── UnknownModel             404     invalid_request_error (code model_not_found)
    │   └── Gone                     410     invalid_request_error (an expired request id)
    ├── StateConflict                409     invalid_request_error (a rollout plan override that does not apply)
    ├── UnprocessableEntity          422     invalid_request_error
    ├── StateUnavailable             503     service_unavailable   (Redis down on an admin write)
    │   └── FeedbackUnavailable      503     service_unavailable   (feedback not stored: retry)
    ├── Overloaded                   503     service_unavailable   (server.max_in_flight reached; Retry-After)
    └── UpstreamError                502     upstream_error
        ├── UpstreamUnreachable      502     upstream_error        (connect/reset)
        ├── UpstreamInterrupted      502     upstream_error        (the upstream broke off a stream)
        └── UpstreamTimeout          504     upstream_error        (no answer in timeout_s)

Upstream HTTP errors are *not* in this tree: they pass through with the upstream's own
status and body, as a client talking to the provider directly would see them.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class ProxyError(Exception):
    status_code: ClassVar[int] = 500
    openai_type: ClassVar[str] = "api_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s  # sent as Retry-After, which the openai client honours

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        return () if self.retry_after_s is None else ((b"retry-after", str(self.retry_after_s).encode()),)

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.openai_type, self.param, self.code)

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequest(ProxyError):
    status_code, openai_type = 400, "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code, default_code = 413, "body_too_large"


class UnsupportedMediaType(InvalidRequest):
    status_code, default_code = 415, "unsupported_media_type"


class AuthenticationFailed(ProxyError):
    status_code, openai_type, default_code = 401, "authentication_error", "invalid_admin_token"


class ClientAuthFailed(ProxyError):
    status_code, openai_type, default_code = 401, "invalid_request_error", "invalid_api_key"


class AdminDisabled(ProxyError):
    status_code, openai_type, default_code = 403, "permission_error", "admin_disabled"


class ReadOnlyToken(AdminDisabled):
    default_code = "read_only_token"


class TooManyRequests(ProxyError):
    status_code, openai_type, default_code = 429, "rate_limit_error", "rate_limit_exceeded"


class UpstreamBusy(TooManyRequests):
    default_code = "upstream_concurrency_limit"


class NotFound(ProxyError):
    status_code, openai_type, default_code = 404, "invalid_request_error", "not_found"


class UnknownModel(NotFound):
    default_code = "model_not_found"


class Gone(NotFound):
    status_code, default_code = 410, "gone"


class UnprocessableEntity(ProxyError):
    status_code, openai_type, default_code = 422, "invalid_request_error", "invalid_value"


class StateConflict(ProxyError):
    status_code, openai_type, default_code = 409, "invalid_request_error", "conflict"


class StateUnavailable(ProxyError):
    status_code, openai_type, default_code = 503, "service_unavailable", "rollout_store_unavailable"


class FeedbackUnavailable(StateUnavailable):
    default_code = "feedback_unavailable"


class Overloaded(ProxyError):
    status_code, openai_type, default_code = 503, "service_unavailable", "proxy_overloaded"


class UpstreamError(ProxyError):
    status_code, openai_type, default_code = 502, "upstream_error", "upstream_error"
    reason: ClassVar[str] = "connect"  # the `reason` label of abproxy_upstream_errors_total


class UpstreamUnreachable(UpstreamError):
    default_code = "upstream_unreachable"


class UpstreamInterrupted(UpstreamError):
    default_code, reason = "upstream_interrupted", "interrupted"


class UpstreamTimeout(UpstreamError):
    status_code, default_code, reason = 504, "upstream_timeout", "timeout"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
