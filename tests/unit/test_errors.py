"""Every failure reaches the client in OpenAI's error shape, with the right status and an x-request-id."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from tmem.server.errors import (
    REQUEST_ID_HEADER,
    ContextLengthExceeded,
    Forbidden,
    InternalError,
    ModelNotFound,
    RequestIdMiddleware,
    ServiceUnavailable,
    Unauthorized,
    current_request_id,
    error_chunk,
    install_error_handlers,
    register_exception,
    to_http_error,
)
from tmem.server.protocol import SSE_DONE, ChatCompletionRequest, sse_event
from tmem.server.session_protocol import TeachRequest

SECRET = "db-password=hunter2 at /srv/tmem/store.py"
HI = [{"role": "user", "content": "hi"}]


class StoreDown(Exception):
    """Stands in for server.store.StoreUnavailable, which errors.py must not import."""


class StoreTimeout(StoreDown):
    """A subclass: it must map like its registered base."""


register_exception(StoreDown, lambda exc: ServiceUnavailable("session storage is unavailable", retry_after=1.5))


def build_app(handlers_first: bool = False) -> FastAPI:
    app = FastAPI()
    if handlers_first:  # the error boundary ends up inside RequestIdMiddleware instead of outside
        install_error_handlers(app)
        app.add_middleware(RequestIdMiddleware)
    else:
        app.add_middleware(RequestIdMiddleware)
        install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict[str, Any]:
        return {"max_tokens": body.max_tokens, "roles": [m.role for m in body.messages], "id": current_request_id()}

    @app.post("/v1/sessions/{sid}/memories")
    async def teach(sid: str, body: TeachRequest) -> dict[str, int]:
        return {"pairs": len(body.pairs)}

    @app.get("/raise/{kind}")
    async def fail(kind: str) -> None:
        errors: dict[str, Exception] = {
            "runtime": RuntimeError(SECRET),
            "store": StoreTimeout(SECRET),
            "context": ContextLengthExceeded("too long", param="messages"),
            "model": ModelNotFound("gpt-9"),
            "auth": Unauthorized(),
            "forbidden": Forbidden("session belongs to another tenant"),
            "http": HTTPException(status_code=409, detail="session is being deleted"),
        }
        raise errors[kind]

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                yield sse_event({"choices": [{"delta": {"content": "Hel"}}]})
                raise RuntimeError(SECRET)
            except Exception as exc:
                yield error_chunk(exc)
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    # raise_server_exceptions stays on: an unhandled error that escaped the handlers fails the test.
    return TestClient(build_app())


def error_of(response: Any) -> dict[str, Any]:  # TestClient's response type varies by Starlette version
    """The error object, after checking it has exactly OpenAI's keys."""
    body = response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers[REQUEST_ID_HEADER]
    return dict(body["error"])


# (case id, request body or raw bytes, status, param, code, text the message must contain)
BODY_CASES: list[tuple[str, Any, int, str | None, str | None, str]] = [
    ("invalid-json", b'{"messages": [', 400, None, "invalid_json", "Invalid JSON in request body: "),
    ("not-an-object", [1, 2], 400, None, None, "a JSON object is required"),
    ("missing-messages", {"model": "m"}, 400, "messages", "missing_required_parameter", "'messages'"),
    ("empty-messages", {"messages": []}, 400, "messages", "invalid_value", "at least 1 item"),
    ("unknown-field", {"messages": HI, "store": True}, 400, "store", "unknown_parameter", "argument supplied: store"),
    ("tools", {"messages": HI, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter", "'tools'"),
    ("tool_choice", {"messages": HI, "tool_choice": "auto"}, 400, "tool_choice", "unsupported_parameter", "not"),
    ("logit_bias", {"messages": HI, "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported_parameter", "not"),
    ("n=2", {"messages": HI, "n": 2}, 400, "n", "unsupported_value", "Only n=1 is supported"),
    ("logprobs", {"messages": HI, "logprobs": True}, 400, "logprobs", "unsupported_value", "logprobs=false"),
    ("temperature", {"messages": HI, "temperature": 3}, 400, "temperature", "invalid_value", "less than or equal"),
    ("stop", {"messages": HI, "stop": list("abcde")}, 400, "stop", "invalid_value", "at most 4"),
    (
        "image-part",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
        "unsupported_value",
        "Only text content parts",
    ),
    (
        "message-tool-calls",
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]}]},
        400,
        "messages[0].tool_calls",
        "unsupported_parameter",
        "'tool_calls' is not supported",
    ),
    ("two-errors", {"messages": HI, "temperature": 3, "top_p": 0}, 400, "temperature", "invalid_value", "1 more error"),
]


@pytest.mark.parametrize(
    ("body", "status", "param", "code", "needle"), [c[1:] for c in BODY_CASES], ids=[c[0] for c in BODY_CASES]
)
def test_bad_chat_bodies_are_openai_errors(
    client: TestClient, body: Any, status: int, param: str | None, code: str | None, needle: str
) -> None:
    if isinstance(body, bytes):
        response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert needle in error["message"]


def test_nested_session_body_errors_name_the_item(client: TestClient) -> None:
    response = client.post("/v1/sessions/s1/memories", json={"pairs": [{"instruction": "q", "output": " "}]})
    error = error_of(response)
    assert (response.status_code, error["param"]) == (400, "pairs[0].output")
    assert error["message"] == "Invalid value for 'pairs[0].output': must not be empty."


def test_a_good_body_passes_with_max_completion_tokens_winning(client: TestClient) -> None:
    body = {"messages": [{"role": "developer", "content": "x"}, *HI], "max_tokens": 9, "max_completion_tokens": 4}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["max_tokens"] == 4
    assert response.json()["roles"] == ["system", "user"]


@pytest.mark.parametrize(
    ("method", "path", "status", "type_", "code", "message"),
    [
        ("GET", "/v1/nope", 404, "not_found_error", "unknown_url", "Invalid URL (GET /v1/nope)."),
        (
            "GET",
            "/v1/chat/completions",
            405,
            "invalid_request_error",
            "method_not_allowed",
            "Method not allowed (GET /v1/chat/completions).",
        ),
        ("GET", "/raise/http", 409, "conflict_error", None, "session is being deleted"),
        ("GET", "/raise/model", 404, "not_found_error", "model_not_found", "The model `gpt-9` does not exist."),
        ("GET", "/raise/forbidden", 403, "permission_error", None, "session belongs to another tenant"),
        ("GET", "/raise/context", 400, "invalid_request_error", "context_length_exceeded", "too long"),
    ],
    ids=["unknown-route", "wrong-method", "http-exception", "unknown-model", "forbidden", "context-length"],
)
def test_routing_and_raised_errors_keep_the_shape(
    client: TestClient, method: str, path: str, status: int, type_: str, code: str | None, message: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    error = error_of(response)
    assert (error["type"], error["code"]) == (type_, code)
    assert error["message"].startswith(message)


def test_wrong_method_keeps_the_allow_header(client: TestClient) -> None:
    assert client.get("/v1/chat/completions").headers["allow"] == "POST"


def test_unauthorized_carries_a_bearer_challenge(client: TestClient) -> None:
    response = client.get("/raise/auth")
    assert (response.status_code, error_of(response)["type"]) == (401, "authentication_error")
    assert response.headers["www-authenticate"] == "Bearer"


def test_an_unexpected_error_is_a_generic_500_and_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="tmem.server.errors"):
        response = client.get("/raise/runtime", headers={REQUEST_ID_HEADER: "req-trace-1"})
    assert response.status_code == 500
    error = error_of(response)
    assert error == {"message": InternalError().message, "type": "server_error", "param": None, "code": None}
    assert "hunter2" not in response.text and "Traceback" not in response.text
    assert response.headers[REQUEST_ID_HEADER] == "req-trace-1"
    [record] = [r for r in caplog.records if r.exc_info]
    assert "req-trace-1" in record.getMessage() and SECRET in str(record.exc_info[1])  # type: ignore[index]


def test_a_registered_exception_maps_to_503_with_retry_after(client: TestClient) -> None:
    response = client.get("/raise/store")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"  # 1.5 s rounded up: never retry early
    error = error_of(response)
    assert (error["type"], error["message"]) == ("service_unavailable", "session storage is unavailable")
    assert "hunter2" not in response.text


def test_the_mapper_prefers_the_most_specific_registration() -> None:
    register_exception(StoreTimeout, lambda exc: ServiceUnavailable("store timed out", retry_after=3))
    try:
        assert to_http_error(StoreTimeout()).message == "store timed out"
        assert to_http_error(StoreDown()).message == "session storage is unavailable"
    finally:
        register_exception(StoreTimeout, lambda exc: ServiceUnavailable("session storage is unavailable"))


def test_a_mid_stream_error_is_an_error_event_then_done(client: TestClient) -> None:
    response = client.get("/stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    # No status line is left mid-stream, so the code carries the status.
    assert (error["type"], error["code"]) == ("server_error", 500)
    assert "hunter2" not in response.text


def test_error_chunk_keeps_an_errors_own_code() -> None:
    event = error_chunk(ContextLengthExceeded("too long", param="messages"))
    assert event.startswith("data: ") and event.endswith("\n\n")
    assert json.loads(event[len("data: ") :]) == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("abc-123_X.y:z", True), (None, False), ("has space", False), ("x" * 129, False), ("", False)],
    ids=["valid", "absent", "space", "too-long", "empty"],
)
def test_request_id_is_echoed_or_generated(client: TestClient, sent: str | None, kept: bool) -> None:
    headers = {REQUEST_ID_HEADER: sent} if sent is not None else {}
    response = client.post("/v1/chat/completions", json={"messages": HI}, headers=headers)
    request_id = response.headers[REQUEST_ID_HEADER]
    if kept:
        assert request_id == sent
    else:
        assert request_id.startswith("req_") and len(request_id) == len("req_") + 32
    assert response.json()["id"] == request_id  # the handler saw the same id through the contextvar


def test_error_responses_carry_the_request_id(client: TestClient) -> None:
    for path in ("/v1/nope", "/raise/store", "/raise/context"):
        assert client.get(path, headers={REQUEST_ID_HEADER: "req-42"}).headers[REQUEST_ID_HEADER] == "req-42"
    generated = client.get("/raise/runtime").headers[REQUEST_ID_HEADER]
    assert generated.startswith("req_") and generated != client.get("/raise/runtime").headers[REQUEST_ID_HEADER]
    assert current_request_id() is None  # nothing leaks out of a request


def test_the_order_of_installation_does_not_matter() -> None:
    client = TestClient(build_app(handlers_first=True))
    for path, status in (("/raise/runtime", 500), ("/raise/store", 503), ("/v1/nope", 404)):
        response = client.get(path, headers={REQUEST_ID_HEADER: "req-7"})
        assert (response.status_code, response.headers[REQUEST_ID_HEADER]) == (status, "req-7")
        error_of(response)
