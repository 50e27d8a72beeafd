"""The update worker: claims pending sessions, extracts QA pairs, trains their B together, checkpoints.

Several pending sessions are updated as one group: their extraction prompts go to the engine at
once (vLLM batches them) and their B tensors are trained in one batched pass (`update_many`), each
session's gradient exactly what it would be alone. A job is acknowledged only after its checkpoint
is stored; the snapshot/commit pair in the store makes a reclaimed job find nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Sequence

from tmem.server.generation import SessionGenerator
from tmem.server.metrics import METRICS
from tmem.server.settings import Settings
from tmem.server.store import A0Corrupt, Job, RedisStore, StaleSnapshot, StoreUnavailable
from tmem.server.trainer_runtime import TrainerRuntime
from tmem.server.update_prep import PreparedUpdate, UpdatePreparer

log = logging.getLogger(__name__)
SessionKey = tuple[str, str]


class UpdateWorker:
    """Consumes the update stream until stopped, up to `update_group_size` sessions per pass."""

    def __init__(self, store: RedisStore, runtime: TrainerRuntime, generator: SessionGenerator,
                 settings: Settings, name: str | None = None) -> None:
        self.store, self.runtime, self.settings = store, runtime, settings
        self.preparer = UpdatePreparer(store, runtime, generator, settings)
        self.generator = generator
        runtime.batched.threads = self.train_threads
        self.name = name or f"worker-{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()
        self._training = asyncio.Lock()  # one training pass at a time; extraction of the next group overlaps it

    def stop(self) -> None:
        self._stop.set()

    def train_threads(self) -> int:
        """All cores while the engine beside us generates nothing; `worker_threads` while it serves.

        Asked before every training step, so a chat that arrives mid-update gets its cores back within
        one step. A worker whose engine runs elsewhere cannot see its load and keeps `worker_threads`.
        """
        serving = self.generator.serving_requests()
        if serving is None or serving > 0:
            return self.settings.worker_threads
        return self.settings.worker_idle_threads or os.cpu_count() or 1

    async def run(self) -> None:
        """Main loop: reclaim stuck jobs, read new ones, process them as a group; ride out Redis outages.

        Up to `worker_pipeline` groups are in flight: while one group trains (in a thread, one pass at a
        time), the next one is claimed and its extraction runs on the engine, so a turn that arrives
        during training no longer waits for the whole pass before its own update starts.
        """
        await self._publish_a0()
        await self.store.jobs.ensure_group()
        slots = asyncio.Semaphore(self.settings.worker_pipeline)
        passes: set[asyncio.Task[None]] = set()
        try:
            while not self._stop.is_set():
                await slots.acquire()
                jobs = await self._next_jobs()
                if not jobs:
                    slots.release()
                    continue
                task = asyncio.create_task(self._pass(jobs, slots))
                passes.add(task)
                task.add_done_callback(passes.discard)
        finally:
            await asyncio.gather(*passes, return_exceptions=True)

    async def _next_jobs(self) -> list[Job]:
        group = self.settings.update_group_size
        try:
            jobs = await self.store.jobs.reclaim(self.name, self.settings.job_reclaim_idle_ms, count=group)
            # Reclaimed jobs in hand: take only what is already queued, without waiting, so their idle
            # time cannot pass job_reclaim_idle_ms before they are touched (and be reclaimed again).
            wait_ms = 0 if jobs else 500
            jobs += await self.store.jobs.read_jobs(self.name, count=max(1, group - len(jobs)), block_ms=wait_ms)
            METRICS.queue_depth.set(await self.store.jobs.queue_depth())
            return jobs
        except StoreUnavailable as exc:
            log.warning("worker %s: Redis unavailable (%s); retrying", self.name, exc)
            await asyncio.sleep(1.0)
            return []

    async def _pass(self, jobs: list[Job], slots: asyncio.Semaphore) -> None:
        """One group, start to finish; its slot is free again only after any back-off."""
        try:
            if not await self.process(jobs):
                await asyncio.sleep(0.5)  # every job was deferred (its session is mid-update): do not spin
        except StoreUnavailable as exc:
            log.warning("worker %s: Redis unavailable (%s); retrying", self.name, exc)
            await asyncio.sleep(1.0)
        except Exception:  # a bug in one pass must not kill the worker; its jobs stay pending
            log.exception("worker %s: unexpected error", self.name)
            await asyncio.sleep(1.0)
        finally:
            slots.release()

    async def _publish_a0(self) -> None:
        """Publish A0 unless a worker did first; then train against the stored one, which replicas serve."""
        try:
            stored = await self.store.put_a0(self.runtime.identity, self.runtime.a0_blob)
            if stored != self.runtime.a0_blob:
                self.runtime.adopt_a0(stored)
        except A0Corrupt:
            log.exception("worker %s: refusing to start", self.name)
            raise

    async def process(self, jobs: Sequence[Job]) -> int:
        """Update every session the jobs name (one update per session, each failing alone), then ack its jobs.

        Returns how many sessions it updated or failed: 0 when every job was deferred.
        """
        by_session: dict[SessionKey, list[Job]] = {}
        for job in jobs:
            by_session.setdefault((job.tenant, job.sid), []).append(job)
        ttl = self.settings.job_lock_ttl_ms
        held: list[SessionKey] = []
        for key in by_session:
            if await self.store.acquire_session_lock(*key, self.name, ttl):
                held.append(key)
            else:  # busy on another worker: back of the queue, untried (reclaiming it would count an attempt)
                await self._defer(by_session[key])
        if not held:
            return 0
        heartbeat = asyncio.create_task(self._keep_locks(held, ttl))
        claims = asyncio.create_task(self._keep_claims([j for key in held for j in by_session[key]]))
        try:
            todo = [key for key in held if await self._admit(key, by_session)]
            for key in todo:
                await self.store.jobs.clear_pending_flag(*key)
            failures = await self._update_isolated([by_session[key][0] for key in todo])
            for key in todo:
                if key in failures:
                    await self._failed(by_session[key], failures[key])
                    continue
                for job in by_session[key]:
                    await self.store.jobs.ack(job)
            return len(todo)
        finally:
            heartbeat.cancel()
            claims.cancel()
            for key in held:
                await self.store.release_session_lock(*key, self.name)

    async def _admit(self, key: SessionKey, by_session: dict[SessionKey, list[Job]]) -> bool:
        """Under the session's lock: drop jobs of a deleted session, give up on exhausted ones, charge the
        tenant's budget (deferring when spent). True when the session is to be updated now."""
        incarnation = await self.store.session_incarnation(*key)
        live: list[Job] = []
        for job in by_session[key]:
            if incarnation is None or (job.incarnation and job.incarnation != incarnation):
                await self.store.jobs.ack(job)  # its session was deleted (perhaps recreated): nothing of it is left
            elif job.deliveries > self.settings.max_job_attempts:
                await self._give_up(job, f"the worker stopped while updating it {job.deliveries - 1} times")
            else:
                live.append(job)
        by_session[key] = live
        if not live:
            return False
        if not await self.store.jobs.take_update_budget(key[0], self.settings.tenant_updates_per_minute):
            METRICS.updates.labels("deferred").inc()
            await self._defer(live)
            return False
        return True

    async def _update_isolated(self, jobs: list[Job]) -> dict[SessionKey, str]:
        """Update the sessions as one group; if the group fails, each one alone. Returns the failures' errors."""
        try:
            await self._update(jobs)
            return {}
        except StoreUnavailable:
            raise  # an outage, not the session's fault: the jobs stay pending and are retried
        except Exception as exc:
            if len(jobs) == 1:
                log.exception("update of %s/%s failed", jobs[0].tenant, jobs[0].sid)
                return {(jobs[0].tenant, jobs[0].sid): f"{type(exc).__name__}: {exc}"[:500]}
            log.warning("a group update of %d sessions failed (%s); retrying them one by one", len(jobs), exc)
        failures: dict[SessionKey, str] = {}
        for job in jobs:
            failures.update(await self._update_isolated([job]))
        return failures

    async def _failed(self, jobs: list[Job], error: str) -> None:
        """Record a session's failed update; dead-letter its jobs once they used up their attempts."""
        METRICS.updates.labels("failed").inc()
        attempts, cap = max(j.deliveries for j in jobs), self.settings.max_job_attempts
        if attempts < cap:  # left pending: reclaimed (and retried) after job_reclaim_idle_ms
            await self.store.set_last_error(jobs[0].tenant, jobs[0].sid,
                                            f"update failed (attempt {attempts} of {cap}), will retry: {error}")
            return
        for job in jobs:
            await self._give_up(job, error)

    async def _give_up(self, job: Job, error: str) -> None:
        METRICS.updates.labels("dead-lettered").inc()
        await self.store.jobs.dead_letter(job, error)
        await self.store.set_last_error(job.tenant, job.sid,
                                        f"update given up after {job.deliveries} attempts: {error}")

    async def _defer(self, jobs: list[Job]) -> None:
        for job in jobs:
            await self.store.jobs.defer(job)

    async def _keep_claims(self, jobs: list[Job]) -> None:
        """Keep the jobs in hand from looking idle, so no other worker reclaims (and charges) them meanwhile."""
        while True:
            await asyncio.sleep(self.settings.job_reclaim_idle_ms / 3000)
            with contextlib.suppress(StoreUnavailable):
                await self.store.jobs.touch(self.name, jobs)

    async def _update(self, jobs: list[Job]) -> None:
        todo = jobs
        for _ in range(3):  # a session written meanwhile (stale snapshot) is prepared again
            claimed = time.time()
            prepared = list(await asyncio.gather(*(self.preparer.prepare(job) for job in todo)))
            for p in prepared:  # the wait behind other sessions' updates, often the largest part of the lag
                p.report.timed("queued", max(0.0, claimed - p.job.enqueued_at))
            await self._train(prepared)
            todo = [p.job for p in prepared if not await self._commit(p)]
            if not todo:
                return

    async def _train(self, prepared: list[PreparedUpdate]) -> None:
        """Train every session with supervision in one batched pass; record each result on its PreparedUpdate."""
        trainable = [p for p in prepared if p.supervision]
        for p in prepared:
            if not p.supervision and (p.snap.new_turns or p.snap.teach_pairs):
                METRICS.updates.labels("no-pairs").inc()
                p.rejection = "nothing to learn: the new text gave no supervision"
        if not trainable:
            return
        items = [(p.b, p.supervision) for p in trainable]
        waiting = time.perf_counter()
        async with self._training:
            started = time.perf_counter()
            for p in trainable:  # behind the previous group's training pass (the pipeline's price)
                p.report.timed("train_wait", started - waiting)
            results = await asyncio.to_thread(self.runtime.update_many, items)
        for p in trainable:  # one batched pass: each session waited for all of it
            p.report.timed("train", time.perf_counter() - started)
        METRICS.update_group_size.observe(len(trainable))
        if len(trainable) > 1:
            METRICS.batched_passes.inc()
        for p, result in zip(trainable, results, strict=True):
            p.report.examples, p.report.final_loss = result.examples, result.final_loss
            if result.applied:
                METRICS.updates.labels("applied").inc()
                if result.final_loss is not None:
                    METRICS.train_loss.set(result.final_loss)
                p.checkpoint = self.runtime.encode(result.b)
            else:
                METRICS.updates.labels("rejected").inc()
                log.warning("update of %s/%s rejected: %s", p.job.tenant, p.job.sid, result.reason)
                p.rejection = f"update rejected: {result.reason}"

    async def _commit(self, p: PreparedUpdate) -> bool:
        """Publish one session's update; False when its snapshot went stale and it must be redone."""
        if not p.snap.new_turns and not p.snap.teach_pairs:
            METRICS.updates.labels("nothing-new").inc()
            return True
        ckpt = p.checkpoint
        started = time.perf_counter()
        try:
            await self.store.commit_update(p.job.tenant, p.job.sid, p.snap, checkpoint=ckpt.data if ckpt else None,
                                           sha256=ckpt.sha256 if ckpt else None, summary=p.summary,
                                           job_id=p.job.job_id, memories=p.memories if ckpt else (),
                                           report=p.report.model_dump(), max_memories=self.settings.max_memories)
        except StaleSnapshot:
            return False
        METRICS.update_seconds.labels("commit").observe(time.perf_counter() - started)
        if p.rejection:
            # After the commit, which clears last_error: the reason must outlive it.
            await self.store.set_last_error(p.job.tenant, p.job.sid, p.rejection)
        METRICS.update_lag.observe(max(0.0, time.time() - p.job.enqueued_at))
        return True

    async def _keep_locks(self, keys: list[SessionKey], ttl_ms: int) -> None:
        """Refresh the session locks while updates run; a crashed worker's locks lapse within one TTL."""
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            for key in keys:
                try:
                    await self.store.refresh_session_lock(*key, self.name, ttl_ms)
                except StoreUnavailable:
                    continue
