"""Errors raised by the TMEM client.

Every error is a :class:`TMEMError`. A response with an error status becomes an
:class:`APIStatusError` subclass picked from :data:`STATUS_ERRORS`; a request that never got a
response becomes :class:`APIConnectionError` (or :class:`APITimeoutError`)::

    try:
        client.session("alice").info()
    except NotFoundError as err:
        print(err.status_code, err.request_id, err.message)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "STATUS_ERRORS",
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "InternalServerError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServiceUnavailableError",
    "TMEMError",
    "UnprocessableEntityError",
    "error_class_for",
    "status_error",
]


class TMEMError(Exception):
    """Base class of every error the client raises.

    ``body`` is the decoded error body (or raw text) when the server sent one; ``type``, ``code``
    and ``param`` are copied from its ``{"error": {...}}`` object.
    """

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        request_id: str | None = None,
        body: object | None = None,
        type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.body = body
        self.type = type
        self.code = code
        self.param = param

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.insert(0, f"Error {self.status_code}:")
        if self.request_id:
            parts.append(f"(request id {self.request_id})")
        return " ".join(parts)


class APIStatusError(TMEMError):
    """The server answered with an error status (4xx/5xx), or sent an error event in a stream."""

    status_code: int


class BadRequestError(APIStatusError):
    """400: the request was malformed."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: no such session, model or route."""


class ConflictError(APIStatusError):
    """409: a conflicting request (e.g. the same idempotency key) is in flight."""


class PayloadTooLargeError(APIStatusError):
    """413: the request body is too large."""


class UnprocessableEntityError(APIStatusError):
    """422: the body is well-formed JSON but fails validation."""


class RateLimitError(APIStatusError):
    """429: too many requests; retried automatically, honouring ``Retry-After``."""


class InternalServerError(APIStatusError):
    """5xx: the server failed."""


class ServiceUnavailableError(InternalServerError):
    """503: the server is overloaded or starting; retried automatically."""


class APIConnectionError(TMEMError):
    """No response arrived: the connection failed or broke."""

    def __init__(self, message: str = "Connection error.", request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)


class APITimeoutError(APIConnectionError):
    """No response arrived within the timeout."""

    def __init__(self, message: str = "Request timed out.", request_id: str | None = None) -> None:
        super().__init__(message, request_id=request_id)


class APIResponseValidationError(TMEMError):
    """A successful response did not have the expected shape."""


STATUS_ERRORS: Mapping[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: UnprocessableEntityError,
    429: RateLimitError,
    500: InternalServerError,
    503: ServiceUnavailableError,
}
"""Status code → error class. Statuses not listed fall back to their family (see ``error_class_for``)."""

# In-stream error events carry no HTTP status: their ``type`` says what failed.
_TYPE_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "BadRequestError": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "NotFoundError": 404,
    "conflict_error": 409,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "service_unavailable": 503,
    "overloaded_error": 503,
}


def error_class_for(status_code: int) -> type[APIStatusError]:
    """Return the error class for an HTTP status: its table entry, else ``InternalServerError`` for
    any 5xx, else ``APIStatusError``."""
    if status_code in STATUS_ERRORS:
        return STATUS_ERRORS[status_code]
    return InternalServerError if status_code >= 500 else APIStatusError


def status_error(
    status_code: int | None, body: object, request_id: str | None, fallback_message: str = ""
) -> APIStatusError:
    """Build the error for an OpenAI-shaped error body ``{"error": {message, type, param, code}}``.

    With ``status_code=None`` (an error event inside a stream) the status is inferred from an
    integer ``code``, then from ``type``, else 500.
    """
    detail: Mapping[str, Any] = {}
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        detail = body["error"]
    message = str(detail.get("message") or fallback_message or "Unknown error")
    type_ = detail.get("type")
    code = detail.get("code")
    status = status_code if status_code is not None else _infer_status(type_, code)
    return error_class_for(status)(
        message,
        status_code=status,
        request_id=request_id,
        body=body,
        type=type_ if isinstance(type_, str) else None,
        code=code if isinstance(code, (str, int)) else None,
        param=detail.get("param") if isinstance(detail.get("param"), str) else None,
    )


def _infer_status(type_: object, code: object) -> int:
    if isinstance(code, int) and 400 <= code <= 599:
        return code
    if isinstance(code, str) and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    if isinstance(type_, str) and type_ in _TYPE_STATUS:
        return _TYPE_STATUS[type_]
    return 500
