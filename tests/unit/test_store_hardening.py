"""Issue 12 hardening of the Redis store, against a real redis-server: bounded growth (checkpoints, session
caps, queue cap), deleted sessions that stay deleted, one-step turn+job with bound idempotency keys, A0
written once and verified, and the HTTP errors each refusal becomes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from redis_fixture import RedisServer
from test_store import HELLO, PAIR, T  # the same session material as the store tests

from tmem.server.errors import to_http_error
from tmem.server.store import (
    A0Corrupt,
    AppendResult,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    QueueFull,
    RedisStore,
    SessionFull,
    SessionNotFound,
    StaleSnapshot,
    StoreLimits,
    UpdateSnapshot,
    request_fingerprint,
)
from tmem.server.store.refusals import register_store_errors

pytestmark = pytest.mark.asyncio(loop_scope="session")



@pytest.fixture
async def make_store(redis_srv: RedisServer) -> AsyncIterator:
    stores: list[RedisStore] = []

    async def make(**limits: object) -> RedisStore:
        s = RedisStore.from_url(redis_srv.url, prefix=f"t{uuid.uuid4().hex[:10]}", socket_timeout=2.0,
                                limits=StoreLimits(**limits))  # type: ignore[arg-type]
        await s.jobs.ensure_group()
        stores.append(s)
        return s

    yield make
    for s in stores:
        await s.aclose()


@pytest.fixture
async def store(make_store) -> RedisStore:
    return await make_store()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def commit(store: RedisStore, sid: str, snap: UpdateSnapshot, data: bytes | None = b"B",
                 summary: str | None = "S") -> int:
    result = await store.commit_update(T, sid, snap, checkpoint=data, sha256=sha(data) if data else None,
                                       summary=summary, job_id=f"job-{snap.generation}")
    return result.version


async def session_keys(store: RedisStore, sid: str) -> list[bytes]:
    return [k async for k in store.client.scan_iter(match=store.session_pattern(T, sid), count=1000)]


# -- item 2: Redis does not fill up from normal use ---------------------------------------------------
async def test_only_the_newest_checkpoints_are_kept(make_store) -> None:
    store = await make_store(max_checkpoints=3)
    await store.ensure_session(T, "s")
    for n in range(1, 11):
        await store.append_turns(T, "s", HELLO)
        assert await commit(store, "s", await store.claim_snapshot(T, "s"), f"v{n}".encode()) == n
    assert await store.list_versions(T, "s") == [8, 9, 10]
    assert await store.get_checkpoint(T, "s", 7) is None
    newest = await store.get_checkpoint(T, "s", 10)
    assert newest is not None and newest.data == b"v10"
    ckpt_keys = [k for k in await session_keys(store, "s") if b":ckpt:" in k]
    assert sorted(ckpt_keys) == sorted(f"{store.prefix}:{{{T}:s}}:ckpt:{n}".encode() for n in (8, 9, 10))
    # A lower setting catches up on the next commit; a commit without a checkpoint prunes nothing.
    lower = RedisStore(store.client, store.prefix, limits=StoreLimits(max_checkpoints=1))
    await store.append_turns(T, "s", HELLO)
    await commit(lower, "s", await store.claim_snapshot(T, "s"), data=None)
    assert await store.list_versions(T, "s") == [8, 9, 10]
    await store.append_turns(T, "s", HELLO)
    await commit(lower, "s", await store.claim_snapshot(T, "s"), b"v11")
    assert await store.list_versions(T, "s") == [11]


async def test_session_message_and_byte_caps_refuse_and_write_nothing(make_store) -> None:
    store = await make_store(max_session_messages=4, max_session_bytes=4096)
    await store.ensure_session(T, "s")
    await store.append_turns(T, "s", HELLO)
    await store.append_turns(T, "s", HELLO)
    with pytest.raises(SessionFull) as full:
        await store.append_turns(T, "s", [{"role": "user", "content": "one more"}], enqueue="turn")
    assert full.value.limit == "turns" and "at most 4 messages" in str(full.value)
    state = await store.get_session(T, "s")
    assert state is not None and state.turns == 4 and not state.job_pending
    assert await store.client.xlen(store.jobs.stream) == 0

    await store.ensure_session(T, "big")
    with pytest.raises(SessionFull) as too_big:
        await store.append_turns(T, "big", [{"role": "user", "content": "x" * 5000}])
    assert too_big.value.limit == "bytes"
    await store.append_turns(T, "big", [{"role": "user", "content": "x" * 2000}])
    with pytest.raises(SessionFull):  # the bytes add up across appends
        await store.append_turns(T, "big", [{"role": "user", "content": "x" * 2100}])
    assert await store.get_turns(T, "big") == [{"role": "user", "content": "x" * 2000}]


async def test_a_full_job_queue_refuses_new_jobs_and_never_trims_queued_ones(make_store) -> None:
    store = await make_store(job_stream_maxlen=2)
    for sid in ("a", "b", "c"):
        await store.ensure_session(T, sid)
    assert (await store.append_turns(T, "a", HELLO, enqueue="turn")).queued
    assert (await store.append_turns(T, "b", HELLO, enqueue="turn")).queued
    with pytest.raises(QueueFull):  # a new job is needed and there is no room: the turn is not stored either
        await store.append_turns(T, "c", HELLO, enqueue="turn")
    state_c = await store.get_session(T, "c")
    assert state_c is not None and (state_c.turns, state_c.job_pending) == (0, False)
    with pytest.raises(QueueFull):
        await store.jobs.enqueue_update(T, "c", reason="teach", force=True)
    # a session whose job is already queued needs no room: its turn is stored and coalesced
    again = await store.append_turns(T, "a", HELLO, enqueue="turn")
    assert (again.turns_total, again.queued) == (4, False)
    jobs = await store.jobs.read_jobs("w", count=10)
    assert [j.sid for j in jobs] == ["a", "b"]  # nothing queued was trimmed
    await store.jobs.ack(jobs[0])
    assert (await store.append_turns(T, "c", HELLO, enqueue="turn")).queued  # room again


# -- item 7: deleted sessions stay deleted -------------------------------------------------------------
async def test_commit_from_before_a_delete_writes_nothing_even_into_a_recreated_session(store: RedisStore) -> None:
    await store.ensure_session(T, "s")
    await store.append_turns(T, "s", HELLO)
    pending = await store.claim_snapshot(T, "s")  # a worker is extracting from the old session...
    assert pending.incarnation
    await store.delete_session(T, "s")
    with pytest.raises(StaleSnapshot):
        await commit(store, "s", pending, b"old", "summary of the deleted chat")
    assert await session_keys(store, "s") == []

    await store.ensure_session(T, "s")  # ...and the id is reused at once: version 0, generation 0 again
    with pytest.raises(StaleSnapshot):
        await commit(store, "s", pending, b"old", "summary of the deleted chat")
    state = await store.get_session(T, "s")
    assert state is not None and (state.adapter_version, state.summary, state.absorbed_turns) == (0, "", 0)
    assert await store.list_versions(T, "s") == [] and await store.get_memories(T, "s") == []


async def test_writes_after_a_delete_do_not_resurrect_the_session(store: RedisStore) -> None:
    await store.ensure_session(T, "s")
    await store.append_turns(T, "s", HELLO)
    await store.delete_session(T, "s")
    with pytest.raises(SessionNotFound):  # a chat that was generating during the DELETE
        await store.append_turns(T, "s", HELLO, idempotency_key="k", enqueue="turn")
    with pytest.raises(SessionNotFound):
        await store.add_teach_pairs(T, "s", [PAIR])
    assert await store.jobs.enqueue_update(T, "s", reason="flush", force=True) is False
    await store.set_last_error(T, "s", "boom")
    assert await session_keys(store, "s") == []
    assert await store.client.xlen(store.jobs.stream) == 0
    assert await store.count_sessions(T) == 0


async def test_jobs_carry_the_incarnation_of_their_session(store: RedisStore) -> None:
    await store.ensure_session(T, "s")
    await store.append_turns(T, "s", HELLO, enqueue="turn")
    (job,) = await store.jobs.read_jobs("w", count=5)
    old = await store.session_incarnation(T, "s")
    assert job.incarnation == old and len(old or "") == 32
    await store.delete_session(T, "s")
    assert await store.session_incarnation(T, "s") is None
    await store.ensure_session(T, "s")
    new = await store.session_incarnation(T, "s")
    assert new and new != old


# -- item 11: one step, bound idempotency keys ---------------------------------------------------------
async def test_storing_a_turn_queues_its_job_in_the_same_step(store: RedisStore) -> None:
    await store.ensure_session(T, "s")
    first = await store.append_turns(T, "s", HELLO, idempotency_key="k1", request_sha256="aa", enqueue="turn")
    assert first == AppendResult(2, 2, duplicate=False, queued=True)
    (job,) = await store.jobs.read_jobs("w", count=5)
    assert (job.job_id, job.reason, job.force) == (f"{T}:s:2:0", "turn", False)
    coalesced = await store.append_turns(T, "s", HELLO, enqueue="turn")
    assert (coalesced.turns_total, coalesced.queued) == (4, False)
    retry = await store.append_turns(T, "s", HELLO, idempotency_key="k1", request_sha256="aa", enqueue="turn")
    assert retry == AppendResult(2, 2, duplicate=True, queued=False)  # stored and queued once
    assert await store.client.xlen(store.jobs.stream) == 1
    no_job = await store.append_turns(T, "s", HELLO)  # context-budget: the caller decides when to queue
    assert no_job.queued is False


async def test_an_idempotency_key_is_bound_to_its_request_body(store: RedisStore) -> None:
    await store.ensure_session(T, "s")
    body = {"messages": HELLO}
    await store.append_turns(T, "s", HELLO, idempotency_key="k", request_sha256=request_fingerprint(body))
    with pytest.raises(IdempotencyKeyReused):
        other = [{"role": "user", "content": "something else"}]
        await store.append_turns(T, "s", other, idempotency_key="k", request_sha256=request_fingerprint(other))
    same = await store.append_turns(T, "s", HELLO, idempotency_key="k",
                                    request_sha256=request_fingerprint(json.loads(json.dumps(body))))
    assert same.duplicate and await store.get_turns(T, "s") == HELLO
    for bad in ("", "k" * 256):
        with pytest.raises(InvalidIdempotencyKey):
            await store.append_turns(T, "s", HELLO, idempotency_key=bad)
    assert len(await store.get_turns(T, "s")) == 2


async def test_idempotency_keys_are_bounded_in_number_and_time(make_store) -> None:
    store = await make_store(max_idempotency_keys=3, idempotency_ttl_s=1)
    await store.ensure_session(T, "s")
    for n in range(5):
        await store.append_turns(T, "s", HELLO, idempotency_key=f"k{n}")
    idem = f"{store.prefix}:{{{T}:s}}:idem:"
    tracked = sorted(m for m in map(bytes.decode, await store.client.smembers(f"{store.prefix}:{{{T}:s}}:keys")))
    assert tracked == [f"{idem}k2", f"{idem}k3", f"{idem}k4"]
    assert await store.client.exists(f"{idem}k0") == 0
    await asyncio.sleep(1.1)  # past the TTL: the next append forgets the expired ones' index entries too
    await store.append_turns(T, "s", HELLO, idempotency_key="k5")
    assert await store.client.zrange(f"{store.prefix}:{{{T}:s}}:idem", 0, -1) == [f"{idem}k5".encode()]
    assert [m.decode() for m in await store.client.smembers(f"{store.prefix}:{{{T}:s}}:keys")] == [f"{idem}k5"]


# -- item 12: A0 written once, verified ----------------------------------------------------------------
async def test_the_first_a0_wins_and_later_writers_get_it_back(store: RedisStore) -> None:
    first, second = bytes(range(256)) * 10, bytes(reversed(range(256))) * 10
    assert await store.get_a0("m@1") is None
    results = await asyncio.gather(store.put_a0("m@1", first), store.put_a0("m@1", second))
    assert results[0] == results[1] == await store.get_a0("m@1")  # the racers agree on one A0
    assert await store.put_a0("m@1", second if results[0] == first else first) == results[0]
    stored = await store.client.hgetall(f"{store.prefix}:a0v2:m@1")
    assert stored[b"sha256"].decode() == sha(results[0])


async def test_a_corrupted_a0_is_refused(store: RedisStore) -> None:
    await store.put_a0("m@1", b"A0 bytes")
    await store.client.hset(f"{store.prefix}:a0v2:m@1", "data", b"A0 bytez")
    with pytest.raises(A0Corrupt, match="does not match its sha256"):
        await store.get_a0("m@1")
    with pytest.raises(A0Corrupt):
        await store.put_a0("m@1", b"A0 bytes")


# -- the HTTP errors the refusals become ---------------------------------------------------------------
@pytest.mark.parametrize(("exc", "status", "code"), [
    (SessionFull("full", limit="bytes"), 413, "session_full"),
    (SessionNotFound("gone"), 404, "session_not_found"),
    (QueueFull("full"), 503, "update_queue_full"),
    (IdempotencyKeyReused("reused"), 422, "idempotency_key_reused"),
    (InvalidIdempotencyKey("long"), 400, "invalid_idempotency_key"),
    (A0Corrupt("bad"), 503, "a0_corrupt"),
])
async def test_store_refusals_become_openai_shaped_errors(exc: Exception, status: int, code: str) -> None:
    register_store_errors()
    err = to_http_error(exc)
    body = json.loads(err.to_response().body)
    assert (err.status, body["error"]["code"], body["error"]["message"]) == (status, code, str(exc))
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status == 503:
        assert int(err.to_response().headers["Retry-After"]) >= 1
