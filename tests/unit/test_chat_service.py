"""ChatService between its parts: a fake engine and pool (tests/fakes.py), the real lifecycle, store and redis-server.

What a user relies on: a turn is stored once its reply is whole and not before, a reply holds the
session's adapter until it ends and then lets it go, and a session is only ever its own tenant's.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import pytest
from fakes import FakeEngine, LeaseLog, services

from tmem.server.chat import ChatService, TurnContext
from tmem.server.errors import NotFound
from tmem.server.protocol import ChatCompletionRequest
from tmem.server.store import RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
A, B = "acme", "bravo"
REPLY = "w0 w1 w2 w3 w4 w5"  # what FakeEngine says, six words


def chat_service(store: RedisStore, **engine: Any) -> tuple[ChatService, FakeEngine, LeaseLog]:
    fake, pool = FakeEngine(**engine), LeaseLog()
    return services(store, fake, pool).chat, fake, pool


def ask(question: str, stream: bool = False, model: str | None = None) -> ChatCompletionRequest:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": question}], "max_tokens": 16, "stream": stream}
    if model is not None:
        body["model"] = model
    return ChatCompletionRequest.model_validate(body)


async def at_version_1(store: RedisStore, tenant: str, sid: str) -> None:
    """Commit a first adapter version for the session, as the worker would."""
    await store.ensure_session(tenant, sid)
    snapshot = await store.claim_snapshot(tenant, sid)
    weights = b"not read by the fake pool"
    await store.commit_update(tenant, sid, snapshot, checkpoint=weights, sha256=hashlib.sha256(weights).hexdigest(),
                              summary=None, job_id=f"test:{sid}:1")


@pytest.fixture
def sid() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


async def test_a_streamed_turn_is_stored_only_after_its_final_chunk(store: RedisStore, sid: str) -> None:
    chat, _, _ = chat_service(store)
    chunks, version = await chat.stream(ask("Tell me a story.", stream=True), TurnContext(tenant=A, session_id=sid))
    assert version == 0
    seen = []
    async for chunk in chunks:
        seen.append(chunk)
        assert await store.get_turns(A, sid) == [], f"stored while chunk {len(seen)} was being delivered"
    assert seen[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].delta.content or "" for c in seen) == REPLY
    assert [m["content"] for m in await store.get_turns(A, sid)] == ["Tell me a story.", REPLY]


async def test_a_stream_closed_before_its_end_stores_nothing_and_lets_the_adapter_go(store: RedisStore,
                                                                                     sid: str) -> None:
    chat, engine, pool = chat_service(store, words=50)
    await at_version_1(store, A, sid)
    ctx = TurnContext(tenant=A, session_id=sid)
    chunks, version = await chat.stream(ask("Tell me a story.", stream=True), ctx)
    assert (version, pool.leased, pool.held) == (1, [(A, sid, 1)], 1)
    for _ in range(3):  # the role chunk and two words, then the client leaves
        await anext(chunks)
    await chunks.aclose()
    assert pool.held == 0 and engine.aborted == [ctx.request_id]
    assert await store.get_turns(A, sid) == []


async def test_a_reply_holds_the_adapter_until_it_ends_then_releases_it_once(store: RedisStore, sid: str) -> None:
    chat, _, pool = chat_service(store)
    await at_version_1(store, A, sid)
    held_while_streaming = []
    chunks, _ = await chat.stream(ask("One", stream=True), TurnContext(tenant=A, session_id=sid))
    async for _chunk in chunks:
        held_while_streaming.append(pool.held)
    response, version = await chat.complete(ask("Two"), TurnContext(tenant=A, session_id=sid))
    assert set(held_while_streaming) == {1}
    assert version == 1 and response.choices[0].message.content == REPLY
    assert pool.released == pool.leased == [(A, sid, 1), (A, sid, 1)]


async def test_a_deleted_session_starts_over(store: RedisStore, sid: str) -> None:
    chat, engine, pool = chat_service(store)
    for question in ("My name is Ann.", "I live in Lisbon."):
        await chat.complete(ask(question), TurnContext(tenant=A, session_id=sid))
    await chat.sessions.delete(A, sid)
    await chat.complete(ask("Where do I live?"), TurnContext(tenant=A, session_id=sid))
    await chat.complete(ask("Where do I live?"), TurnContext(tenant=A, session_id=f"{sid}-fresh"))
    assert engine.prompts[2] == engine.prompts[3]  # nothing of the deleted turns is in the prompt
    assert len(engine.prompts[2]) < len(engine.prompts[1])
    assert [m["content"] for m in await store.get_turns(A, sid)] == ["Where do I live?", REPLY]
    assert pool.forgotten == [(A, sid)]


async def test_another_tenants_session_of_the_same_id_is_refused_its_turns(store: RedisStore, sid: str) -> None:
    chat, engine, _ = chat_service(store)
    await chat.complete(ask("My PIN is 4321."), TurnContext(tenant=A, session_id=sid))
    await chat.complete(ask("What is my PIN?"), TurnContext(tenant=B, session_id=sid))
    await chat.complete(ask("What is my PIN?"), TurnContext(tenant=B, session_id=f"{sid}-unused"))
    assert engine.prompts[1] == engine.prompts[2]  # B's prompt holds nothing of A's session
    assert [m["content"] for m in await store.get_turns(A, sid)] == ["My PIN is 4321.", REPLY]
    assert [m["content"] for m in await store.get_turns(B, sid)] == ["What is my PIN?", REPLY]


async def test_unrecorded_and_stateless_turns_store_nothing(store: RedisStore, sid: str) -> None:
    chat, engine, _ = chat_service(store)
    await chat.complete(ask("Hello"), TurnContext(tenant=A, session_id=sid, record=False))
    await chat.complete(ask("Hello"), TurnContext(tenant=A, session_id=None))
    assert len(engine.prompts) == 2
    assert await store.get_turns(A, sid) == []
    assert await store.count_sessions(A) == 1  # the unrecorded turn still opened its session; the stateless none


async def test_an_unknown_model_is_a_404_before_anything_runs(store: RedisStore, sid: str) -> None:
    chat, engine, pool = chat_service(store)
    with pytest.raises(NotFound) as missing:
        await chat.complete(ask("Hello", model="gpt-9"), TurnContext(tenant=A, session_id=sid))
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "model_not_found", "model")
    assert (engine.prompts, pool.leased, await store.count_sessions(A)) == ([], [], 0)
