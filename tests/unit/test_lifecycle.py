"""SessionLifecycle, the one home of a session's life that chat and the session API share.

Real redis-server and store; the tokenizer and the adapter pool are fakes (tests/fakes.py).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fakes import FakeTokenizer, LeaseLog

from tmem.server.errors import Forbidden, NotFound
from tmem.server.lifecycle import SessionLifecycle
from tmem.server.settings import Settings
from tmem.server.store import RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")
A, B = "acme", "bravo"
TURN = [{"role": "user", "content": "I moved to Lisbon"}, {"role": "assistant", "content": "Nice!"}]


def lifecycle(store: RedisStore, **settings: Any) -> SessionLifecycle:
    return SessionLifecycle(store, LeaseLog(), FakeTokenizer(), Settings(model="fake", **settings))  # type: ignore[arg-type]


@pytest.fixture
def sid() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


async def test_open_creates_a_session_once(store: RedisStore, sid: str) -> None:
    sessions = lifecycle(store)
    first = await sessions.open(A, sid)
    await sessions.record(A, sid, TURN, None, "", reason="turn")
    again = await sessions.open(A, sid)
    assert (first.turns, again.turns, again.created_at) == (0, 2, first.created_at)  # the same session, not a new one
    assert await store.count_sessions(A) == 1


async def test_a_tenant_at_its_cap_opens_its_sessions_but_no_new_one(store: RedisStore, sid: str) -> None:
    sessions = lifecycle(store, max_sessions_per_tenant=2)
    await sessions.open(A, f"{sid}-1")
    await sessions.open(A, f"{sid}-2")
    with pytest.raises(Forbidden) as refused:
        await sessions.open(A, f"{sid}-3")
    assert (refused.value.status, refused.value.code) == (403, "session_limit_reached")
    assert (await sessions.open(A, f"{sid}-1")).session_id == f"{sid}-1"  # an existing one still opens
    assert (await sessions.open(B, f"{sid}-3")).session_id == f"{sid}-3"  # another tenant has its own cap


async def test_another_tenants_session_is_not_found_and_untouched(store: RedisStore, sid: str) -> None:
    sessions = lifecycle(store)
    await sessions.open(A, sid)
    await sessions.record(A, sid, TURN, None, "", reason="turn")
    for attempt in (sessions.get, sessions.delete):
        with pytest.raises(NotFound) as missing:
            await attempt(B, sid)
        assert (missing.value.status, missing.value.code) == (404, "session_not_found")
    assert (await sessions.get(A, sid)).turns == 2
    assert (await sessions.open(B, sid)).turns == 0  # the same id is a new, empty session of B's


async def test_record_stores_counted_turns_and_queues_the_update_in_one_step(store: RedisStore, sid: str) -> None:
    sessions = lifecycle(store)
    await sessions.open(A, sid)
    result = await sessions.record(A, sid, TURN, None, "", reason="turn")
    assert (result.turns_total, result.appended, result.queued) == (2, 2, True)
    assert await store.get_turns(A, sid) == [{**TURN[0], "tokens": 4}, {**TURN[1], "tokens": 1}]
    assert (await sessions.get(A, sid)).job_pending  # every-turn: each stored turn queues an update


async def test_context_budget_waits_until_teach_or_queue_update_asks(store: RedisStore, sid: str) -> None:
    sessions = lifecycle(store, update_policy="context-budget", context_tokens=1000)
    await sessions.open(A, sid)
    await sessions.record(A, sid, TURN, None, "", reason="turn")
    assert not (await sessions.get(A, sid)).job_pending  # 5 tokens of 1000: kept in the prompt, not trained
    assert await sessions.queue_update(A, sid, reason="flush") is True
    assert (await sessions.get(A, sid)).job_pending
    other = f"{sid}-teach"
    await sessions.teach(A, other, [{"instruction": "Where do I live?", "output": "Lisbon."}])
    state = await sessions.get(A, other)  # teach opened the session too
    assert state.job_pending and state.teach_pending


async def test_delete_removes_the_session_and_its_adapters(store: RedisStore, sid: str) -> None:
    sessions = lifecycle(store)
    pool: LeaseLog = sessions.pool  # type: ignore[assignment]
    await sessions.open(A, sid)
    await sessions.record(A, sid, TURN, None, "", reason="turn")
    await sessions.open(B, sid)
    await sessions.delete(A, sid)
    assert pool.forgotten == [(A, sid)]
    with pytest.raises(NotFound):
        await sessions.get(A, sid)
    assert await store.get_turns(A, sid) == []
    assert (await sessions.get(B, sid)).session_id == sid  # B's session of the same id is still there
    with pytest.raises(NotFound):
        await sessions.delete(A, sid)
    assert pool.forgotten == [(A, sid)]  # a second delete is a 404 and forgets nothing more
