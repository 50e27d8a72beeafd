"""The Python SDK against the real server (engine, Redis, HTTP): every session method, streaming,
errors by status, and retries honouring Retry-After. Auth/rate-limit statuses are in test_tenants.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tmem.client import (
    AsyncTMEMClient,
    BadRequestError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    TMEMClient,
)

pytestmark = pytest.mark.engine
PAIR = ("What is my favorite season?", "Your favorite season is autumn.")


def test_every_session_method_against_the_real_server(server, sid, tmp_path: Path) -> None:
    with TMEMClient(server.url) as tmem:
        assert tmem.health().status == "ok"
        model = tmem.models().data[0].id
        session = tmem.session(sid)
        reply = session.chat("I spent the weekend in Porto.", max_tokens=8, temperature=0)
        assert reply.text and reply.adapter_version == 0 and reply.model == model
        with session.chat("And you?", stream=True, max_tokens=8, temperature=0) as stream:
            streamed = "".join(chunk.delta_text or "" for chunk in stream)
        assert streamed
        info = session.ingest([{"role": "user", "content": "My sister is called Ines."}])
        assert info.turns == 5  # 2 chat turns (4 messages) + 1 ingested message
        session.teach([PAIR])
        assert session.flush(timeout=180).adapter_version >= 1
        version = session.info().adapter_version
        taught = [m for m in session.memories() if m.source == "taught"]
        assert [(m.instruction, m.output, m.version) for m in taught] == [(*PAIR, version)]
        last_update = session.info().last_update
        assert last_update is not None and last_update["pairs_taught"] == 1  # the update that went live taught PAIR
        answer = session.chat(PAIR[0], max_tokens=16, temperature=0)
        assert answer.adapter_version == version
        assert session.download_adapter(tmp_path / "adapter") == version
        assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
        assert session.delete().deleted is True
        with pytest.raises(NotFoundError) as err:
            session.info()
        assert err.value.status_code == 404 and err.value.request_id


def test_taught_answer_through_the_sdk(server, sid) -> None:
    with TMEMClient(server.url) as tmem:
        session = tmem.session(sid)
        session.teach([PAIR])
        assert session.flush(timeout=180).adapter_version == 1
        assert session.chat(PAIR[0], max_tokens=16, temperature=0).text == PAIR[1]


async def test_async_client_chat_stream_and_errors(server, sid) -> None:
    async with AsyncTMEMClient(server.url) as tmem:
        session = tmem.session(sid)
        reply = await session.chat("Hello there", max_tokens=6, temperature=0)
        assert reply.text
        stream = await session.chat("Tell me more", stream=True, max_tokens=6, temperature=0)
        async with stream:
            pieces = [chunk.delta_text or "" async for chunk in stream]
        assert "".join(pieces)
        assert (await session.info()).turns == 4
        with pytest.raises(NotFoundError):
            await tmem.session(f"{sid}-missing").info()


@pytest.mark.parametrize(("call", "error"), [
    (lambda t, sid: t.chat("hi", max_tokens=10**6), BadRequestError),
    (lambda t, sid: t.session("bad/id").info(), NotFoundError),  # a slash is a different route: 404
    (lambda t, sid: t.session("bad id").info(), BadRequestError),
    (lambda t, sid: t.session(sid).ingest([{"role": "user", "content": "x" * 2_100_000}]), PayloadTooLargeError),
    (lambda t, sid: t.chat("hi", model="not-a-model"), NotFoundError),
])
def test_error_classes_by_status(server, sid, call, error) -> None:
    with TMEMClient(server.url, max_retries=0) as tmem, pytest.raises(error) as raised:
        call(tmem, sid)
    assert raised.value.request_id
    assert raised.value.type == ("not_found_error" if error is NotFoundError else "invalid_request_error")


def test_503_is_retried_after_the_servers_retry_after(server, sid) -> None:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)  # really wait, so the update can finish before the retry

    many = [(f"Question {i} about my plans?", f"Answer {i}.") for i in range(32)]
    with TMEMClient(server.url, max_retries=8, sleep=sleep) as tmem:
        session = tmem.session(sid)
        session.teach(many[:4])
        result = session.flush(timeout=0.05)  # 503 flush_timeout (Retry-After: 5) until the update lands
    assert result.adapter_version == 1
    assert slept and all(s == 5 for s in slept)

    with TMEMClient(server.url, max_retries=0) as tmem:
        tmem.session(sid).teach(many)
        with pytest.raises(ServiceUnavailableError) as err:
            tmem.session(sid).flush(timeout=0.01)
        assert err.value.status_code == 503
        tmem.session(sid).flush(timeout=180)
