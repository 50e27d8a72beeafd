"""The update job queue: one Redis Stream, its consumer group, the dead letters, the tenants' update budgets.

Jobs live on one stream (`{prefix}:jobs`) read through one consumer group (`{prefix}:workers`), as
taskiq-redis and arq do: the group is created at start-up, a job is acknowledged (and deleted) only
after its result is durable, and a crashed consumer's jobs are reclaimed with XAUTOCLAIM. At most one
job per session is pending: a flag in the session's meta hash coalesces the rest.

A job that keeps failing is retried at most `max_job_attempts` times (the stream's own delivery count),
then moved to the dead-letter stream `{prefix}:jobs:dead` and acknowledged, so it cannot be reclaimed
forever. The job stream is capped (`job_stream_maxlen`) by refusing new jobs, never by trimming: it
holds only jobs not yet done, and a trim would drop them silently.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

import tmem.server.store.scripts as lua
from tmem.server.store.errors import QueueFull, faults_as_unavailable
from tmem.server.store.keys import KeyLayout
from tmem.server.store.limits import StoreLimits
from tmem.server.store.replies import as_str

log = logging.getLogger(__name__)
DEAD_LETTERS_KEPT = 10_000  # dead letters are a record for operators, not work: trimming the oldest is fine
StreamFields = dict[FieldT, EncodableT]  # what XADD takes


@dataclass(frozen=True)
class Job:
    """One queued session update, as read from the stream."""

    stream_id: str
    job_id: str  # tenant:sid:turns_total:teach_total, so a job whose state was already committed is known
    tenant: str
    sid: str
    reason: str
    force: bool
    enqueued_at: float
    incarnation: str = ""  # the session's incarnation when queued ("" for jobs queued before incarnations)
    deliveries: int = 1  # times the stream delivered this job, this delivery included


class JobQueue:
    """Session update jobs on a Redis Stream; held by RedisStore. Redis faults surface as StoreUnavailable."""

    def __init__(self, client: aioredis.Redis, keys: KeyLayout, limits: StoreLimits,
                 max_block_ms: int = 30_000) -> None:
        self._redis, self.keys, self.limits, self._max_block_ms = client, keys, limits, max_block_ms
        self.stream, self.group, self.dead_letters = keys.jobs_stream, keys.workers_group, keys.dead_letters
        self._enqueue = client.register_script(lua.ENQUEUE_JOB)
        self._take_budget = client.register_script(lua.TAKE_UPDATE_BUDGET)

    @faults_as_unavailable
    async def ensure_group(self) -> None:
        """Create the stream and its consumer group when missing; safe to call from every process."""
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @faults_as_unavailable
    async def enqueue_update(self, tenant: str, sid: str, reason: str, force: bool = False) -> bool:
        """Queue an update unless one is already pending for the session; False when coalesced (or no session).

        Flag and job are written in one script, so a fault cannot leave one without the other. force
        queues even when a job is pending: duplicates are harmless, since the worker's per-session lock
        and snapshot/commit make a job with nothing new a no-op. Raises QueueFull at the queue's cap.
        """
        keys = [self.keys.session(tenant, sid, "meta"), self.stream]
        (status,) = await self._enqueue(keys=keys, args=[time.time(), *self.queue_args(reason, tenant, sid, force)])
        if status == -3:
            raise QueueFull(f"the update queue is full ({self.limits.job_stream_maxlen} jobs)")
        return bool(status == 1)

    def queue_args(self, reason: str, tenant: str, sid: str, force: bool = False) -> list[Any]:
        """The ARGV tail the queuing scripts share, after `now`: stale_after_s, force, reason, tenant, sid, maxlen."""
        return [self.limits.job_stale_after_s, int(force), reason, tenant, sid, self.limits.job_stream_maxlen]

    @faults_as_unavailable
    async def clear_pending_flag(self, tenant: str, sid: str) -> None:
        """Called when a worker STARTS an update: a turn arriving meanwhile queues exactly one more job."""
        await self._redis.hdel(self.keys.session(tenant, sid, "meta"), "job_pending_since")

    @faults_as_unavailable
    async def read_jobs(self, consumer: str, count: int = 1, block_ms: int | None = None) -> list[Job]:
        """New jobs for this consumer (XREADGROUP), waiting up to block_ms (capped below the socket timeout)."""
        block = None if block_ms is None else max(1, min(block_ms, self._max_block_ms))
        try:
            reply = await self._redis.xreadgroup(
                self.group, consumer, {self.stream: ">"}, count=count, block=block
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.ensure_group()  # the stream was lost (e.g. Redis restarted without persistence)
            return []
        # RESP2 replies [[stream, entries]], RESP3 {stream: [entries]}: redis-py 8 defaults to RESP3.
        streams = reply.items() if isinstance(reply, dict) else (reply or [])
        entries = [e for _, payload in streams for e in (payload[0] if isinstance(reply, dict) else payload)]
        return await self._parse_jobs(entries)

    @faults_as_unavailable
    async def reclaim(self, consumer: str, min_idle_ms: int, count: int = 10) -> list[Job]:
        """Take over jobs another consumer read but never acked for min_idle_ms (XAUTOCLAIM)."""
        jobs: list[Job] = []
        cursor: bytes | str = "0-0"
        while len(jobs) < count:
            reply = await self._redis.xautoclaim(
                self.stream, self.group, consumer, min_idle_ms, start_id=cursor, count=count - len(jobs)
            )
            # Redis 7 replies [cursor, entries, deleted ids] and drops deleted ids from the PEL itself;
            # Redis 6.2 lists a deleted entry as (None, None) among the entries, skipped by _parse_jobs.
            cursor, entries = reply[0], reply[1]
            jobs += await self._parse_jobs(entries)
            if as_str(cursor) == "0-0":
                break
        return await self._with_deliveries(jobs)

    async def _with_deliveries(self, jobs: list[Job]) -> list[Job]:
        """The jobs with their delivery counts from the group's pending list (XAUTOCLAIM counts each claim)."""
        if not jobs:
            return jobs
        async with self._redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.xpending_range(self.stream, self.group, min=job.stream_id, max=job.stream_id, count=1)
            replies = await pipe.execute()
        counts = [int(r[0]["times_delivered"]) if r else job.deliveries for job, r in zip(jobs, replies, strict=True)]
        return [dataclasses.replace(job, deliveries=n) for job, n in zip(jobs, counts, strict=True)]

    @faults_as_unavailable
    async def ack(self, job: Job) -> None:
        """Acknowledge and delete a finished job: the stream holds only jobs not yet done."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, job.stream_id)
            pipe.xdel(self.stream, job.stream_id)
            await pipe.execute()

    @faults_as_unavailable
    async def dead_letter(self, job: Job, error: str) -> None:
        """Give up on a job: record it with its error on the dead-letter stream, then ack and delete it."""
        fields: StreamFields = {**_job_fields(job), "error": error[:2000], "deliveries": job.deliveries,
                                "failed_at": time.time()}
        # Dead letter first, ack second (two slots on a cluster, so not one transaction): a fault between
        # them leaves the job pending and recorded twice at worst, never lost.
        await self._redis.xadd(self.dead_letters, fields, maxlen=DEAD_LETTERS_KEPT, approximate=True)
        await self.ack(job)

    @faults_as_unavailable
    async def read_dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead letters, oldest first: the job's fields plus error, deliveries and failed_at."""
        entries = await self._redis.xrevrange(self.dead_letters, count=count) or []
        return [{as_str(k): as_str(v) for k, v in (raw or {}).items()} for _, raw in reversed(entries)]

    @faults_as_unavailable
    async def defer(self, job: Job) -> None:
        """Move a job to the back of the queue, as not yet tried (its tenant is over budget, or its session is
        busy on another worker): re-add it, then ack the original."""
        await self._redis.xadd(self.stream, _job_fields(job))
        await self.ack(job)

    @faults_as_unavailable
    async def touch(self, consumer: str, jobs: Sequence[Job]) -> None:
        """Reset the idle time of jobs still being worked on (XCLAIM JUSTID, which counts no delivery), so a
        long update is not reclaimed by another worker and charged an attempt it never made."""
        if jobs:
            await self._redis.xclaim(self.stream, self.group, consumer, 0,
                                     [job.stream_id for job in jobs], justid=True)

    @faults_as_unavailable
    async def take_update_budget(self, tenant: str, per_minute: int) -> bool:
        """Count one update against the tenant's budget for this minute; False (counting nothing) when spent."""
        if per_minute <= 0:
            return True
        key = self.keys.update_budget(tenant, int(time.time() // 60))
        return bool(await self._take_budget(keys=[key], args=[per_minute]))

    @faults_as_unavailable
    async def queue_depth(self) -> int:
        """Jobs not yet done: delivered but unacked (XPENDING) plus never delivered."""
        try:
            groups = await self._redis.xinfo_groups(self.stream)
            length = int(await self._redis.xlen(self.stream))
        except ResponseError:
            return 0  # no stream yet
        group = next((g for g in groups if as_str(g.get("name")) == self.group), None)
        if group is None:
            return length
        pending, lag = int(group.get("pending", 0)), group.get("lag")
        # lag is unknown (None) after some deletions; acked jobs are deleted, so the rest is unread.
        return pending + (int(lag) if lag is not None else max(0, length - pending))

    async def _parse_jobs(self, entries: list[Any]) -> list[Job]:
        jobs, broken = [], []
        for stream_id, raw in entries:
            if stream_id is None or raw is None:
                continue
            f = {as_str(k): as_str(v) for k, v in raw.items()}
            try:
                jobs.append(
                    Job(
                        stream_id=as_str(stream_id),
                        job_id=f["job_id"],
                        tenant=f["tenant"],
                        sid=f["sid"],
                        reason=f.get("reason", ""),
                        force=f.get("force") == "1",
                        enqueued_at=float(f.get("enqueued_at", 0.0)),
                        incarnation=f.get("incarnation", ""),
                    )
                )
            except (KeyError, ValueError):
                broken.append(as_str(stream_id))
        if broken:  # a malformed entry would be reclaimed forever; drop it
            log.warning("dropping %d malformed job entries: %s", len(broken), broken[:5])
            await self._redis.xack(self.stream, self.group, *broken)
            await self._redis.xdel(self.stream, *broken)
        return jobs


def _job_fields(job: Job) -> StreamFields:
    """A job as stream fields (what the queuing scripts write)."""
    return {"job_id": job.job_id, "tenant": job.tenant, "sid": job.sid, "reason": job.reason,
            "force": int(job.force), "enqueued_at": job.enqueued_at, "incarnation": job.incarnation}
