"""The one place where exceptions become HTTP errors, always in OpenAI's shape.

Every error body is ``{"error": {"message", "type", "param", "code"}}``. Routes raise a
:class:`TMEMHTTPError` subclass (or any exception registered with :func:`register_exception`);
:func:`to_http_error` maps everything else, :func:`install_error_handlers` wires it into FastAPI,
and :func:`error_chunk` sends the same body as a server-sent event when a stream has already
started. :class:`RequestIdMiddleware` gives every response an ``x-request-id``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from tmem.server.asgi import HttpMiddleware

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Pydantic error types that protocol validators raise; their message is already user-facing.
UNSUPPORTED_PARAMETER = "unsupported_parameter"
UNSUPPORTED_VALUE = "unsupported_value"

INTERNAL_ERROR_MESSAGE = "The server had an error while processing your request. Please retry."


class ErrorBody(BaseModel):
    """The inside of OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: every non-2xx response of this server has this shape."""

    error: ErrorBody


_ERROR_MEANINGS = {400: "Invalid request (bad JSON, unsupported field, limits, context length)",
                   401: "Missing or wrong API key", 403: "Not allowed (another tenant, session cap)",
                   404: "Unknown model, session or route", 413: "Request body too large",
                   429: "Rate limit reached; see Retry-After",
                   503: "Storage (Redis) or the server unavailable; see Retry-After"}
# For routers: declares the error shape in the OpenAPI spec, so clients and fuzzers see it.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in _ERROR_MEANINGS.items()}


def error_response(
    status: int,
    message: str,
    type: str,
    param: str | None = None,
    code: str | int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build ``{"error": {...}}`` with the given HTTP status."""
    body = ErrorBody(message=message, type=type, param=param, code=code)
    return JSONResponse({"error": body.model_dump()}, status_code=status, headers=dict(headers or {}))


class TMEMHTTPError(Exception):
    """An error with an HTTP status and an OpenAI error body; raise it anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> ErrorBody:
        """The error object of this exception."""
        return ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)

    def to_response(self) -> JSONResponse:
        """This error as a JSON response."""
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


class _FixedStatusError(TMEMHTTPError):
    """Base of the errors whose status, type and default code are fixed by their class."""

    STATUS: ClassVar[int] = 500
    TYPE: ClassVar[str] = "server_error"
    CODE: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(self.STATUS, message, self.TYPE, param, code or self.CODE, headers)


class InvalidRequest(_FixedStatusError):
    """400: the request is malformed or asks for something unsupported."""

    STATUS, TYPE = 400, "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """400: prompt plus completion do not fit the model's context window."""

    CODE = "context_length_exceeded"


class Unauthorized(_FixedStatusError):
    """401: missing or wrong API key."""

    STATUS, TYPE = 401, "authentication_error"

    def __init__(self, message: str = "Incorrect or missing API key.", param: str | None = None) -> None:
        # RFC 9110 requires a challenge on every 401.
        super().__init__(message, param, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(_FixedStatusError):
    """403: the caller is known but may not touch this resource (e.g. another tenant's session)."""

    STATUS, TYPE = 403, "permission_error"


class NotFound(_FixedStatusError):
    """404: an unknown session or other resource."""

    STATUS, TYPE = 404, "not_found_error"


class ModelNotFound(NotFound):
    """404: the request names a model this server does not serve."""

    CODE = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class UnprocessableContent(_FixedStatusError):
    """422: well-formed, but contradicts an earlier request (an Idempotency-Key reused with another body)."""

    STATUS, TYPE = 422, "invalid_request_error"


class PayloadTooLarge(_FixedStatusError):
    """413: the body or one of its lists is over the server's limit."""

    STATUS, TYPE, CODE = 413, "invalid_request_error", "payload_too_large"


class _RetryableError(_FixedStatusError):
    """An error the client should retry after ``retry_after`` seconds (sent as ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float = 1, param: str | None = None, code: str | None = None) -> None:
        # Retry-After takes whole seconds; round up so clients never retry early.
        super().__init__(message, param, code, headers={"Retry-After": str(max(0, math.ceil(retry_after)))})
        self.retry_after = retry_after


class RateLimited(_RetryableError):
    """429: too many requests or too much queued work for this caller."""

    STATUS, TYPE, CODE = 429, "rate_limit_error", "rate_limit_exceeded"


class ServiceUnavailable(_RetryableError):
    """503: a dependency (store, engine) is down or the server is draining."""

    STATUS, TYPE = 503, "service_unavailable"


class InternalError(_FixedStatusError):
    """500: a bug; the message stays generic and the traceback goes to the log only."""

    STATUS, TYPE = 500, "server_error"

    def __init__(self, message: str = INTERNAL_ERROR_MESSAGE) -> None:
        super().__init__(message)


# --- mapping ---------------------------------------------------------------------------------

E = TypeVar("E", bound=BaseException)
_REGISTRY: dict[type[BaseException], Callable[[Any], TMEMHTTPError]] = {}

# Statuses Starlette raises itself (unknown route, wrong method, body limit) → OpenAI error type.
_STATUS_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def register_exception(exc_type: type[E], factory: Callable[[E], TMEMHTTPError]) -> None:
    """Map ``exc_type`` (and its subclasses) to the error ``factory`` builds.

    Lets the server map e.g. ``StoreUnavailable`` to ``ServiceUnavailable(retry_after=1)`` without
    this module importing the store.
    """
    _REGISTRY[exc_type] = factory


def to_http_error(exc: BaseException, request: Request | None = None) -> TMEMHTTPError:
    """Map any exception to the HTTP error the client sees; unknown ones become a generic 500.

    ``request`` lets an unknown-route error say which URL was wrong.
    """
    if isinstance(exc, TMEMHTTPError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _from_validation_errors(exc.errors())
    if isinstance(exc, StarletteHTTPException):
        return _from_starlette(exc, request)
    for cls in type(exc).__mro__:  # most specific registration wins
        factory = _REGISTRY.get(cls)
        if factory is not None:
            return factory(exc)
    return InternalError()


def _location(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` → ``"messages[0].content"``; ``None`` for the body itself."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _from_validation_errors(errors: Any) -> InvalidRequest:
    """Describe the first failing field the way OpenAI does; ``param`` is its location."""
    errors = list(errors)
    if not errors:
        return InvalidRequest("Invalid request body.")
    first = errors[0]
    kind, msg = str(first.get("type", "")), str(first.get("msg", ""))
    msg = msg.removeprefix("Value error, ").rstrip(".")  # pydantic's prefix for ValueErrors in validators
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", msg)
        return InvalidRequest(f"Invalid JSON in request body: {detail}.", code="invalid_json")
    param = _location(first.get("loc", ()))
    field = (first.get("ctx") or {}).get("field")
    if field:  # raised by a model-level check, whose location is the model: add the field's name
        param = f"{param}.{field}" if param else str(field)
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if param is None:
        text = "a JSON object is required" if kind in ("missing", "model_attributes_type") else msg
        return InvalidRequest(f"Invalid request body: {text}.{more}")
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.{more}", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unrecognized request argument supplied: {param}{more}", param, "unknown_parameter")
    if kind in (UNSUPPORTED_PARAMETER, UNSUPPORTED_VALUE):
        return InvalidRequest(f"{msg}.{more}", param, kind)
    return InvalidRequest(f"Invalid value for '{param}': {msg}.{more}", param, "invalid_value")


def _from_starlette(exc: StarletteHTTPException, request: Request | None) -> TMEMHTTPError:
    """Unknown routes, wrong methods and body limits raised by Starlette itself."""
    status, code = exc.status_code, None
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    where = f"{request.method} {request.url.path}" if request is not None else "this request"
    # Starlette's own 404/405 carry only the status phrase, which tells the user nothing.
    if status == 404 and detail == "Not Found":
        detail, code = f"Invalid URL ({where}).", "unknown_url"
    elif status == 405 and detail == "Method Not Allowed":
        detail, code = f"Method not allowed ({where}).", "method_not_allowed"
    type_ = _STATUS_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return TMEMHTTPError(status, detail, type_, code=code, headers=exc.headers)


def _log_unexpected(exc: BaseException, err: TMEMHTTPError, where: str, request_id: str | None) -> None:
    """Keep the traceback of a 500 in the log, never in the response; a registered mapping is expected."""
    if err.status < 500 or isinstance(exc, TMEMHTTPError):
        return
    if any(isinstance(exc, known) for known in _REGISTRY):
        # e.g. Redis away → 503: an outage worth a line, not a crash worth a traceback.
        logger.warning("%s %s (request %s): %s", err.status, where, request_id, exc)
        return
    logger.error("Unhandled error %s (request %s)", where, request_id, exc_info=exc)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    err = to_http_error(exc, request)
    request_id = getattr(request.state, "request_id", None)
    _log_unexpected(exc, err, f"in {request.method} {request.url.path}", request_id)
    response = err.to_response()
    # RequestIdMiddleware sets this too, but responses sent from outside it (the error boundary
    # when added after it, Starlette's ServerErrorMiddleware) would go without.
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


class _ErrorBoundaryMiddleware(HttpMiddleware):
    """Answer exceptions that no handler caught with their mapped error.

    Starlette hands an ``Exception`` handler to its outermost ServerErrorMiddleware, which answers
    and then re-raises: every registered 503 (a Redis outage) would log a second, id-less
    traceback. This boundary answers first; it lets an error through only when the response has
    already started (a stream, whose generator sends its own error chunk).
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                raise
            response = await _handle(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error of ``app`` through :func:`to_http_error` (adds one middleware, the boundary)."""
    app.add_exception_handler(TMEMHTTPError, _handle)
    app.add_exception_handler(RequestValidationError, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle)
    app.add_middleware(_ErrorBoundaryMiddleware)
    # Last resort for errors raised by middleware outside the boundary.
    app.add_exception_handler(Exception, _handle)


def error_chunk(exc: BaseException) -> str:
    """The server-sent event for an error after a stream has started; send ``data: [DONE]`` next.

    A stream has no status line left to use, so ``code`` carries the HTTP status when the error
    has no code of its own.
    """
    err = to_http_error(exc)
    _log_unexpected(exc, err, "in a stream", current_request_id())
    body = err.body()
    if body.code is None:
        body.code = err.status
    return f"data: {json.dumps({'error': body.model_dump()}, ensure_ascii=False)}\n\n"


# --- request ids -----------------------------------------------------------------------------

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("tmem_request_id", default=None)
# Client-chosen ids go into headers and logs: accept only short, plain tokens.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def current_request_id() -> str | None:
    """The id of the request being served in this task, if any."""
    return _request_id.get()


class RequestIdMiddleware(HttpMiddleware):
    """Pure ASGI middleware: reuse a sane incoming ``X-Request-ID`` or make ``req_<hex>``.

    The id is stored in ``request.state.request_id`` and in a contextvar (see
    :func:`current_request_id`) and set on every response, error responses included.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = incoming if _VALID_REQUEST_ID.fullmatch(incoming) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = _request_id.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)
