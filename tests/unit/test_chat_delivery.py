"""A turn is stored only when its reply was delivered whole to a client still connected (issue 12 item 15).

The real FastAPI app, router, ChatService and a real redis-server; the engine is a fake that streams a
few words. Requests are driven at the ASGI level, as uvicorn would: `receive` hands over the body, then
reports `http.disconnect` once the test's client leaves, and whatever is sent after that is dropped.
That lets a test leave at an exact event, such as the moment the final event is written, which a
socket client can only hit by chance.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from fakes import FakeEngine, services

from tmem.server.app import create_app
from tmem.server.chat import ChatService, TurnContext
from tmem.server.metrics import METRICS
from tmem.server.store import RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = "default"  # the tenant of a server without keys
QUESTION = [{"role": "user", "content": "Tell me a story."}]


@pytest.fixture
def sid() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def serve(store: RedisStore, engine: FakeEngine) -> tuple[Any, ChatService]:
    installed = services(store, engine)
    app = create_app(installed.settings)  # the lifespan (vLLM, Redis) never runs: the services are set here
    app.state.services = installed
    return app, installed.chat


@dataclass
class Exchange:
    status: int | None = None
    events: list[str] = field(default_factory=list)  # what the client received before it left


async def post(app: Any, sid: str, stream: bool, leave: Callable[[list[str]], bool] = lambda events: False,
               seen_late: bool = False) -> Exchange:
    """POST a chat completion; the client leaves once `leave(events received so far)` is true.

    seen_late: the server learns of it 2 ms later, as when the reset answering the last write comes back
    over the network a round trip after it; otherwise at once.
    """
    payload = json.dumps({"messages": QUESTION, "stream": stream, "max_tokens": 16}).encode()
    seen, gone, sent_body, dead = Exchange(), asyncio.Event(), False, False
    loop = asyncio.get_running_loop()

    def hang_up() -> None:
        nonlocal dead
        dead = True
        if seen_late:
            loop.call_later(0.002, gone.set)
        else:
            gone.set()

    if leave([]):
        hang_up()

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if dead:
            return  # the socket is closed: what is sent after the disconnect is lost
        if message["type"] == "http.response.start":
            seen.status = message["status"]
        elif message["type"] == "http.response.body":
            seen.events += [e for e in message.get("body", b"").decode().split("\n\n") if e.strip()]
            if leave(seen.events):
                hang_up()

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"x-session-id", sid.encode()), (b"host", b"127.0.0.1")]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000)}
    await app(scope, receive, send)
    await asyncio.sleep(0.3)  # a store still running after the request ended has landed by now
    return seen


async def stored(store: RedisStore, sid: str) -> list[dict[str, Any]]:
    return await store.get_turns(T, sid)


async def test_a_stream_that_completes_stores_the_turn_with_counts_and_queues_its_update(store, sid) -> None:
    app, _ = serve(store, FakeEngine())
    seen = await post(app, sid, stream=True)
    assert seen.status == 200 and seen.events[-1] == "data: [DONE]"
    assert await stored(store, sid) == [{**QUESTION[0], "tokens": 4},
                                        {"role": "assistant", "content": "w0 w1 w2 w3 w4 w5", "tokens": 6}]
    state = await store.get_session(T, sid)
    assert state is not None and state.job_pending  # stored and queued in one step


async def test_a_client_that_leaves_after_the_first_chunk_has_no_turn_stored(store, sid) -> None:
    engine = FakeEngine(words=200, delay_s=0.005)  # a second of reply: the disconnect comes long before its end
    app, _ = serve(store, engine)
    seen = await post(app, sid, stream=True, leave=lambda events: len(events) >= 1)
    assert len(seen.events) == 1 and '"role":"assistant"' in seen.events[0]
    assert await stored(store, sid) == []
    assert len(engine.aborted) == 1  # the engine was told to stop generating


async def test_a_stream_cut_short_by_its_client_is_charged_what_it_generated(store, sid) -> None:
    app, _ = serve(store, FakeEngine(words=200, delay_s=0.005))
    charged = METRICS.completion_tokens._value.get()
    await post(app, sid, stream=True, leave=lambda events: len(events) >= 4)  # role + 3 words, then gone
    # Counted (and so charged to the key's token budget by the rate limiter), not free; nor the whole reply.
    assert 3 <= METRICS.completion_tokens._value.get() - charged < 200


async def test_a_client_that_leaves_as_the_final_event_is_written_has_no_turn_stored(store, sid) -> None:
    """The race of the open bug: the final output is written into a connection that has just gone.

    Before, the turn was stored right after the final event was handed to the server, with no look at
    the connection; the disconnect was noticed only while the store was already running.
    """
    app, _ = serve(store, FakeEngine())
    seen = await post(app, sid, stream=True, leave=lambda events: any('"finish_reason":"stop"' in e for e in events))
    assert '"finish_reason":"stop"' in seen.events[-1]
    assert await stored(store, sid) == []


async def test_a_reset_arriving_a_round_trip_after_the_final_write_stores_nothing(store, sid) -> None:
    """is_disconnected() alone looks for two loop turns only; a reset that answers the final write comes a
    network round trip later. The check lets the loop run a few milliseconds first, so this client is seen."""
    app, _ = serve(store, FakeEngine())
    seen = await post(app, sid, stream=True, seen_late=True,
                      leave=lambda events: any('"finish_reason":"stop"' in e for e in events))
    assert '"finish_reason":"stop"' in seen.events[-1]
    assert await stored(store, sid) == []


@pytest.mark.parametrize("reason", ["abort", "error"])
async def test_a_reply_the_engine_cut_off_is_an_error_event_and_not_stored(store, sid, reason: str) -> None:
    app, _ = serve(store, FakeEngine(finish=reason))
    seen = await post(app, sid, stream=True)
    error = json.loads(seen.events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "generation_incomplete" and seen.events[-1] == "data: [DONE]"
    assert not any('"finish_reason":"' in e for e in seen.events)  # never reported as a finished reply
    assert await stored(store, sid) == []


async def test_a_non_streaming_reply_cut_off_is_a_503_and_not_stored(store, sid) -> None:
    app, _ = serve(store, FakeEngine(finish="abort"))
    seen = await post(app, sid, stream=False)
    assert seen.status == 503
    assert json.loads(seen.events[0])["error"]["code"] == "generation_incomplete"
    assert await stored(store, sid) == []


async def test_a_non_streaming_client_gone_before_its_reply_has_no_turn_stored(store, sid) -> None:
    app, _ = serve(store, FakeEngine())
    assert (await post(app, sid, stream=False)).status == 200
    assert len(await stored(store, sid)) == 2
    other = f"{sid}-gone"
    await post(app, other, stream=False, leave=lambda events: True)  # sent the request, then hung up
    assert await stored(store, other) == []


async def test_storing_and_queuing_a_turn_finish_together_when_the_request_is_cancelled_midway(store, sid) -> None:
    """A cancellation (the client leaving) in the middle of storing must not leave half of it."""
    _, chat = serve(store, FakeEngine())
    await store.ensure_session(T, sid)
    entered, release = asyncio.Event(), asyncio.Event()
    real_append = store.append_turns

    async def slow_append(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await real_append(*args, **kwargs)

    store.append_turns = slow_append  # type: ignore[method-assign]
    ctx = TurnContext(tenant=T, session_id=sid)
    task = asyncio.ensure_future(chat.finish_turn(ctx, [{**QUESTION[0], "tokens": 4}], "Once upon a time."))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.sleep(0.3)
    assert [m["content"] for m in await stored(store, sid)] == ["Tell me a story.", "Once upon a time."]
    state = await store.get_session(T, sid)
    assert state is not None and state.job_pending
