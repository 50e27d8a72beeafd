"""The update worker's failure handling against a real redis-server, with a fake preparer and trainer:
one failing session does not fail its group, a job that keeps failing is dead-lettered after
`max_job_attempts`, a tenant over its update budget waits at the back, jobs of deleted sessions are
dropped, and a busy session's job is deferred untried."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tmem.adapters.checkpoint import Checkpoint
from tmem.adapters.trainer import UpdateResult
from tmem.server.settings import Settings
from tmem.server.store import Job, RedisStore
from tmem.server.update_prep import PreparedUpdate, UpdateReport
from tmem.server.worker import UpdateWorker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

pytestmark = pytest.mark.asyncio(loop_scope="session")

HELLO = [{"role": "user", "content": "I moved to Lisbon."}, {"role": "assistant", "content": "Nice!"}]


class FakeRuntime:
    """Trains nothing: every update 'applies' and its checkpoint names the session's B."""

    identity, a0_blob = "fake@0", b"A0"

    def __init__(self) -> None:
        self.batched = SimpleNamespace(threads=None)  # the worker hands the batched trainer its thread policy

    def update_many(self, items: Sequence[tuple[Any, Any]]) -> list[UpdateResult]:
        return [UpdateResult(b={"w": torch.zeros(1)}, applied=True, examples=1, losses=[0.1]) for _ in items]

    def encode(self, b: Any) -> Checkpoint:
        return Checkpoint(data=b"B", sha256=hashlib.sha256(b"B").hexdigest())


class FakePreparer:
    """Snapshots for real; raises for the sessions named in `poison`; records who it prepared."""

    def __init__(self, store: RedisStore, poison: set[str]) -> None:
        self.store, self.poison, self.prepared = store, poison, []  # type: ignore[var-annotated]

    async def prepare(self, job: Job) -> PreparedUpdate:
        self.prepared.append(job.sid)
        if job.sid in self.poison:
            raise RuntimeError(f"extraction exploded on {job.sid}")
        snap = await self.store.claim_snapshot(job.tenant, job.sid)
        return PreparedUpdate(job, snap, supervision=["pair"], memories=[], summary="sum",  # type: ignore[list-item]
                              report=UpdateReport())


def make_worker(store: RedisStore, poison: set[str] = frozenset(), **settings: Any) -> UpdateWorker:  # type: ignore[assignment]
    worker = UpdateWorker(store, FakeRuntime(), None, Settings(**settings), name="w1")  # type: ignore[arg-type]
    worker.preparer = FakePreparer(store, set(poison))  # type: ignore[assignment]
    return worker


async def queue(store: RedisStore, tenant: str, *sids: str) -> None:
    for sid in sids:
        await store.ensure_session(tenant, sid)
        assert (await store.append_turns(tenant, sid, HELLO, enqueue="turn")).queued


async def pending(store: RedisStore) -> list[dict[str, Any]]:
    return list(await store.client.xpending_range(store.jobs.stream, store.jobs.group, "-", "+", 100))


async def test_one_failing_session_does_not_fail_its_group(store: RedisStore) -> None:
    await queue(store, "default", "a", "bad", "c")
    worker = make_worker(store, poison={"bad"})
    jobs = await store.jobs.read_jobs("w1", count=10)
    assert await worker.process(jobs) == 3
    for sid in ("a", "c"):
        state = await store.get_session("default", sid)
        assert state is not None and (state.adapter_version, state.absorbed_turns, state.last_error) == (1, 2, None)
    bad = await store.get_session("default", "bad")
    assert bad is not None and bad.adapter_version == 0
    assert bad.last_error is not None and "attempt 1 of 3" in bad.last_error and "exploded" in bad.last_error
    assert [p["message_id"].decode() for p in await pending(store)] == [j.stream_id for j in jobs if j.sid == "bad"]
    assert await store.jobs.queue_depth() == 1  # a's and c's jobs are acked and gone; bad's waits for its retry


async def test_a_job_that_keeps_failing_is_dead_lettered_after_its_attempts(store: RedisStore) -> None:
    await queue(store, "default", "bad")
    worker = make_worker(store, poison={"bad"}, max_job_attempts=2)
    (job,) = await store.jobs.read_jobs("w1", count=10)
    await worker.process([job])
    assert len(await pending(store)) == 1  # attempt 1 of 2: left to be reclaimed
    (again,) = await store.jobs.reclaim("w2", min_idle_ms=0)
    assert again.deliveries == 2
    await worker.process([again])
    assert await pending(store) == [] and await store.client.xlen(store.jobs.stream) == 0
    (dead,) = await store.jobs.read_dead_letters()
    assert (dead["job_id"], dead["sid"], dead["deliveries"]) == (job.job_id, "bad", "2")
    assert "exploded on bad" in dead["error"]
    state = await store.get_session("default", "bad")
    assert state is not None and state.last_error is not None and "given up after 2 attempts" in state.last_error
    assert not state.job_pending  # the next turn queues a fresh job
    assert worker.preparer.prepared == ["bad", "bad"]  # type: ignore[attr-defined]


async def test_a_job_whose_workers_kept_dying_is_dead_lettered_untried(store: RedisStore) -> None:
    await queue(store, "default", "crashy")
    await store.jobs.read_jobs("dead-1", count=1)
    for consumer in ("dead-2", "dead-3"):  # each claimed it and died before acking
        await store.jobs.reclaim(consumer, min_idle_ms=0)
    (job,) = await store.jobs.reclaim("w1", min_idle_ms=0)
    assert job.deliveries == 4
    worker = make_worker(store, max_job_attempts=3)
    assert await worker.process([job]) == 0
    assert worker.preparer.prepared == []  # type: ignore[attr-defined]
    assert [d["sid"] for d in await store.jobs.read_dead_letters()] == ["crashy"]
    assert await store.client.xlen(store.jobs.stream) == 0


async def test_a_tenant_over_its_update_budget_waits_at_the_back(store: RedisStore) -> None:
    await queue(store, "greedy", "g1", "g2", "g3")
    await queue(store, "modest", "m1")
    worker = make_worker(store, tenant_updates_per_minute=1)
    jobs = await store.jobs.read_jobs("w1", count=10)
    assert await worker.process(jobs) == 2
    assert worker.preparer.prepared == ["g1", "m1"]  # type: ignore[attr-defined]
    waiting = await store.jobs.read_jobs("w1", count=10)
    assert [(j.tenant, j.sid, j.deliveries) for j in waiting] == [("greedy", "g2", 1), ("greedy", "g3", 1)]
    assert {j.stream_id for j in waiting}.isdisjoint(j.stream_id for j in jobs)  # re-queued at the tail
    assert await worker.process(waiting) == 0  # still over budget this minute: deferred again, untried
    assert await store.client.xlen(store.jobs.stream) == 2


async def test_a_job_of_a_deleted_session_is_dropped_not_run(store: RedisStore) -> None:
    await queue(store, "default", "s")
    (job,) = await store.jobs.read_jobs("w1", count=10)
    await store.delete_session("default", "s")
    await store.ensure_session("default", "s")  # recreated under the same id before the worker got to it
    worker = make_worker(store)
    assert await worker.process([job]) == 0
    assert worker.preparer.prepared == [] and await store.client.xlen(store.jobs.stream) == 0  # type: ignore[attr-defined]
    state = await store.get_session("default", "s")
    assert state is not None and (state.adapter_version, state.last_error) == (0, None)


async def test_a_session_busy_on_another_worker_is_deferred_untried(store: RedisStore) -> None:
    await queue(store, "default", "s")
    (job,) = await store.jobs.read_jobs("w1", count=10)
    assert await store.acquire_session_lock("default", "s", "other-worker", 10_000)
    worker = make_worker(store)
    assert await worker.process([job]) == 0
    (later,) = await store.jobs.read_jobs("w1", count=10)
    assert later.stream_id != job.stream_id and (later.job_id, later.deliveries) == (job.job_id, 1)
    assert worker.preparer.prepared == []  # type: ignore[attr-defined]


async def test_jobs_in_hand_are_kept_from_looking_idle(store: RedisStore) -> None:
    await queue(store, "default", "s")
    (job,) = await store.jobs.read_jobs("w1", count=10)
    await asyncio.sleep(0.2)
    await store.jobs.touch("w1", [job])
    assert await store.jobs.reclaim("w2", min_idle_ms=150) == []  # idle time was reset: nobody takes it over
    (entry,) = await pending(store)
    assert (entry["consumer"], entry["times_delivered"]) == (b"w1", 1)  # and no delivery was counted
