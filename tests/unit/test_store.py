"""The Redis store against a real redis-server: sessions, turns, updates, jobs, locks, faults."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import Any

import pytest
from redis_fixture import RedisServer

from tmem.server.store import (
    AppendResult,
    CommitResult,
    RedisStore,
    StaleSnapshot,
    StoreLimits,
    StoreUnavailable,
    UpdateSnapshot,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

T = "default"
HELLO = [{"role": "user", "content": "I moved to Lisbon."}, {"role": "assistant", "content": "Nice!"}]
PAIR = {"instruction": "Where does Ann live?", "output": "Lisbon"}


def stamped_between(stamp: float, before: float) -> bool:
    """A stored timestamp is the time of the call that wrote it: after `before`, not after now.

    10 ms of slack: a Lua script stores a number with 14 significant digits (0.1 ms at today's epoch).
    """
    return before - 0.01 <= stamp <= time.time() + 0.01


async def append(store: RedisStore, sid: str, messages: list[dict[str, str]], **kwargs: Any) -> AppendResult:
    """Create the session when missing, then append: append_turns itself never creates one."""
    await store.ensure_session(T, sid)
    return await store.append_turns(T, sid, messages, **kwargs)


async def teach(store: RedisStore, sid: str, pairs: list[dict[str, str]]) -> int:
    await store.ensure_session(T, sid)
    return await store.add_teach_pairs(T, sid, pairs)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def session_keys(store: RedisStore, sid: str) -> list[bytes]:
    return [k async for k in store.client.scan_iter(match=store.session_pattern(T, sid), count=1000)]


async def commit(
    store: RedisStore, sid: str, snap: UpdateSnapshot, data: bytes | None = b"B", summary: str | None = "S"
) -> CommitResult:
    return await store.commit_update(
        T,
        sid,
        snap,
        checkpoint=data,
        sha256=sha(data) if data else None,
        summary=summary,
        job_id=f"job-{snap.generation}",
    )


# -- sessions and turns ------------------------------------------------------------------------------
async def test_ensure_creates_once_and_get_reads_it(store: RedisStore) -> None:
    assert await store.get_session(T, "alice") is None
    before = time.time()
    states = await asyncio.gather(*(store.ensure_session(T, "alice") for _ in range(10)))
    assert len({s.created_at for s in states}) == 1  # concurrent creators agree on one session
    state = await store.get_session(T, "alice")
    assert state is not None and state.created_at == states[0].created_at
    assert stamped_between(state.created_at, before)
    assert (state.session_id, state.tenant, state.adapter_version, state.adapter_sha256) == ("alice", T, 0, None)
    assert (state.turns, state.absorbed_turns, state.teach_pending, state.pending_updates) == (0, 0, 0, 0)
    assert state.summary == "" and not state.job_pending and state.last_error is None
    # the hash tag keeps the session on one cluster slot
    assert await store.client.exists(f"{store.prefix}:{{{T}:alice}}:meta") == 1


async def test_append_turns_counts_and_reads_back_in_order(store: RedisStore) -> None:
    before = time.time()
    first = await append(store, "s", HELLO)
    second = await append(store, "s", [{"role": "user", "content": "Olá — ünïcode"}])
    assert (first, second) == (AppendResult(2, 2, False), AppendResult(3, 1, False))
    assert await store.get_turns(T, "s") == [*HELLO, {"role": "user", "content": "Olá — ünïcode"}]
    assert await store.get_turns(T, "s", 1, 1) == [HELLO[1]]
    state = await store.get_session(T, "s")
    assert state is not None and state.turns == 3 and state.pending_updates == 3
    assert stamped_between(state.created_at, before)


async def test_append_with_same_idempotency_key_stores_once(store: RedisStore) -> None:
    first = await append(store, "s", HELLO, idempotency_key="req-1")
    again = await append(store, "s", [{"role": "user", "content": "other"}], idempotency_key="req-1")
    assert first == AppendResult(2, 2, False)
    assert again == AppendResult(2, 2, True)  # the stored result of the first call
    assert await store.get_turns(T, "s") == HELLO
    racing = await asyncio.gather(*(append(store, "s", HELLO, idempotency_key="req-2") for _ in range(8)))
    assert sum(not r.duplicate for r in racing) == 1
    assert {r.turns_total for r in racing} == {4}
    assert len(await store.get_turns(T, "s")) == 4
    # The stored reply expires: within the configured window, and not already gone.
    ttl = await store.client.ttl(f"{store.prefix}:{{{T}:s}}:idem:req-1")
    assert StoreLimits().idempotency_ttl_s - 60 <= ttl <= StoreLimits().idempotency_ttl_s


async def test_malformed_messages_and_pairs_are_refused_before_writing(store: RedisStore) -> None:
    with pytest.raises(ValueError):
        await store.append_turns(T, "s", [HELLO[0], {"role": "user"}])
    with pytest.raises(ValueError):
        await store.add_teach_pairs(T, "s", [{"instruction": "q"}])
    assert await store.get_session(T, "s") is None


async def test_teach_pairs_are_counted_as_pending(store: RedisStore) -> None:
    assert await teach(store, "s", [PAIR, PAIR]) == 2
    assert await teach(store, "s", [PAIR]) == 3
    state = await store.get_session(T, "s")
    assert state is not None and state.teach_pending == 3 and state.pending_updates == 3


# -- snapshot / commit -------------------------------------------------------------------------------
async def test_commit_with_checkpoint_bumps_version_by_exactly_one(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    await teach(store, "s", [PAIR])
    snap = await store.claim_snapshot(T, "s")
    assert (snap.version, snap.absorbed_turns, snap.turns_total, snap.teach_count) == (0, 0, 2, 1)
    assert snap.new_turns == HELLO and snap.teach_pairs == [PAIR] and snap.summary == ""

    blob = bytes(range(256)) * 4  # not UTF-8: must come back byte for byte
    before = time.time()
    assert await commit(store, "s", snap, blob, "Ann lives in Lisbon.") == CommitResult(1, True)
    ckpt = await store.get_checkpoint(T, "s", 1)
    assert ckpt is not None and ckpt.data == blob and ckpt.sha256 == sha(blob)
    assert stamped_between(ckpt.created_at, before)
    state = await store.get_session(T, "s")
    assert state is not None
    assert (state.adapter_version, state.adapter_sha256, state.absorbed_turns, state.teach_pending) == (
        1,
        sha(blob),
        2,
        0,
    )
    assert state.summary == "Ann lives in Lisbon." and state.pending_updates == 0 and state.last_job == "job-0"

    await append(store, "s", [{"role": "user", "content": "And Bob?"}])
    snap2 = await store.claim_snapshot(T, "s")
    assert (snap2.version, snap2.absorbed_turns, snap2.turns_total, snap2.summary) == (1, 2, 3, "Ann lives in Lisbon.")
    assert snap2.new_turns == [{"role": "user", "content": "And Bob?"}]
    assert await commit(store, "s", snap2, b"v2") == CommitResult(2, True)
    assert await store.list_versions(T, "s") == [1, 2]
    assert await store.get_checkpoint(T, "s", 3) is None


async def test_commit_keeps_what_arrived_after_the_snapshot(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    await teach(store, "s", [PAIR, PAIR])
    snap = await store.claim_snapshot(T, "s")
    late_pair = {"instruction": "Who is Bob?", "output": "Ann's brother"}
    await teach(store, "s", [late_pair])
    await append(store, "s", [{"role": "user", "content": "late"}])
    await commit(store, "s", snap)
    state = await store.get_session(T, "s")
    assert state is not None and (state.absorbed_turns, state.turns, state.teach_pending) == (2, 3, 1)
    nxt = await store.claim_snapshot(T, "s")
    assert nxt.teach_pairs == [late_pair] and nxt.new_turns == [{"role": "user", "content": "late"}]


async def test_commit_without_checkpoint_absorbs_but_keeps_version(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    snap = await store.claim_snapshot(T, "s")
    assert await commit(store, "s", snap, data=None, summary="just a summary") == CommitResult(0, False)
    state = await store.get_session(T, "s")
    assert state is not None and (state.adapter_version, state.absorbed_turns, state.summary) == (
        0,
        2,
        "just a summary",
    )
    assert await store.list_versions(T, "s") == []
    # summary=None leaves the summary alone
    await append(store, "s", HELLO)
    await commit(store, "s", await store.claim_snapshot(T, "s"), data=None, summary=None)
    state = await store.get_session(T, "s")
    assert state is not None and state.summary == "just a summary" and state.absorbed_turns == 4


async def test_stale_snapshot_is_refused_and_writes_nothing(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    await teach(store, "s", [PAIR])
    winner, loser = await store.claim_snapshot(T, "s"), await store.claim_snapshot(T, "s")
    await commit(store, "s", winner, b"w", "winner")
    await teach(store, "s", [PAIR])
    with pytest.raises(StaleSnapshot):
        await commit(store, "s", loser, b"l", "loser")
    state = await store.get_session(T, "s")
    assert state is not None and (state.adapter_version, state.summary, state.teach_pending) == (1, "winner", 1)
    assert await store.list_versions(T, "s") == [1] and await store.get_checkpoint(T, "s", 2) is None
    ckpt = await store.get_checkpoint(T, "s", 1)
    assert ckpt is not None and ckpt.data == b"w"


async def test_two_commits_without_checkpoint_from_one_snapshot_conflict(store: RedisStore) -> None:
    await teach(store, "s", [PAIR, PAIR])
    snap = await store.claim_snapshot(T, "s")
    await commit(store, "s", snap, data=None)
    await teach(store, "s", [PAIR])
    with pytest.raises(StaleSnapshot):  # the version did not move, but trimming twice would lose a pair
        await commit(store, "s", snap, data=None)
    state = await store.get_session(T, "s")
    assert state is not None and state.teach_pending == 1


async def test_deleted_session_gives_empty_snapshot_and_refuses_commit(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    snap = await store.claim_snapshot(T, "s")
    assert await store.delete_session(T, "s")
    empty = await store.claim_snapshot(T, "s")
    assert (empty.new_turns, empty.teach_pairs, empty.turns_total) == ([], [], 0)
    with pytest.raises(StaleSnapshot):
        await commit(store, "s", snap)
    assert await session_keys(store, "s") == []  # the refused commit did not resurrect the session


async def test_last_error_is_set_only_on_existing_sessions_and_cleared_by_a_commit(store: RedisStore) -> None:
    await store.set_last_error(T, "ghost", "boom")
    assert await store.get_session(T, "ghost") is None
    await append(store, "s", HELLO)
    await store.set_last_error(T, "s", "update rejected: nan")
    state = await store.get_session(T, "s")
    assert state is not None and state.last_error == "update rejected: nan"
    await commit(store, "s", await store.claim_snapshot(T, "s"))
    state = await store.get_session(T, "s")
    assert state is not None and state.last_error is None


# -- jobs --------------------------------------------------------------------------------------------
async def test_enqueue_coalesces_until_the_worker_starts(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    before = time.time()
    assert await store.jobs.enqueue_update(T, "s", reason="turn") is True
    assert await store.jobs.enqueue_update(T, "s", reason="turn") is False
    state = await store.get_session(T, "s")
    assert state is not None and state.job_pending
    jobs = await store.jobs.read_jobs("w1", count=10)
    assert [(j.job_id, j.tenant, j.sid, j.reason, j.force) for j in jobs] == [(f"{T}:s:2:0", T, "s", "turn", False)]
    assert stamped_between(jobs[0].enqueued_at, before)  # when it was queued
    await store.jobs.clear_pending_flag(T, "s")  # the worker starts the update
    await append(store, "s", HELLO)
    await teach(store, "s", [PAIR])
    assert await store.jobs.enqueue_update(T, "s", reason="teach") is True
    assert await store.jobs.enqueue_update(T, "s", reason="turn") is False
    assert [j.job_id for j in await store.jobs.read_jobs("w1", count=10)] == [f"{T}:s:4:1"]


async def test_concurrent_enqueues_queue_exactly_one_job(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    results = await asyncio.gather(*(store.jobs.enqueue_update(T, "s", reason="turn") for _ in range(20)))
    assert results.count(True) == 1
    assert await store.client.xlen(store.jobs.stream) == 1


async def test_job_ids_are_deterministic_and_teach_counter_never_decreases(store: RedisStore) -> None:
    await teach(store, "s", [PAIR, PAIR])
    await commit(store, "s", await store.claim_snapshot(T, "s"))  # trims the list to 0 pairs
    await teach(store, "s", [PAIR])
    await store.jobs.enqueue_update(T, "s", reason="teach")
    (job,) = await store.jobs.read_jobs("w", count=5)
    assert job.job_id == f"{T}:s:0:3"  # 3 pairs ever taught, although 1 is pending


async def test_enqueue_for_unknown_session_queues_nothing(store: RedisStore) -> None:
    assert await store.jobs.enqueue_update(T, "nobody", reason="turn") is False
    assert await store.jobs.read_jobs("w", count=5) == []
    assert await store.get_session(T, "nobody") is None


async def test_force_queues_even_when_a_job_is_pending(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    assert await store.jobs.enqueue_update(T, "s", reason="turn")
    assert await store.jobs.enqueue_update(T, "s", reason="manual", force=True)
    jobs = await store.jobs.read_jobs("w", count=5)
    assert [(j.reason, j.force) for j in jobs] == [("turn", False), ("manual", True)]


async def test_read_ack_and_queue_depth(store: RedisStore) -> None:
    for sid in ("a", "b", "c"):
        await append(store, sid, HELLO)
        await store.jobs.enqueue_update(T, sid, reason="turn")
    assert await store.jobs.queue_depth() == 3
    jobs = await store.jobs.read_jobs("w", count=2, block_ms=100)
    assert [j.sid for j in jobs] == ["a", "b"]
    assert await store.jobs.queue_depth() == 3  # 2 delivered but unacked + 1 unread
    await store.jobs.ack(jobs[0])
    assert await store.jobs.queue_depth() == 2
    assert await store.client.xlen(store.jobs.stream) == 2  # acked jobs are deleted
    (last,) = await store.jobs.read_jobs("w", count=5)
    await store.jobs.ack(jobs[1])
    await store.jobs.ack(last)
    assert await store.jobs.queue_depth() == 0
    assert await store.jobs.read_jobs("w", count=5, block_ms=50) == []


async def test_reclaim_takes_over_a_job_nobody_acked(store: RedisStore) -> None:
    await append(store, "s", HELLO)
    await store.jobs.enqueue_update(T, "s", reason="turn")
    (lost,) = await store.jobs.read_jobs("crashed", count=1)
    assert await store.jobs.reclaim("rescuer", min_idle_ms=60_000) == []  # not idle long enough yet
    await asyncio.sleep(0.1)
    (found,) = await store.jobs.reclaim("rescuer", min_idle_ms=50)
    assert (found.stream_id, found.job_id) == (lost.stream_id, lost.job_id)
    pending = await store.client.xpending_range(store.jobs.stream, store.jobs.group, "-", "+", 10)
    assert [p["consumer"] for p in pending] == [b"rescuer"]
    await store.jobs.ack(found)
    assert await store.client.xpending(store.jobs.stream, store.jobs.group) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_reclaim_skips_entries_deleted_while_pending(store: RedisStore) -> None:
    for sid in ("a", "b"):
        await append(store, sid, HELLO)
        await store.jobs.enqueue_update(T, sid, reason="turn")
    gone, kept = await store.jobs.read_jobs("crashed", count=2)
    await store.client.xdel(store.jobs.stream, gone.stream_id)
    await asyncio.sleep(0.06)
    assert [j.sid for j in await store.jobs.reclaim("rescuer", min_idle_ms=50)] == [kept.sid]
    assert await store.jobs.queue_depth() == 1


@pytest.mark.parametrize("protocol", [2, 3])
async def test_jobs_work_over_resp2_and_resp3(redis_srv: RedisServer, protocol: int) -> None:
    s = RedisStore.from_url(redis_srv.url, prefix=f"t{uuid.uuid4().hex[:10]}", protocol=protocol)
    try:
        await s.jobs.ensure_group()
        await s.jobs.ensure_group()  # idempotent
        await append(s, "s", HELLO)
        await s.jobs.enqueue_update(T, "s", reason="turn")
        (job,) = await s.jobs.read_jobs("crashed", count=1, block_ms=100)
        await asyncio.sleep(0.06)
        (again,) = await s.jobs.reclaim("rescuer", min_idle_ms=50)
        assert (again.stream_id, again.job_id, job.deliveries, again.deliveries) == (job.stream_id, f"{T}:s:2:0", 1, 2)
        assert await s.jobs.queue_depth() == 1
    finally:
        await s.aclose()


# -- locks, A0, deletion ----------------------------------------------------------------------------
async def test_session_lock_is_released_only_by_its_owner(store: RedisStore) -> None:
    assert await store.acquire_session_lock(T, "s", "w1", 10_000)
    assert not await store.acquire_session_lock(T, "s", "w2", 10_000)
    assert not await store.release_session_lock(T, "s", "w2")
    assert not await store.refresh_session_lock(T, "s", "w2", 10_000)
    assert not await store.acquire_session_lock(T, "s", "w2", 10_000)
    assert await store.refresh_session_lock(T, "s", "w1", 20_000)
    assert await store.client.pttl(f"{store.prefix}:{{{T}:s}}:lock") > 10_000
    assert await store.release_session_lock(T, "s", "w1")
    assert await store.acquire_session_lock(T, "s", "w2", 50)
    await asyncio.sleep(0.1)  # expired: a crashed holder does not block the session forever
    assert await store.acquire_session_lock(T, "s", "w3", 10_000)
    assert not await store.release_session_lock(T, "s", "w2")


async def test_a0_blobs_round_trip(store: RedisStore) -> None:
    blob = bytes(range(256)) * 100
    assert await store.get_a0("qwen3-4b@abc") is None
    await store.put_a0("qwen3-4b@abc", blob)
    assert await store.get_a0("qwen3-4b@abc") == blob


async def test_delete_removes_every_key_of_the_session_only(store: RedisStore) -> None:
    for sid in ("gone", "kept"):
        await append(store, sid, HELLO, idempotency_key="k1")
        await teach(store, sid, [PAIR])
        await commit(store, sid, await store.claim_snapshot(T, sid))
        await append(store, sid, HELLO, idempotency_key="k2")
        await commit(store, sid, await store.claim_snapshot(T, sid))
        await store.acquire_session_lock(T, sid, "w", 10_000)
    before = await session_keys(store, "gone")
    assert len(before) == 9  # meta turns keys lock idem×2 + their index, ckpt×2 (teach is empty after the commits)
    assert all(f"{{{T}:gone}}".encode() in k for k in before)
    assert await store.delete_session(T, "gone") is True
    assert await session_keys(store, "gone") == []
    assert await store.list_versions(T, "gone") == []
    assert await store.get_session(T, "gone") is None
    assert await store.delete_session(T, "gone") is False
    assert len(await session_keys(store, "kept")) == 9 and await store.list_versions(T, "kept") == [1, 2]
    # a new session of the same id starts from scratch, idempotency keys included
    assert await append(store, "gone", HELLO, idempotency_key="k1") == AppendResult(2, 2, False)


async def test_session_pattern_escapes_glob_characters(store: RedisStore) -> None:
    await store.ensure_session(T, "a*")
    await store.ensure_session(T, "ab")
    assert await session_keys(store, "a*") == [f"{store.prefix}:{{{T}:a*}}:meta".encode()]


# -- faults ------------------------------------------------------------------------------------------
async def test_store_unavailable_while_redis_is_down_and_data_survives_restart() -> None:
    with RedisServer() as server:
        s = RedisStore.from_url(server.url, prefix="faults", socket_timeout=1.0, retries=1)
        try:
            await s.jobs.ensure_group()
            await append(s, "s", HELLO)
            await commit(s, "s", await s.claim_snapshot(T, "s"), b"durable")
            await s.jobs.enqueue_update(T, "s", reason="turn", force=True)
            server.stop()
            assert await s.ping() is False
            for call in (
                s.get_session(T, "s"),
                s.append_turns(T, "s", HELLO),
                s.jobs.read_jobs("w", 1),
                s.get_checkpoint(T, "s", 1),
                s.jobs.enqueue_update(T, "s", reason="turn"),
            ):
                with pytest.raises(StoreUnavailable):
                    await call
            server.restart()
            assert await s.ping() is True
            state = await s.get_session(T, "s")
            assert state is not None and (state.turns, state.adapter_version) == (2, 1)
            ckpt = await s.get_checkpoint(T, "s", 1)
            assert ckpt is not None and ckpt.data == b"durable"
            assert [j.job_id for j in await s.jobs.read_jobs("w", 5)] == [f"{T}:s:2:0"]
        finally:
            await s.aclose()
