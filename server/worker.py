"""The update worker: claims pending sessions, extracts QA pairs, trains their B together, checkpoints.

Several pending sessions are updated as one group: their extraction prompts go to the engine at
once (vLLM batches them) and their B tensors are trained in one batched pass (`update_many`), each
session's gradient exactly what it would be alone. A job is acknowledged only after its checkpoint
is stored; the snapshot/commit pair in the store makes a reclaimed job find nothing new.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

from server.generation import SessionGenerator
from server.metrics import METRICS
from server.settings import Settings
from server.store import Job, RedisStore, StaleSnapshot, StoreUnavailable
from server.trainer_runtime import TrainerRuntime
from server.update_prep import PreparedUpdate, UpdatePreparer

log = logging.getLogger(__name__)
SessionKey = tuple[str, str]


class UpdateWorker:
    """Consumes the update stream until stopped, up to `update_group_size` sessions per pass."""

    def __init__(self, store: RedisStore, runtime: TrainerRuntime, generator: SessionGenerator,
                 settings: Settings, name: str | None = None) -> None:
        self.store, self.runtime, self.settings = store, runtime, settings
        self.preparer = UpdatePreparer(store, runtime, generator, settings)
        self.name = name or f"worker-{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()
        self.jobs_done = 0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Main loop: reclaim stuck jobs, read new ones, process them as a group; ride out Redis outages."""
        await self.store.put_a0(self.runtime.identity, self.runtime.a0_blob)
        await self.store.ensure_group()
        group = self.settings.update_group_size
        while not self._stop.is_set():
            try:
                jobs = await self.store.reclaim(self.name, self.settings.job_reclaim_idle_ms, count=group)
                jobs += await self.store.read_jobs(self.name, count=max(1, group - len(jobs)), block_ms=500)
                METRICS.queue_depth.set(await self.store.queue_depth())
                if jobs:
                    await self.process(jobs)
            except StoreUnavailable as exc:
                log.warning("worker %s: Redis unavailable (%s); retrying", self.name, exc)
                await asyncio.sleep(1.0)
            except Exception:  # a bug in one pass must not kill the worker; its jobs stay pending
                log.exception("worker %s: unexpected error", self.name)
                await asyncio.sleep(1.0)

    async def process(self, jobs: Sequence[Job]) -> None:
        """Update every session the jobs name (one update per session), then ack all of the jobs."""
        by_session: dict[SessionKey, list[Job]] = {}
        for job in jobs:
            by_session.setdefault((job.tenant, job.sid), []).append(job)
        ttl = self.settings.job_lock_ttl_ms
        held = [key for key in by_session if await self.store.acquire_session_lock(*key, self.name, ttl)]
        # Sessions locked by another worker keep their jobs pending: they are reclaimed later.
        if not held:
            return
        heartbeat = asyncio.create_task(self._keep_locks(held, ttl))
        try:
            for key in held:
                await self.store.clear_pending_flag(*key)
            await self._update([by_session[key][0] for key in held])
            for key in held:
                for job in by_session[key]:
                    await self.store.ack(job)
                    self.jobs_done += 1
        finally:
            heartbeat.cancel()
            for key in held:
                await self.store.release_session_lock(*key, self.name)

    async def _update(self, jobs: list[Job]) -> None:
        todo = jobs
        for _ in range(3):  # a session written meanwhile (stale snapshot) is prepared again
            started = time.perf_counter()
            prepared = list(await asyncio.gather(*(self.preparer.prepare(job) for job in todo)))
            METRICS.update_seconds.labels("extract").observe(time.perf_counter() - started)
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
        started = time.perf_counter()
        items = [(p.b, p.supervision) for p in trainable]
        results = await asyncio.to_thread(self.runtime.update_many, items)
        METRICS.update_seconds.labels("train").observe(time.perf_counter() - started)
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
        try:
            await self.store.commit_update(p.job.tenant, p.job.sid, p.snap, checkpoint=ckpt.data if ckpt else None,
                                           sha256=ckpt.sha256 if ckpt else None, summary=p.summary,
                                           job_id=p.job.job_id, memories=p.memories if ckpt else (),
                                           report=p.report.model_dump(), max_memories=self.settings.max_memories)
        except StaleSnapshot:
            return False
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
