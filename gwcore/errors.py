"""The GatewayError tree: every error carries its own answer.

Raise where the fact is known; render once, in the caller's API format (OpenAI's
``{"error": {...}}`` or Anthropic's ``{"type": "error", ...}``).  ``code`` is also the
metric label and the audit record's error code.
"""
from __future__ import annotations

import orjson


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code = "internal_error"
    anthropic_type = "api_error"
    message = "internal error"

    def __init__(self, message: str | None = None, *, param: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.message = message or self.message
        self.param = param
        self.headers = headers or []
        super().__init__(self.message)

    def openai_body(self) -> bytes:
        return orjson.dumps({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}})

    def anthropic_body(self) -> bytes:
        return orjson.dumps({"type": "error",
                             "error": {"type": self.anthropic_type, "message": self.message}})


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"
    anthropic_type = "invalid_request_error"
    message = "invalid request"

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message, param=param)
        if code:
            self.code = code


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    anthropic_type = "authentication_error"
    message = "Incorrect API key provided. Pass a gateway key as 'Authorization: Bearer <key>'."


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"
    anthropic_type = "permission_error"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    anthropic_type = "not_found_error"
    message = "Unknown route."


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    anthropic_type = "invalid_request_error"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    anthropic_type = "request_too_large"
    message = "Request body too large."


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    anthropic_type = "rate_limit_error"


class InsufficientQuota(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    anthropic_type = "rate_limit_error"


class UpstreamError(GatewayError):
    """The upstream answered with an error, or broke, after retries and fallbacks."""
    status = 502
    type = "api_error"
    code = "upstream_error"
    anthropic_type = "api_error"
    message = "The upstream provider returned an error."


class UpstreamUnavailable(UpstreamError):
    status = 503
    code = "upstream_unavailable"
    anthropic_type = "overloaded_error"
    message = "No upstream deployment could be reached."


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    message = "The upstream provider did not answer in time."


class UpstreamStatus(GatewayError):
    """An upstream 4xx/5xx whose meaning is passed on to the client with its status.

    OpenAI-format upstreams already send OpenAI error bodies; ``body`` keeps the
    upstream's JSON error so the client sees the provider's own message.
    """
    type = "api_error"
    code = "upstream_error"

    def __init__(self, status: int, message: str, *, type_: str | None = None,
                 code: str | None = None, param: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message, param=param, headers=headers)
        self.status = status
        if type_:
            self.type = type_
        if code:
            self.code = code
        self.anthropic_type = _ANTHROPIC_BY_STATUS.get(status, "api_error")


_ANTHROPIC_BY_STATUS = {400: "invalid_request_error", 401: "authentication_error",
                        403: "permission_error", 404: "not_found_error",
                        413: "request_too_large", 429: "rate_limit_error",
                        529: "overloaded_error"}
