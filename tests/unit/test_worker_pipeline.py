"""The update worker's pipeline against a real redis-server, with a fake preparer and trainer: the next
group's extraction runs while the previous group trains, training passes never overlap, and the
trainer's threads follow the engine's load."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from test_worker_isolation import FakePreparer, FakeRuntime, queue

from tmem.adapters.trainer import UpdateResult
from tmem.server.settings import Settings
from tmem.server.store import Job, RedisStore
from tmem.server.update_prep import PreparedUpdate
from tmem.server.worker import UpdateWorker

pytestmark = pytest.mark.asyncio(loop_scope="session")


class GatedRuntime(FakeRuntime):
    """Training blocks until released; records how many passes ran at once."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.training = threading.Event()
        self.running = self.most = 0
        self.lock = threading.Lock()

    def update_many(self, items: Sequence[tuple[Any, Any]]) -> list[UpdateResult]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        self.training.set()
        self.release.wait(10)
        with self.lock:
            self.running -= 1
        return super().update_many(items)


class TimedPreparer(FakePreparer):
    """Notes whether the first group was still training when each session's extraction began."""

    def __init__(self, store: RedisStore, runtime: GatedRuntime) -> None:
        super().__init__(store, set())
        self.runtime = runtime
        self.during_training: dict[str, bool] = {}

    async def prepare(self, job: Job) -> PreparedUpdate:
        self.during_training[job.sid] = self.runtime.running > 0
        return await super().prepare(job)


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def drained(store: RedisStore, timeout: float = 10.0) -> None:
    """Until every queued job is done: acked and deleted from the stream."""
    deadline = asyncio.get_running_loop().time() + timeout
    while await store.jobs.queue_depth() > 0:
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(store: RedisStore, pipeline: int) -> AsyncIterator[tuple[UpdateWorker, GatedRuntime, TimedPreparer]]:
    """A worker running on the stream with a gated trainer; 'first' is queued and training when it yields."""
    runtime = GatedRuntime()
    worker = UpdateWorker(store, runtime, None, Settings(worker_pipeline=pipeline), name="w1")  # type: ignore[arg-type]
    preparer = worker.preparer = TimedPreparer(store, runtime)  # type: ignore[assignment]
    await queue(store, "default", "first")
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(runtime.training.is_set)
        yield worker, runtime, preparer
    finally:
        runtime.release.set()
        worker.stop()
        await asyncio.wait_for(task, 10)


async def test_the_next_group_extracts_while_the_previous_one_trains(store: RedisStore) -> None:
    async with running(store, pipeline=2) as (_, runtime, preparer):
        await queue(store, "default", "second")
        await wait_for(lambda: "second" in preparer.during_training)
        assert preparer.during_training == {"first": False, "second": True}
        await asyncio.sleep(0.3)  # the second group now waits for the trainer
        runtime.release.set()
        await drained(store)
        waits = {}
        for sid in ("first", "second"):
            state = await store.get_session("default", sid)
            assert state is not None and state.adapter_version == 1 and state.last_update is not None
            waits[sid] = state.last_update["timings"]["train_wait"]
        assert runtime.most == 1  # the second group's training waited for the first pass to end
        assert waits["first"] < 0.1 < 0.25 < waits["second"]  # and its report says how long


async def test_one_group_at_a_time_without_a_pipeline(store: RedisStore) -> None:
    async with running(store, pipeline=1) as (_, runtime, preparer):
        await queue(store, "default", "second")
        await asyncio.sleep(1.0)
        assert "second" not in preparer.during_training  # claimed only after the first group is done
        runtime.release.set()
        await drained(store)
        assert preparer.during_training["second"] is False


class Generator:
    def __init__(self, serving: int | None) -> None:
        self.serving = serving

    def serving_requests(self) -> int | None:
        return self.serving


@pytest.mark.parametrize(("serving", "expected"), [(0, 2), (3, 1), (None, 1)])
async def test_training_threads_follow_the_engine_load(store: RedisStore, serving: int | None, expected: int) -> None:
    settings = Settings(worker_threads=1, worker_idle_threads=2)
    worker = UpdateWorker(store, FakeRuntime(), Generator(serving), settings)  # type: ignore[arg-type]
    assert worker.runtime.batched.threads == worker.train_threads  # the trainer asks before every step
    assert worker.train_threads() == expected
