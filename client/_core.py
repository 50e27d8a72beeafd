"""The transport-free core shared by the sync and async clients.

Everything that is not "send this request" or "sleep" lives here: what each API call sends
(a :class:`Plan`), how its answer is decoded, how an error response becomes an exception, and when
and how long to wait before a retry. The two clients only perform the I/O the core describes.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import pydantic

from .errors import APIConnectionError, APIResponseValidationError, APIStatusError, APITimeoutError, status_error
from .types import (
    ChatCompletion,
    ChatMessage,
    DeleteResult,
    FlushResult,
    HealthStatus,
    MemoryList,
    ModelList,
    QAPair,
    SessionInfo,
)

T = TypeVar("T")
M = TypeVar("M", bound=pydantic.BaseModel)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 2
API_KEY_ENV = "TMEM_API_KEY"
SESSION_HEADER = "X-Session-ID"
VERSION_HEADER = "X-TMEM-Adapter-Version"
USER_AGENT = "tmem-client/0.1"
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
# A flush waits server-side; the HTTP read timeout must outlast it by this margin.
FLUSH_TIMEOUT_MARGIN = 10.0

MessagesInput = str | Sequence[ChatMessage | Mapping[str, Any]]
PairsInput = Iterable[QAPair | tuple[str, str] | Mapping[str, Any]]


@dataclass(frozen=True)
class Plan(Generic[T]):
    """One API call, transport-free: what to send and how to decode a successful answer."""

    method: str
    path: str
    decode: Callable[[httpx.Response], T]
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    stream: bool = False
    wait_seconds: float | None = None
    """Seconds the server may legitimately hold the request (a flush); extends the read timeout."""


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry and how long to wait: ``Retry-After`` when given, else jittered backoff."""

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    jitter: Callable[[], float] = random.random
    clock: Callable[[], float] = time.time

    def delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before retrying after ``attempt`` (0-based) ended with ``response``
        (``None``: no response arrived), or ``None`` when the outcome is final."""
        if attempt >= self.max_retries:
            return None
        if response is not None and response.status_code not in RETRY_STATUSES:
            return None
        retry_after = self.retry_after(response.headers) if response is not None else None
        if retry_after is not None and 0 <= retry_after <= self.max_retry_after:
            return retry_after
        backoff = min(self.initial_delay * 2.0**attempt, self.max_delay)
        return backoff * (1.0 - 0.25 * self.jitter())

    def retry_after(self, headers: Mapping[str, str]) -> float | None:
        """Parse ``Retry-After`` given as seconds or as an HTTP date; ``None`` when absent or invalid."""
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return float(value)
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - self.clock())


class Core:
    """Client settings and the request/response logic both clients share."""

    def __init__(
        self,
        base_url: str | httpx.URL,
        api_key: str | None,
        timeout: float | httpx.Timeout,
        retry: RetryPolicy,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry

    def build_request(self, http: httpx.Client | httpx.AsyncClient, plan: Plan[Any]) -> httpx.Request:
        """The request for ``plan``, reused unchanged by every retry (same idempotency key)."""
        headers = {
            "Accept": "text/event-stream" if plan.stream else "application/json",
            "User-Agent": USER_AGENT,
        }
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if plan.method != "GET":
            # One key per logical call so the server can drop a retried duplicate.
            headers["Idempotency-Key"] = f"tmem-{uuid.uuid4()}"
        headers.update(plan.headers)
        return http.build_request(
            plan.method,
            self.base_url + plan.path,
            json=plan.json,
            headers=headers,
            timeout=self._timeout_for(plan),
        )

    def _timeout_for(self, plan: Plan[Any]) -> httpx.Timeout:
        read = self.timeout.read
        if plan.wait_seconds is None or read is None:
            return self.timeout
        return httpx.Timeout(
            connect=self.timeout.connect,
            read=max(read, plan.wait_seconds + FLUSH_TIMEOUT_MARGIN),
            write=self.timeout.write,
            pool=self.timeout.pool,
        )


def normalize_base_url(base_url: str | httpx.URL) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all become ``http://h:8000``."""
    url = str(base_url).rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def request_id_of(response: httpx.Response) -> str | None:
    """The server's ``x-request-id`` header, if any."""
    return response.headers.get("x-request-id")


def error_for(response: httpx.Response) -> APIStatusError:
    """The exception for an error response whose body has been read."""
    try:
        body: object = response.json()
    except (ValueError, httpx.ResponseNotRead):
        body = _text_or_none(response)
    return status_error(response.status_code, body, request_id_of(response), fallback_message=response.reason_phrase)


def _text_or_none(response: httpx.Response) -> str | None:
    try:
        return response.text or None
    except httpx.ResponseNotRead:
        return None


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """The exception for a request that got no (complete) response."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError()
    return APIConnectionError(f"Connection error: {exc}" if str(exc) else "Connection error.")


def adapter_version_of(response: httpx.Response) -> int | None:
    """The ``X-TMEM-Adapter-Version`` header as an int, if present and numeric."""
    value = response.headers.get(VERSION_HEADER)
    return int(value) if value is not None and value.strip().isdigit() else None


def parse_json(response: httpx.Response) -> Any:
    """The decoded JSON body of a successful response."""
    try:
        return response.json()
    except ValueError as exc:
        raise APIResponseValidationError(
            f"Expected a JSON body: {exc}", response.status_code, request_id_of(response)
        ) from exc


def validate(model: type[M], data: Any, response: httpx.Response) -> M:
    """``model.model_validate(data)``, failing as :class:`APIResponseValidationError`."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise APIResponseValidationError(
            f"Unexpected {model.__name__} shape: {exc}", response.status_code, request_id_of(response), data
        ) from exc


def decoder(model: type[M]) -> Callable[[httpx.Response], M]:
    """A ``Plan.decode`` that parses the JSON body as ``model``."""
    return lambda response: validate(model, parse_json(response), response)


def decode_chat(response: httpx.Response) -> ChatCompletion:
    """Parse a ChatCompletion and attach the adapter version and request id from the headers."""
    completion = validate(ChatCompletion, parse_json(response), response)
    completion.adapter_version = adapter_version_of(response)
    completion.request_id = request_id_of(response)
    return completion


def message_list(messages: MessagesInput) -> list[dict[str, Any]]:
    """Messages as JSON objects; a bare string is one user message. Dicts pass through unchanged
    (the server validates them), so OpenAI message fields this client does not model still work."""
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages]


def pair_list(pairs: PairsInput) -> list[dict[str, Any]]:
    """QA pairs as JSON objects; accepts QAPair, ``(question, answer)`` tuples and dicts."""
    result = []
    for pair in pairs:
        if isinstance(pair, QAPair):
            qa = pair
        elif isinstance(pair, tuple):
            qa = QAPair(instruction=pair[0], output=pair[1])
        else:
            qa = QAPair.model_validate(pair)
        result.append(qa.model_dump())
    return result


# -- one plan per API call ------------------------------------------------------------------------


# Client options of a chat that travel as headers: (option, header, header value of the option).
_SESSION_OPTIONS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("context", "X-TMEM-Context", str),
    ("adapter", "X-TMEM-Adapter", lambda on: "on" if on else "off"),
    ("record", "X-TMEM-Record", lambda on: "true" if on else "false"),
)


def chat_plan(
    messages: MessagesInput, *, stream: bool, session_id: str | None, params: Mapping[str, Any]
) -> Plan[ChatCompletion]:
    """``POST /v1/chat/completions``. ``params`` are body fields (``temperature``, ...) plus client
    options: ``model`` (left out when ``None``: the server's default model), ``idempotency_key`` (sent
    as a header instead of a generated one), and the session ablations ``context="none"`` (the adapter
    without stored turns or summary), ``adapter=False`` (the base model) and ``record=False`` (ask
    without storing the turn)."""
    body: dict[str, Any] = {"messages": message_list(messages), "stream": stream, **params}
    if body.get("model", "") is None:
        del body["model"]
    headers = {SESSION_HEADER: session_id} if session_id is not None else {}
    for option, header, value_of in _SESSION_OPTIONS:
        if option in body:
            headers[header] = value_of(body.pop(option))
    idempotency_key = body.pop("idempotency_key", None)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = str(idempotency_key)
    return Plan("POST", "/v1/chat/completions", decode_chat, json=body, headers=headers, stream=stream)


def models_plan() -> Plan[ModelList]:
    """``GET /v1/models``."""
    return Plan("GET", "/v1/models", decoder(ModelList))


def health_plan() -> Plan[HealthStatus]:
    """``GET /health``."""
    return Plan("GET", "/health", decoder(HealthStatus))


def _session_path(session_id: str, suffix: str = "") -> str:
    if not session_id:
        raise ValueError("a session id must be a non-empty string")
    return f"/v1/sessions/{quote(session_id, safe='')}{suffix}"


def session_info_plan(session_id: str) -> Plan[SessionInfo]:
    """``GET /v1/sessions/{id}``."""
    return Plan("GET", _session_path(session_id), decoder(SessionInfo))


def ingest_plan(session_id: str, messages: MessagesInput) -> Plan[SessionInfo]:
    """``POST /v1/sessions/{id}/messages``: add turns without asking for a reply."""
    body = {"messages": message_list(messages)}
    return Plan("POST", _session_path(session_id, "/messages"), decoder(SessionInfo), json=body)


def teach_plan(session_id: str, pairs: PairsInput) -> Plan[SessionInfo]:
    """``POST /v1/sessions/{id}/memories``: train on QA pairs directly."""
    body = {"pairs": pair_list(pairs)}
    return Plan("POST", _session_path(session_id, "/memories"), decoder(SessionInfo), json=body)


def memories_plan(session_id: str) -> Plan[MemoryList]:
    """``GET /v1/sessions/{id}/memories``: the pairs the session learned from."""
    return Plan("GET", _session_path(session_id, "/memories"), decoder(MemoryList))


def flush_plan(session_id: str, timeout: float | None) -> Plan[FlushResult]:
    """``POST /v1/sessions/{id}/flush``: wait until pending updates are live."""
    body = {} if timeout is None else {"timeout": timeout}
    return Plan("POST", _session_path(session_id, "/flush"), decoder(FlushResult), json=body, wait_seconds=timeout)


def adapter_plan(session_id: str) -> Plan[tuple[bytes, int]]:
    """``GET /v1/sessions/{id}/adapter``: the ``.tar.gz`` bytes and their adapter version."""
    return Plan("GET", _session_path(session_id, "/adapter"), _decode_adapter)


def _decode_adapter(response: httpx.Response) -> tuple[bytes, int]:
    version = adapter_version_of(response)
    if version is None:
        raise APIResponseValidationError(
            f"The adapter download lacks the {VERSION_HEADER} header",
            response.status_code,
            request_id_of(response),
        )
    return response.content, version


def delete_plan(session_id: str) -> Plan[DeleteResult]:
    """``DELETE /v1/sessions/{id}``."""
    return Plan("DELETE", _session_path(session_id), decoder(DeleteResult))
