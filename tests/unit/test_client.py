"""Unit tests of the client SDK over httpx.MockTransport: no server, no sleeping."""

from __future__ import annotations

import email.utils
import io
import json
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from tmem import client
from tmem.client import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AsyncTMEMClient,
    ChatMessage,
    QAPair,
    TMEMClient,
)
from tmem.client._streaming import SSEDecoder

Handler = Callable[[httpx.Request], httpx.Response]
COMPLETION = {"id": "c1", "model": "m", "choices": [{"message": {"role": "assistant", "content": "hello"}}]}
SESSION = {"id": "alice", "object": "session", "adapter_version": 2, "turns": 4, "summary": "s"}


class TrackedStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body sent in small pieces that records whether it was closed."""

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for i in range(0, len(self.body), 7):  # pieces that cut lines and events apart
            yield self.body[i : i + 7]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self:
            yield piece

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def chunk(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


def sse(*events: object) -> TrackedStream:
    """An SSE body with a keep-alive comment, CRLF and LF line ends, ending in [DONE]."""
    lines = [": keep-alive\r\n\r\n"] + [f"data: {json.dumps(e)}\r\n\r\n" for e in events]
    return TrackedStream("".join(lines) + "data: [DONE]\n\n")


def error_body(
    message: str = "boom", type_: str = "some_error", code: object = "c", param: object = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sequence(*responses: httpx.Response | Exception) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering each request with the next response (the last one repeats)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        outcome = responses[min(len(seen), len(responses)) - 1]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return handler, seen


def make(handler: Handler, **kwargs: Any) -> tuple[TMEMClient, list[float]]:
    slept: list[float] = []
    http = httpx.Client(transport=httpx.MockTransport(handler))
    options: dict[str, Any] = {"api_key": "sk-test", **kwargs}
    return TMEMClient("http://tmem.test/v1", http_client=http, sleep=slept.append, **options), slept


def make_async(handler: Handler, **kwargs: Any) -> tuple[AsyncTMEMClient, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return AsyncTMEMClient("http://tmem.test", api_key="sk-test", http_client=http, sleep=sleep, **kwargs), slept


# -- errors ---------------------------------------------------------------------------------------

STATUS_CASES = [
    (400, client.BadRequestError),
    (401, client.AuthenticationError),
    (403, client.PermissionDeniedError),
    (404, client.NotFoundError),
    (409, client.ConflictError),
    (413, client.PayloadTooLargeError),
    (418, APIStatusError),
    (422, client.UnprocessableEntityError),
    (429, client.RateLimitError),
    (500, client.InternalServerError),
    (502, client.InternalServerError),
    (503, client.ServiceUnavailableError),
    (504, client.InternalServerError),
]


@pytest.mark.parametrize(("status", "error_class"), STATUS_CASES)
def test_error_status_maps_to_its_class_with_request_id(status: int, error_class: type) -> None:
    body = error_body("no luck", "invalid_request_error", code="bad_thing", param="messages")
    handler, _ = sequence(httpx.Response(status, json=body, headers={"x-request-id": "req-42"}))
    tmem, _ = make(handler, max_retries=0)
    with pytest.raises(client.TMEMError) as caught:
        tmem.session("alice").info()
    err = caught.value
    assert type(err) is error_class
    assert (err.status_code, err.request_id, err.message) == (status, "req-42", "no luck")
    assert (err.type, err.code, err.param, err.body) == ("invalid_request_error", "bad_thing", "messages", body)
    assert "req-42" in str(err)


def test_service_unavailable_is_an_internal_server_error() -> None:
    assert issubclass(client.ServiceUnavailableError, client.InternalServerError)
    assert issubclass(APITimeoutError, APIConnectionError)


def test_error_without_json_body_keeps_text() -> None:
    handler, _ = sequence(httpx.Response(502, text="upstream gone"))
    tmem, _ = make(handler, max_retries=0)
    with pytest.raises(client.InternalServerError) as caught:
        tmem.health()
    assert (caught.value.message, caught.value.body, caught.value.request_id) == ("Bad Gateway", "upstream gone", None)


# -- retries --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry_after", "expected"), [(429, "2", 2.0), (503, "0.5", 0.5)])
def test_retry_honours_retry_after(status: int, retry_after: str, expected: float) -> None:
    failure = httpx.Response(status, json=error_body(), headers={"Retry-After": retry_after})
    handler, seen = sequence(failure, failure, httpx.Response(200, json=SESSION))
    tmem, slept = make(handler)
    assert tmem.session("alice").info().turns == 4
    assert (len(seen), slept) == (3, [expected, expected])


def test_retry_after_as_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    handler, _ = sequence(httpx.Response(503, headers={"Retry-After": when}), httpx.Response(200, json=SESSION))
    tmem, slept = make(handler)
    tmem.session("alice").info()
    assert len(slept) == 1 and 28.0 <= slept[0] <= 30.0


def test_retries_exhausted_raise_last_error_after_backoff() -> None:
    handler, seen = sequence(httpx.Response(503, json=error_body("overloaded"), headers={"x-request-id": "r3"}))
    tmem, slept = make(handler, max_retries=2)
    with pytest.raises(client.ServiceUnavailableError) as caught:
        tmem.models()
    assert (len(seen), caught.value.request_id) == (3, "r3")
    # no Retry-After: exponential backoff from 0.5 s with up to 25% jitter taken off
    assert 0.375 <= slept[0] <= 0.5 and 0.75 <= slept[1] <= 1.0


def test_no_retry_on_400() -> None:
    handler, seen = sequence(httpx.Response(400, json=error_body()), httpx.Response(200, json=SESSION))
    tmem, slept = make(handler)
    with pytest.raises(client.BadRequestError):
        tmem.session("alice").info()
    assert (len(seen), slept) == (1, [])


@pytest.mark.parametrize(
    ("failure", "error_class"),
    [(httpx.ConnectError("refused"), APIConnectionError), (httpx.ReadTimeout("slow"), APITimeoutError)],
)
def test_connection_errors_are_retried_then_raised(failure: Exception, error_class: type) -> None:
    handler, seen = sequence(failure)
    tmem, slept = make(handler, max_retries=2)
    with pytest.raises(error_class):
        tmem.health()
    assert (len(seen), len(slept)) == (3, 2)


def test_a_retried_post_keeps_its_idempotency_key() -> None:
    handler, seen = sequence(httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(200, json=COMPLETION))
    tmem, _ = make(handler)
    tmem.session("alice").chat("hi")
    keys = [r.headers["Idempotency-Key"] for r in seen]
    assert keys[0] == keys[1] and keys[0].startswith("tmem-")
    tmem.session("alice").chat("hi", idempotency_key="mine")
    assert seen[-1].headers["Idempotency-Key"] == "mine"


# -- streaming ------------------------------------------------------------------------------------


def stream_client(body: TrackedStream, status: int = 200) -> tuple[TMEMClient, list[httpx.Request]]:
    headers = {"x-request-id": "req-s", "X-TMEM-Adapter-Version": "3", "content-type": "text/event-stream"}
    handler, seen = sequence(httpx.Response(status, stream=body, headers=headers))
    return make(handler, max_retries=0)[0], seen


def test_stream_yields_chunks_and_closes_when_exhausted() -> None:
    body = sse(chunk("Hel"), chunk("lo"), {"id": "c1", "choices": [], "usage": {"total_tokens": 5}})
    tmem, seen = stream_client(body)
    stream = tmem.session("alice").chat([{"role": "user", "content": "hi"}], stream=True, max_tokens=4)
    chunks = list(stream)
    assert "".join(c.delta_text for c in chunks) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5
    assert (stream.adapter_version, stream.request_id, body.closed) == (3, "req-s", True)
    assert json.loads(seen[0].content) == {
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": 4,
    }
    assert seen[0].headers["Accept"] == "text/event-stream"


def test_stream_error_event_raises_mapped_error_and_closes() -> None:
    body = sse(chunk("Hel"), error_body("engine died", "server_error", code=503))
    tmem, _ = stream_client(body)
    stream = tmem.session("alice").chat("hi", stream=True)
    assert next(stream).delta_text == "Hel"
    with pytest.raises(client.ServiceUnavailableError) as caught:
        next(stream)
    assert (caught.value.message, caught.value.request_id, body.closed) == ("engine died", "req-s", True)


def test_stream_early_break_in_with_block_closes() -> None:
    body = sse(*(chunk(str(i)) for i in range(50)))
    tmem, _ = stream_client(body)
    with tmem.session("alice").chat("hi", stream=True) as stream:
        for piece in stream:
            assert piece.delta_text == "0"
            break
        assert not body.closed
    assert body.closed


def test_stream_close_before_iterating_closes() -> None:
    body = sse(chunk("x"))
    tmem, _ = stream_client(body)
    tmem.chat("hi", stream=True).close()
    assert body.closed


def test_stream_http_error_raises_at_call_and_closes() -> None:
    body = TrackedStream(json.dumps(error_body("no such model")))
    tmem, _ = stream_client(body, status=404)
    with pytest.raises(client.NotFoundError, match="no such model"):
        tmem.session("alice").chat("hi", stream=True)
    assert body.closed


def test_sse_decoder_joins_multiline_data_and_ignores_other_fields() -> None:
    decoder = SSEDecoder()
    lines = ["event: message", "id: 1", "data: a", "data:b", ": comment", ""]
    assert [decoder.feed(line) for line in lines] == [None, None, None, None, None, "a\nb"]
    assert decoder.feed("data: tail") is None and decoder.flush() == "tail" and decoder.flush() is None


def test_stream_malformed_event_raises_validation_error() -> None:
    body = TrackedStream("data: {not json\n\n")
    tmem, _ = stream_client(body)
    with pytest.raises(APIResponseValidationError):
        list(tmem.chat("hi", stream=True))
    assert body.closed


# -- async ----------------------------------------------------------------------------------------


async def test_async_chat_returns_completion_with_adapter_version() -> None:
    handler, seen = sequence(httpx.Response(200, json=COMPLETION, headers={"X-TMEM-Adapter-Version": "9"}))
    tmem, _ = make_async(handler)
    async with tmem:
        result = await tmem.session("bob").chat("hi", model="tiny")
    assert (result.text, result.adapter_version) == ("hello", 9)
    assert seen[0].headers["X-Session-ID"] == "bob" and json.loads(seen[0].content)["model"] == "tiny"


async def test_async_stream_yields_chunks_and_closes_on_break() -> None:
    full, partial = sse(chunk("a"), chunk("b")), sse(chunk("a"), chunk("b"))
    handler, _ = sequence(httpx.Response(200, stream=full), httpx.Response(200, stream=partial))
    tmem, _ = make_async(handler)
    assert [c.delta_text async for c in await tmem.session("bob").chat("hi", stream=True)] == ["a", "b"]
    assert full.closed
    async with await tmem.session("bob").chat("hi", stream=True) as stream:
        async for _ in stream:
            break
    assert partial.closed


async def test_async_stream_error_event_raises() -> None:
    body = sse(error_body("too many", "rate_limit_error", code=None))
    handler, _ = sequence(httpx.Response(200, stream=body, headers={"x-request-id": "ra"}))
    tmem, _ = make_async(handler)
    with pytest.raises(client.RateLimitError) as caught:
        [c async for c in await tmem.chat("hi", stream=True)]
    assert (caught.value.status_code, caught.value.request_id, body.closed) == (429, "ra", True)


async def test_async_retries_then_maps_error() -> None:
    handler, seen = sequence(
        httpx.Response(503, headers={"Retry-After": "1"}),
        httpx.Response(404, json=error_body("no session"), headers={"x-request-id": "r404"}),
    )
    tmem, slept = make_async(handler)
    with pytest.raises(client.NotFoundError) as caught:
        await tmem.session("ghost").info()
    assert (len(seen), slept, caught.value.request_id) == (2, [1.0], "r404")


# -- session and client calls ---------------------------------------------------------------------

FLUSHED = {"id": "alice", "object": "session.flush", "adapter_version": 5}
HI = [{"role": "user", "content": "hi"}]
XY: list[ChatMessage | dict[str, Any]] = [ChatMessage(role="user", content="x"), {"role": "assistant", "content": "y"}]
PAIRS: list[QAPair | tuple[str, str] | dict[str, Any]] = [
    QAPair(instruction="q1", output="a1"),
    ("q2", "a2"),
    {"instruction": "q3", "output": "a3"},
]


class Case(NamedTuple):
    call: Callable[[TMEMClient], Any]
    method: str
    path: str
    body: Any
    answer: dict[str, Any]
    check: Callable[[Any], bool]
    session_header: str | None = None


CALLS = {
    "chat": Case(
        lambda c: c.session("alice").chat("hi", temperature=0.2), "POST", "/v1/chat/completions",
        {"messages": HI, "stream": False, "temperature": 0.2}, COMPLETION,
        lambda r: r.text == "hello" and r.adapter_version == 6, session_header="alice",
    ),
    "ingest": Case(
        lambda c: c.session("alice").ingest(XY), "POST", "/v1/sessions/alice/messages",
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, SESSION,
        lambda r: r.adapter_version == 2 and r.summary == "s",
    ),
    "teach": Case(
        lambda c: c.session("alice").teach(PAIRS), "POST", "/v1/sessions/alice/memories",
        {"pairs": [{"instruction": f"q{i}", "output": f"a{i}"} for i in (1, 2, 3)]}, SESSION, lambda r: r.turns == 4,
    ),
    "flush": Case(
        lambda c: c.session("alice").flush(timeout=5), "POST", "/v1/sessions/alice/flush", {"timeout": 5},
        FLUSHED, lambda r: r.adapter_version == 5,
    ),
    "info, id quoted": Case(
        lambda c: c.session("a/b").info(), "GET", "/v1/sessions/a%2Fb", None, SESSION, lambda r: r.id == "alice"
    ),
    "delete": Case(
        lambda c: c.session("alice").delete(), "DELETE", "/v1/sessions/alice", None,
        {"id": "alice", "object": "session.deleted", "deleted": True}, lambda r: r.deleted is True,
    ),
    "models": Case(
        lambda c: c.models(), "GET", "/v1/models", None, {"object": "list", "data": [{"id": "tiny"}]},
        lambda r: [m.id for m in r.data] == ["tiny"],
    ),
    "health": Case(
        lambda c: c.health(), "GET", "/health", None, {"status": "ok", "redis": "up"},
        lambda r: r.status == "ok" and r.redis == "up",
    ),
    "stateless chat": Case(
        lambda c: c.chat("hi"), "POST", "/v1/chat/completions", {"messages": HI, "stream": False}, COMPLETION,
        lambda r: r.text == "hello",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CALLS.values(), ids=CALLS.keys())
def test_call_sends_method_path_body_and_headers(case: Case) -> None:
    handler, seen = sequence(httpx.Response(200, json=case.answer, headers={"X-TMEM-Adapter-Version": "6"}))
    tmem, _ = make(handler)
    assert case.check(case.call(tmem))
    request = seen[0]
    assert (request.method, request.url.raw_path.decode(), request.url.host) == (case.method, case.path, "tmem.test")
    assert (json.loads(request.content) if request.content else None) == case.body
    assert request.headers["Authorization"] == "Bearer sk-test"
    assert request.headers.get("X-Session-ID") == case.session_header


def test_flush_timeout_extends_read_timeout() -> None:
    handler, seen = sequence(httpx.Response(200, json=FLUSHED))
    tmem, _ = make(handler, timeout=30.0)
    tmem.session("alice").flush(timeout=120)
    assert seen[0].extensions["timeout"]["read"] >= 120


def test_base_url_normalised_and_api_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TMEMClient("http://h:1/v1/").base_url == TMEMClient("http://h:1").base_url == "http://h:1"
    monkeypatch.setenv("TMEM_API_KEY", "sk-env")
    handler, seen = sequence(httpx.Response(200, json={"status": "ok"}))
    make(handler, api_key=None)[0].health()
    monkeypatch.delenv("TMEM_API_KEY")
    make(handler, api_key=None)[0].health()
    assert seen[0].headers["Authorization"] == "Bearer sk-env" and "Authorization" not in seen[1].headers


# -- adapter download -----------------------------------------------------------------------------


def adapter_archive(names: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in names.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def adapter_client(archive: bytes) -> TMEMClient:
    headers = {"X-TMEM-Adapter-Version": "4", "content-type": "application/gzip"}
    return make(sequence(httpx.Response(200, content=archive, headers=headers))[0])[0]


def test_download_adapter_to_archive_file(tmp_path: Path) -> None:
    archive = adapter_archive({"adapter_config.json": b"{}"})
    target = tmp_path / "out" / "alice.tar.gz"
    assert adapter_client(archive).session("alice").download_adapter(target) == 4
    assert target.read_bytes() == archive


def test_download_adapter_into_directory_strips_top_folder(tmp_path: Path) -> None:
    archive = adapter_archive({"alice@v4/adapter_config.json": b"{}", "alice@v4/adapter_model.safetensors": b"w"})
    assert adapter_client(archive).session("alice").download_adapter(tmp_path / "peft") == 4
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_download_adapter_refuses_path_traversal(tmp_path: Path) -> None:
    archive = adapter_archive({"../evil.txt": b"x", "adapter_config.json": b"{}"})
    with pytest.raises(APIResponseValidationError, match="unsafe"):
        adapter_client(archive).session("alice").download_adapter(tmp_path / "peft")
    assert not (tmp_path / "evil.txt").exists()


def test_session_ablation_options_travel_as_headers_not_body() -> None:
    from tmem.client._core import chat_plan

    plan = chat_plan("Where do I live?", stream=False, session_id="alice",
                     params={"temperature": 0, "context": "none", "adapter": False, "record": False})
    assert plan.headers == {"X-Session-ID": "alice", "X-TMEM-Context": "none", "X-TMEM-Adapter": "off",
                            "X-TMEM-Record": "false"}
    assert plan.json is not None and set(plan.json) == {"messages", "stream", "temperature"}
    assert chat_plan("hi", stream=False, session_id=None, params={"adapter": True}).headers == {
        "X-TMEM-Adapter": "on"}
