"""The update worker's retries, end to end against a real redis-server with a fake preparer and trainer.

test_worker_isolation drives `process()` one batch at a time; here the running worker (`run()`) reclaims
its own failed jobs: a failure that clears is retried and committed, a poison job is retried up to
`max_job_attempts` and dead-lettered while other sessions keep updating, and an update the trainer
rejects is recorded once, never retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from test_worker_isolation import HELLO, FakePreparer, FakeRuntime, make_worker, queue

from tmem.adapters.trainer import UpdateResult
from tmem.server.settings import Settings
from tmem.server.store import Job, RedisStore
from tmem.server.update_prep import PreparedUpdate
from tmem.server.worker import UpdateWorker

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = "default"
# Above the worker's 500 ms wait for new jobs: a job it reclaimed waits that long, untouched, before its
# pass starts, and a shorter idle limit would let the next loop reclaim (and charge) it a second time.
RECLAIM_MS = 1000


class FlakyPreparer(FakePreparer):
    """Fails the first `failures[sid]` attempts of a session, then prepares it for real; records each
    attempt's delivery count."""

    def __init__(self, store: RedisStore, failures: dict[str, int]) -> None:
        super().__init__(store, set())
        self.failures = dict(failures)
        self.deliveries: dict[str, set[int]] = {}

    async def prepare(self, job: Job) -> PreparedUpdate:
        self.deliveries.setdefault(job.sid, set()).add(job.deliveries)
        if self.failures.get(job.sid, 0) > 0:
            self.failures[job.sid] -= 1
            self.prepared.append(job.sid)  # as FakePreparer records the attempts it fails
            raise RuntimeError(f"extraction timed out on {job.sid}")
        return await super().prepare(job)


class RejectingRuntime(FakeRuntime):
    """Rejects the update of every B it was handed for a session in `rejected`, as a NaN loss would."""

    def __init__(self, rejected: set[str]) -> None:
        super().__init__()
        self.rejected = rejected
        self.passes: list[int] = []  # sessions per training pass

    def update_many(self, items: Sequence[tuple[Any, Any]]) -> list[UpdateResult]:
        self.passes.append(len(items))
        results = super().update_many(items)
        return [UpdateResult(b=b, applied=False, reason="loss is nan") if sup == ["pair-rejected"] else r
                for (b, sup), r in zip(items, results, strict=True)]


class MarkingPreparer(FakePreparer):
    """Labels the supervision of the sessions the runtime is to reject, so the runtime can tell them apart."""

    def __init__(self, store: RedisStore, rejected: set[str], empty: set[str]) -> None:
        super().__init__(store, set())
        self.rejected, self.empty = rejected, empty

    async def prepare(self, job: Job) -> PreparedUpdate:
        prepared = await super().prepare(job)
        if job.sid in self.rejected:
            prepared.supervision = ["pair-rejected"]  # type: ignore[list-item]
        if job.sid in self.empty:
            prepared.supervision = []
        return prepared


async def wait_for(condition: Callable[[], Any], timeout: float = 15.0) -> None:
    """Until the async `condition()` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(worker: UpdateWorker) -> AsyncIterator[UpdateWorker]:
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 10)
    assert task.exception() is None


async def versions(store: RedisStore, *sids: str) -> dict[str, int]:
    states = {sid: await store.get_session(T, sid) for sid in sids}
    return {sid: state.adapter_version if state else -1 for sid, state in states.items()}


async def test_a_failure_that_clears_is_retried_and_committed(store: RedisStore) -> None:
    await queue(store, T, "flaky")
    worker = make_worker(store, max_job_attempts=3, job_reclaim_idle_ms=RECLAIM_MS)
    preparer = worker.preparer = FlakyPreparer(store, {"flaky": 1})  # type: ignore[assignment]
    async with running(worker):
        await wait_for(lambda: _done(store))
    state = await store.get_session(T, "flaky")
    assert state is not None
    assert (state.adapter_version, state.absorbed_turns, state.last_error) == (1, 2, None)  # the retry cleared it
    assert preparer.prepared == ["flaky", "flaky"]  # failed once, succeeded on the second delivery
    assert await store.jobs.read_dead_letters() == []


async def _done(store: RedisStore) -> bool:
    return await store.jobs.queue_depth() == 0


async def test_a_poison_job_is_dead_lettered_after_its_attempts_while_other_sessions_update(store: RedisStore) -> None:
    await queue(store, T, "bad", "good-1")
    worker = make_worker(store, max_job_attempts=3, job_reclaim_idle_ms=RECLAIM_MS)
    preparer = worker.preparer = FlakyPreparer(store, {"bad": 1_000})  # type: ignore[assignment]
    async with running(worker):
        await wait_for(lambda: _versions_are(store, {"good-1": 1}))
        await queue(store, T, "good-2")  # queued while bad's job is still being retried
        await wait_for(lambda: _done(store))
        assert await versions(store, "bad", "good-1", "good-2") == {"bad": 0, "good-1": 1, "good-2": 1}
        (dead,) = await store.jobs.read_dead_letters()
        assert (dead["sid"], dead["deliveries"]) == ("bad", "3")
        assert preparer.deliveries["bad"] == {1, 2, 3}  # tried on each of its max_job_attempts deliveries
        bad = await store.get_session(T, "bad")
        assert bad is not None and bad.last_error is not None
        assert bad.last_error.startswith("update given up after 3 attempts") and not bad.job_pending
        # Once the cause is gone, the session's next turn queues a fresh job and it updates.
        preparer.failures.clear()
        assert (await store.append_turns(T, "bad", HELLO, enqueue="turn")).queued
        await wait_for(lambda: _versions_are(store, {"bad": 1}))
    bad = await store.get_session(T, "bad")
    assert bad is not None and (bad.absorbed_turns, bad.last_error) == (4, None)


async def _versions_are(store: RedisStore, expected: dict[str, int]) -> bool:
    return await versions(store, *expected) == expected


@pytest.mark.parametrize(("sid", "error"), [("nan", "update rejected: loss is nan"),
                                            ("empty", "nothing to learn: the new text gave no supervision")])
async def test_an_update_with_nothing_to_commit_is_recorded_once_and_not_retried(store: RedisStore, sid: str,
                                                                                 error: str) -> None:
    await queue(store, T, sid, "fine")
    runtime = RejectingRuntime({"nan"})
    worker = UpdateWorker(store, runtime, None, Settings(max_job_attempts=3), name="w1")  # type: ignore[arg-type]
    worker.preparer = MarkingPreparer(store, rejected={"nan"}, empty={"empty"})  # type: ignore[assignment]
    jobs = await store.jobs.read_jobs("w1", count=10)
    assert await worker.process(jobs) == 2
    assert runtime.passes == [1 if sid == "empty" else 2]  # one batched pass; a session with no pairs is not in it
    state = await store.get_session(T, sid)
    assert state is not None
    # The turns are absorbed (training on them again would fail again), the version stays, the reason is shown.
    assert (state.adapter_version, state.absorbed_turns, state.last_error) == (0, 2, error)
    assert await versions(store, "fine") == {"fine": 1}
    assert await store.jobs.queue_depth() == 0 and await store.jobs.read_dead_letters() == []  # acked: no retry
