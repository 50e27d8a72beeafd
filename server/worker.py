"""The update worker: claims a session's job, extracts QA pairs, trains B, checkpoints, publishes.

A job is acknowledged only after its checkpoint is stored. The snapshot/commit pair in the store
makes a job idempotent: a reclaimed job whose work was already committed finds nothing new.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from adapters.checkpoint import Checkpoint, CheckpointError
from adapters.extraction import (
    EXTRACTION_JSON_SCHEMA,
    QAPair,
    build_extraction_messages,
    build_summary_messages,
    parse_pairs,
    parse_summary,
)
from server.generation import SessionGenerator
from server.metrics import METRICS
from server.settings import Settings
from server.store import Job, RedisStore, StaleSnapshot, StoreUnavailable, UpdateSnapshot
from server.trainer_runtime import TrainerRuntime

log = logging.getLogger(__name__)


class UpdateWorker:
    """Consumes the update stream until stopped; one session update at a time per worker."""

    def __init__(
        self,
        store: RedisStore,
        runtime: TrainerRuntime,
        generator: SessionGenerator,
        settings: Settings,
        name: str | None = None,
    ) -> None:
        self.store, self.runtime, self.generator, self.settings = store, runtime, generator, settings
        self.name = name or f"worker-{uuid.uuid4().hex[:8]}"
        self._stop = asyncio.Event()
        self.jobs_done = 0

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Main loop: reclaim stuck jobs, read new ones, process each; ride out Redis outages."""
        await self.store.put_a0(self.runtime.identity, self.runtime.a0_blob)
        await self.store.ensure_group()
        while not self._stop.is_set():
            try:
                jobs = await self.store.reclaim(self.name, self.settings.job_reclaim_idle_ms, count=4)
                jobs += await self.store.read_jobs(self.name, count=1, block_ms=500)
                METRICS.queue_depth.set(await self.store.queue_depth())
                for job in jobs:
                    await self.process(job)
            except StoreUnavailable as exc:
                log.warning("worker %s: Redis unavailable (%s); retrying", self.name, exc)
                await asyncio.sleep(1.0)
            except Exception:  # a bug in one job must not kill the worker; the job stays pending
                log.exception("worker %s: unexpected error", self.name)
                await asyncio.sleep(1.0)

    async def process(self, job: Job) -> None:
        """Run one job under the session's lock; ack once its result is durable."""
        ttl = self.settings.job_lock_ttl_ms
        if not await self.store.acquire_session_lock(job.tenant, job.sid, self.name, ttl):
            return  # another worker is updating this session; the job stays pending and is reclaimed later
        heartbeat = asyncio.create_task(self._keep_lock(job, ttl))
        try:
            await self.store.clear_pending_flag(job.tenant, job.sid)
            for _ in range(3):
                try:
                    await self.update_session(job)
                    break
                except StaleSnapshot:
                    continue
            await self.store.ack(job)
            self.jobs_done += 1
        finally:
            heartbeat.cancel()
            await self.store.release_session_lock(job.tenant, job.sid, self.name)

    async def _keep_lock(self, job: Job, ttl_ms: int) -> None:
        """Refresh the session lock while an update runs; a crashed worker's lock then lapses within one TTL."""
        while True:
            await asyncio.sleep(ttl_ms / 3000)
            try:
                await self.store.refresh_session_lock(job.tenant, job.sid, self.name, ttl_ms)
            except StoreUnavailable:
                continue

    async def update_session(self, job: Job) -> None:
        snap = await self.store.claim_snapshot(job.tenant, job.sid)
        if not snap.new_turns and not snap.teach_pairs:
            METRICS.updates.labels("nothing-new").inc()
            return
        started = time.perf_counter()
        pairs = [QAPair(instruction=p["instruction"], output=p["output"]) for p in snap.teach_pairs]
        summary: str | None = None
        # Long ingests are read chunk by chunk, each fitting the window; the summary rolls forward.
        running_summary = snap.summary
        for text in self._chunks(snap.new_turns):
            pairs += await self._extract(job, snap, text, known=pairs)
            running_summary = await self._summarize(job, snap, running_summary, text) or running_summary
            summary = running_summary
        METRICS.update_seconds.labels("extract").observe(time.perf_counter() - started)
        checkpoint, rejection = await self._train(job, snap, pairs)
        await self.store.commit_update(
            job.tenant,
            job.sid,
            snap,
            checkpoint=checkpoint.data if checkpoint else None,
            sha256=checkpoint.sha256 if checkpoint else None,
            summary=summary,
            job_id=job.job_id,
        )
        if rejection:
            # After the commit, which clears last_error: the reason must outlive it.
            await self.store.set_last_error(job.tenant, job.sid, rejection)
        METRICS.update_lag.observe(max(0.0, time.time() - job.enqueued_at))
        METRICS.update_seconds.labels("total").observe(time.perf_counter() - started)

    def _chunks(self, turns: list[dict[str, str]]) -> list[str]:
        """Turns as text blocks of at most `extraction_chunk_tokens` tokens (a longer single turn is cut)."""
        tokenizer = self.runtime.trainer.tokenizer
        budget = self.settings.extraction_chunk_tokens
        chunks: list[str] = []
        lines: list[str] = []
        used = 0
        for line in (_as_text([turn]) for turn in turns):
            ids = tokenizer.encode(line, add_special_tokens=False)
            if len(ids) > budget:
                line, ids = tokenizer.decode(ids[:budget]), ids[:budget]
            if lines and used + len(ids) > budget:
                chunks.append("\n".join(lines))
                lines, used = [], 0
            lines.append(line)
            used += len(ids)
        if lines:
            chunks.append("\n".join(lines))
        return chunks

    async def _extract(self, job: Job, snap: UpdateSnapshot, text: str, known: list[QAPair]) -> list[QAPair]:
        # The newest pairs are shown (to avoid repeats) within a bounded prompt; all are used for dedupe.
        messages = build_extraction_messages(text, known, max_known=self.settings.extraction_known_pairs)
        raw = await self.generator.generate(
            job.tenant, job.sid, snap.version, messages, self.settings.extraction_max_tokens, EXTRACTION_JSON_SCHEMA
        )
        report = parse_pairs(raw, known=known)
        if not report.ok:
            METRICS.extraction_failures.inc()
            log.info("extraction for %s/%s gave no JSON array: %s", job.tenant, job.sid, report.problems[:3])
        METRICS.pairs_extracted.inc(len(report.pairs))
        return report.pairs

    async def _summarize(self, job: Job, snap: UpdateSnapshot, previous: str, text: str) -> str | None:
        messages = build_summary_messages(previous, text)
        raw = await self.generator.generate(
            job.tenant, job.sid, snap.version, messages, self.settings.summary_max_tokens
        )
        summary = parse_summary(raw)
        return summary or None

    async def _train(self, job: Job, snap: UpdateSnapshot, pairs: list[QAPair]
                     ) -> tuple[Checkpoint | None, str | None]:
        """(new checkpoint, None), or (None, why not) when the update was rejected, or (None, None) if no pairs."""
        if not pairs:
            METRICS.updates.labels("no-pairs").inc()
            return None, None
        b = await self._current_b(job, snap.version)
        started = time.perf_counter()
        result = await asyncio.to_thread(self.runtime.update, b, pairs)
        METRICS.update_seconds.labels("train").observe(time.perf_counter() - started)
        if not result.applied:
            METRICS.updates.labels("rejected").inc()
            log.warning("update of %s/%s rejected: %s", job.tenant, job.sid, result.reason)
            return None, f"update rejected: {result.reason}"
        METRICS.updates.labels("applied").inc()
        if result.final_loss is not None:
            METRICS.train_loss.set(result.final_loss)
        return self.runtime.encode(result.b), None

    async def _current_b(self, job: Job, version: int) -> Any:
        """B of the live version, or of the newest earlier one that verifies: a corrupt one is never built on."""
        for candidate in range(version, 0, -1):
            stored = await self.store.get_checkpoint(job.tenant, job.sid, candidate)
            if stored is None:
                continue
            try:
                return self.runtime.decode(stored.data, stored.sha256)
            except (CheckpointError, ValueError) as exc:
                METRICS.checkpoint_faults.inc()
                log.error("checkpoint %s/%s@v%d refused: %s", job.tenant, job.sid, candidate, exc)
        return self.runtime.zero_b()


def _as_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)
