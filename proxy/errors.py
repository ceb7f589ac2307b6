"""The proxy's error tree and the one place that renders OpenAI-shaped error bodies.

    ProxyError                       status  type
    ├── InvalidRequest               400     invalid_request_error
    │   └── PayloadTooLarge          413     invalid_request_error
    ├── AuthenticationFailed         401     authentication_error
    ├── AdminDisabled                403     permission_error
    ├── NotFound                     404     invalid_request_error
    │   ├── UnknownModel             404     invalid_request_error (code model_not_found)
    │   └── Gone                     410     invalid_request_error (an expired request id)
    ├── StateConflict                409     invalid_request_error (a rollout plan override that does not apply)
    ├── UnprocessableEntity          422     invalid_request_error
    ├── StateUnavailable             503     service_unavailable   (Redis down on an admin write)
    │   └── FeedbackUnavailable      503     service_unavailable   (feedback not stored: retry)
    └── UpstreamError                502     upstream_error
        ├── UpstreamUnreachable      502     upstream_error        (connect/reset)
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

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.openai_type, self.param, self.code)

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequest(ProxyError):
    status_code, openai_type = 400, "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code, default_code = 413, "body_too_large"


class AuthenticationFailed(ProxyError):
    status_code, openai_type, default_code = 401, "authentication_error", "invalid_admin_token"


class AdminDisabled(ProxyError):
    status_code, openai_type, default_code = 403, "permission_error", "admin_disabled"


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


class UpstreamError(ProxyError):
    status_code, openai_type, default_code = 502, "upstream_error", "upstream_error"
    reason: ClassVar[str] = "connect"  # the `reason` label of abproxy_upstream_errors_total


class UpstreamUnreachable(UpstreamError):
    default_code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status_code, default_code, reason = 504, "upstream_timeout", "timeout"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
