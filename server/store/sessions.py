"""The Redis store: session state, turns, teach pairs, memories, adapter checkpoints, the per-session
update lock and the shared A0, with the job queue and the rate-limit counters it holds.

Redis is the source of truth; no replica keeps state that is not also here. Key names are in
`keys.py`, Lua scripts in `scripts.py`. Only `ensure_session` creates a session; every other write
refuses a missing one, so a request or a worker still running when the session is deleted cannot bring
it back. Storing a turn and queuing its update job is one script: that needs the job stream on the
session's node (one Redis, or one shard), which is how the product runs today.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

import tmem.server.store.errors as refused
import tmem.server.store.scripts as lua
from tmem.server.store.checkpoints import StoredCheckpoint
from tmem.server.store.errors import faults_as_unavailable
from tmem.server.store.jobs import JobQueue
from tmem.server.store.keys import KeyLayout
from tmem.server.store.limits import StoreLimits
from tmem.server.store.ratelimits import RateLimitCounters
from tmem.server.store.records import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    AppendResult,
    CommitResult,
    SessionState,
    UpdateSnapshot,
)
from tmem.server.store.replies import as_bytes, as_str


class RedisStore:
    """All TMEM state in Redis, behind async methods; Redis faults surface as StoreUnavailable.

    It holds the job queue (`jobs`) and the rate-limit counters (`rate_limits`) over the same client.
    """

    def __init__(self, client: aioredis.Redis, prefix: str = "tmem", max_block_ms: int = 30_000,
                 limits: StoreLimits | None = None) -> None:
        self._redis, self.prefix, self.keys = client, prefix, KeyLayout(prefix)
        self.limits = limits or StoreLimits()
        self.jobs = JobQueue(client, self.keys, self.limits, max_block_ms)
        self.rate_limits = RateLimitCounters(client, self.keys)
        self._append = client.register_script(lua.APPEND_TURNS)
        self._add_teach = client.register_script(lua.ADD_TEACH_PAIRS)
        self._snapshot = client.register_script(lua.SNAPSHOT)
        self._commit = client.register_script(lua.COMMIT_UPDATE)
        self._hset_if_exists = client.register_script(lua.HSET_IF_EXISTS)
        self._refresh_lock = client.register_script(lua.REFRESH_LOCK)
        self._release_lock = client.register_script(lua.RELEASE_LOCK)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "tmem",
        socket_timeout: float = 5.0,
        retries: int = 3,
        health_check_interval: int = 15,
        limits: StoreLimits | None = None,
        **redis_kwargs: Any,
    ) -> RedisStore:
        """A store over a new client with bounded retries: a short blip is ridden out, an outage is not hidden."""
        # Only connection errors are retried (a dead pooled socket, a refused connect): a timed-out
        # script may have run, and running append_turns twice would store a turn twice.
        client = aioredis.Redis.from_url(
            url,
            decode_responses=False,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries, supported_errors=(RedisConnectionError,)),
            health_check_interval=health_check_interval,
            **redis_kwargs,
        )
        # A blocking XREADGROUP must return before the socket timeout fires, or it reads as a fault.
        return cls(client, prefix, max_block_ms=max(0, int(socket_timeout * 1000) - 500), limits=limits)

    @property
    def client(self) -> aioredis.Redis:
        """The underlying client (tests and diagnostics)."""
        return self._redis

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._redis.aclose()

    # -- keys -----------------------------------------------------------------------------------------
    def _key(self, tenant: str, sid: str, part: str) -> str:
        return self.keys.session(tenant, sid, part)

    def session_pattern(self, tenant: str, sid: str) -> str:
        """The SCAN pattern matching every key of one session."""
        return self.keys.session_pattern(tenant, sid)

    # -- sessions -----------------------------------------------------------------------------------
    async def ping(self) -> bool:
        """True when Redis answers; False (not an exception) when it does not: made for health checks."""
        try:
            return bool(await self._redis.ping())
        except (RedisConnectionError, RedisTimeoutError):
            return False

    @faults_as_unavailable
    async def get_session(self, tenant: str, sid: str) -> SessionState | None:
        """The session's state, or None when it does not exist."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._key(tenant, sid, "meta"))
            pipe.llen(self._key(tenant, sid, "teach"))
            raw, teach_pending = await pipe.execute()
        if not raw:
            return None
        meta = {as_str(k): as_str(v) for k, v in raw.items()}
        return SessionState(
            session_id=sid,
            tenant=tenant,
            adapter_version=int(meta.get("version", 0)),
            adapter_sha256=meta.get("adapter_sha256") or None,
            turns=int(meta.get("turns", 0)),
            absorbed_turns=int(meta.get("absorbed_turns", 0)),
            teach_pending=int(teach_pending),
            summary=meta.get("summary", ""),
            created_at=float(meta.get("created_at", 0.0)),
            updated_at=float(meta.get("updated_at", 0.0)),
            job_pending="job_pending_since" in meta,
            last_error=meta.get("last_error") or None,
            last_job=meta.get("last_job") or None,
            last_update=json.loads(meta["last_update"]) if meta.get("last_update") else None,
        )

    @faults_as_unavailable
    async def ensure_session(self, tenant: str, sid: str) -> SessionState:
        """The session's state, creating it first when missing (HSETNX: concurrent callers agree)."""
        now = time.time()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self._key(tenant, sid, "meta"), "created_at", now)
            pipe.hsetnx(self._key(tenant, sid, "meta"), "updated_at", now)
            # Tells this session from one deleted and recreated under the same id (jobs, commits).
            pipe.hsetnx(self._key(tenant, sid, "meta"), "incarnation", uuid.uuid4().hex)
            await pipe.execute()
        # The tenant's session index lives in another slot, so it is written outside the transaction.
        await self._redis.sadd(self.keys.tenant_sessions(tenant), sid)
        state = await self.get_session(tenant, sid)
        if state is None:  # deleted between the two steps: report a fresh, empty session
            return SessionState(session_id=sid, tenant=tenant, created_at=now, updated_at=now)
        return state

    @faults_as_unavailable
    async def append_turns(
        self,
        tenant: str,
        sid: str,
        messages: list[dict[str, Any]],
        idempotency_key: str | None = None,
        *,
        request_sha256: str = "",
        enqueue: str | None = None,
    ) -> AppendResult:
        """Append messages to an existing session atomically and, with `enqueue` (the job's reason), queue
        its update in the same step. A repeated idempotency key appends nothing (a duplicate) when it came
        with the same `request_sha256`, and raises IdempotencyKeyReused when it came with another.

        Raises SessionNotFound, SessionFull, QueueFull (each writing nothing) and InvalidIdempotencyKey.
        """
        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError("every message needs a string 'role' and 'content'")
        keys = [self._key(tenant, sid, s) for s in ("meta", "turns", "keys", "idem")] + [self.jobs.stream]
        if idempotency_key is not None:
            keys.append(self._key(tenant, sid, f"idem:{_checked_idempotency_key(idempotency_key)}"))
        limits = self.limits
        now = time.time()
        args: list[Any] = [now, limits.idempotency_ttl_s, request_sha256, limits.max_session_messages,
                           limits.max_session_bytes, limits.max_idempotency_keys, int(enqueue is not None),
                           *self.jobs.queue_args(enqueue or "", tenant, sid),
                           *(json.dumps(m, ensure_ascii=False) for m in messages)]
        status, *rest = await self._append(keys=keys, args=args)
        self._raise_for_append(status, rest, tenant, sid)
        total, appended = as_str(rest[0]).split(":")
        queued = status == 0 and bool(rest[1])
        return AppendResult(turns_total=int(total), appended=int(appended), duplicate=status == 1, queued=queued)

    def _raise_for_append(self, status: int, rest: list[Any], tenant: str, sid: str) -> None:
        if status == -1:
            raise refused.SessionNotFound(f"session '{sid}' does not exist (deleted?)")
        if status == -2:
            limit = as_str(rest[0])
            cap = self.limits.max_session_messages if limit == "turns" else self.limits.max_session_bytes
            what = "messages" if limit == "turns" else "bytes of messages"
            raise refused.SessionFull(f"session '{sid}' is full: it may hold at most {cap} {what}; start a new session "
                              "or delete this one", limit=limit)
        if status == -3:
            raise refused.QueueFull(f"the update queue is full ({self.limits.job_stream_maxlen} jobs)")
        if status == -4:
            raise refused.IdempotencyKeyReused("this Idempotency-Key was already used with a different request body")

    @faults_as_unavailable
    async def get_turns(self, tenant: str, sid: str, start: int = 0, end: int = -1) -> list[dict[str, Any]]:
        """Stored messages from start to end, both inclusive (LRANGE semantics: -1 is the last)."""
        raw = await self._redis.lrange(self._key(tenant, sid, "turns"), start, end)
        return [json.loads(r) for r in raw]

    @faults_as_unavailable
    async def add_teach_pairs(self, tenant: str, sid: str, pairs: list[dict[str, Any]]) -> int:
        """Queue explicit {instruction, output} pairs for the next update; returns how many are pending.

        Raises SessionNotFound when the session does not exist.
        """
        for p in pairs:
            if not isinstance(p.get("instruction"), str) or not isinstance(p.get("output"), str):
                raise ValueError("every pair needs a string 'instruction' and 'output'")
        keys = [self._key(tenant, sid, "meta"), self._key(tenant, sid, "teach")]
        pending = int(await self._add_teach(keys=keys, args=[time.time(), *(json.dumps(p, ensure_ascii=False)
                                                                           for p in pairs)]))
        if pending < 0:
            raise refused.SessionNotFound(f"session '{sid}' does not exist (deleted?)")
        return pending

    @faults_as_unavailable
    async def session_incarnation(self, tenant: str, sid: str) -> str | None:
        """The session's incarnation ("" for sessions made before incarnations), or None when it does not exist."""
        meta = self._key(tenant, sid, "meta")
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.exists(meta)
            pipe.hget(meta, "incarnation")
            exists, incarnation = await pipe.execute()
        return as_str(incarnation) if exists else None

    @faults_as_unavailable
    async def set_last_error(self, tenant: str, sid: str, message: str) -> None:
        """Record why the last update failed (cleared by the next successful commit)."""
        await self._hset_if_exists(keys=[self._key(tenant, sid, "meta")], args=["last_error", message, time.time()])

    @faults_as_unavailable
    async def delete_session(self, tenant: str, sid: str) -> bool:
        """Remove every key of the session (jobs already queued for it find an empty snapshot); True when any."""
        keyset = self._key(tenant, sid, "keys")
        fixed = [self._key(tenant, sid, s) for s in ("meta", "turns", "teach", "memories", "lock", "keys", "idem")]
        # The set names every dynamic key (checkpoints, idempotency keys), so no keyspace-wide SCAN is
        # needed; WATCH retries the delete when a concurrent write adds a key to the set meanwhile.
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(keyset)
                    tracked = await pipe.smembers(keyset)
                    pipe.multi()
                    pipe.delete(*fixed, *tracked)
                    (removed,) = await pipe.execute()
                    break
                except WatchError:
                    continue
        await self._redis.srem(self.keys.tenant_sessions(tenant), sid)
        return int(removed) > 0

    @faults_as_unavailable
    async def count_sessions(self, tenant: str) -> int:
        """How many sessions the tenant holds (for the per-tenant session cap)."""
        return int(await self._redis.scard(self.keys.tenant_sessions(tenant)))

    # -- updates ------------------------------------------------------------------------------------
    @faults_as_unavailable
    async def claim_snapshot(self, tenant: str, sid: str) -> UpdateSnapshot:
        """Everything one update consumes, read atomically; empty when the session no longer exists."""
        keys = [self._key(tenant, sid, s) for s in ("meta", "turns", "teach")]
        raw = await self._snapshot(keys=keys)
        if raw is None:
            return UpdateSnapshot(version=0, generation=0, absorbed_turns=0, turns_total=0)
        version, generation, absorbed, total, summary, new, teach, incarnation = raw
        pairs = [json.loads(p) for p in teach]
        return UpdateSnapshot(
            version=int(version),
            generation=int(generation),
            absorbed_turns=int(absorbed),
            turns_total=int(total),
            new_turns=[json.loads(t) for t in new],
            teach_pairs=pairs,
            teach_count=len(pairs),
            summary=as_str(summary),
            incarnation=as_str(incarnation),
        )

    @faults_as_unavailable
    async def commit_update(
        self,
        tenant: str,
        sid: str,
        snapshot: UpdateSnapshot,
        *,
        checkpoint: bytes | None,
        sha256: str | None,
        summary: str | None,
        job_id: str,
        memories: Sequence[dict[str, Any]] = (),
        report: dict[str, Any] | None = None,
        max_memories: int = 512,
    ) -> CommitResult:
        """Apply one update atomically: new checkpoint + version, absorbed turns, trimmed teach pairs, summary,
        the memories it learned from (stamped with the version) and its report. Checkpoints older than
        the newest `max_checkpoints` are deleted in the same step.

        Raises StaleSnapshot (writing nothing) when another commit happened since the snapshot, or the
        session was deleted (even if recreated since).
        """
        if checkpoint is not None and not sha256:
            raise ValueError("a checkpoint needs its sha256")
        keys = [
            self._key(tenant, sid, "meta"),
            self._key(tenant, sid, "teach"),
            self.keys.checkpoint(tenant, sid, snapshot.version + 1),
            self._key(tenant, sid, "keys"),
            self._key(tenant, sid, "memories"),
        ]
        args: list[Any] = [
            snapshot.version,
            snapshot.generation,
            snapshot.turns_total,
            snapshot.teach_count,
            int(checkpoint is not None),
            checkpoint or b"",
            sha256 or "",
            int(summary is not None),
            summary or "",
            job_id,
            time.time(),
            max(1, max_memories),
            json.dumps(report or {}, ensure_ascii=False),
            snapshot.incarnation,
            max(1, self.limits.max_checkpoints),
            *(json.dumps(m, ensure_ascii=False) for m in memories),
        ]
        status, *rest = await self._commit(keys=keys, args=args)
        if status == -1:
            raise refused.StaleSnapshot(f"session {tenant}/{sid} no longer exists (or was deleted and recreated)")
        if status == 0:
            raise refused.StaleSnapshot(
                f"session {tenant}/{sid} moved on from version {snapshot.version} (now {rest[0]}) since the snapshot"
            )
        return CommitResult(version=int(rest[0]), bumped=bool(rest[1]))

    @faults_as_unavailable
    async def get_memories(self, tenant: str, sid: str, limit: int = 512) -> list[dict[str, Any]]:
        """The newest `limit` stored memories, oldest first: {instruction, output, source, version, ...}."""
        raw = await self._redis.lrange(self._key(tenant, sid, "memories"), -max(1, limit), -1)
        return [json.loads(r) for r in raw]

    @faults_as_unavailable
    async def get_checkpoint(self, tenant: str, sid: str, version: int) -> StoredCheckpoint | None:
        """The stored bytes of one adapter version, or None."""
        raw = await self._redis.hgetall(self.keys.checkpoint(tenant, sid, version))
        return StoredCheckpoint.from_hash(version, raw)

    @faults_as_unavailable
    async def list_versions(self, tenant: str, sid: str) -> list[int]:
        """Every adapter version with a stored checkpoint, ascending."""
        marker = self.keys.checkpoints(tenant, sid)
        members = (as_str(m) for m in await self._redis.smembers(self._key(tenant, sid, "keys")))
        return sorted(int(m[len(marker) :]) for m in members if m.startswith(marker))

    # -- per-session worker lock --------------------------------------------------------------------
    @faults_as_unavailable
    async def acquire_session_lock(self, tenant: str, sid: str, owner: str, ttl_ms: int) -> bool:
        """Take the session's update lock for ttl_ms; False when someone else holds it."""
        return bool(await self._redis.set(self._key(tenant, sid, "lock"), owner, nx=True, px=ttl_ms))

    @faults_as_unavailable
    async def refresh_session_lock(self, tenant: str, sid: str, owner: str, ttl_ms: int) -> bool:
        """Extend the lock when owner still holds it; False when it expired or passed to another."""
        return bool(await self._refresh_lock(keys=[self._key(tenant, sid, "lock")], args=[owner, ttl_ms]))

    @faults_as_unavailable
    async def release_session_lock(self, tenant: str, sid: str, owner: str) -> bool:
        """Release the lock only when owner holds it; True when released."""
        return bool(await self._release_lock(keys=[self._key(tenant, sid, "lock")], args=[owner]))

    # -- A0 (per base model, shared by every session) -----------------------------------------------
    @faults_as_unavailable
    async def put_a0(self, identity: str, data: bytes) -> bytes:
        """Publish the frozen A0 of one base model unless one is stored already; returns the stored A0.

        The first writer wins (HSETNX in one transaction): a later worker whose A0 differs (another
        device's SVD, say) must adopt the returned one, which is what every replica serves.
        """
        key = self.keys.a0(identity)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "data", data)
            pipe.hsetnx(key, "sha256", hashlib.sha256(data).hexdigest())
            await pipe.execute()
        stored = await self.get_a0(identity)
        if stored is None:  # only a concurrent FLUSH/DEL gets here
            raise refused.A0Corrupt(f"A0 {identity} vanished right after it was written")
        return stored

    @faults_as_unavailable
    async def get_a0(self, identity: str) -> bytes | None:
        """The A0 blob of one base model, verified against its stored sha256; None when absent."""
        raw = await self._redis.hgetall(self.keys.a0(identity))
        if not raw:
            return None
        data, expected = as_bytes(raw.get(b"data", b"")), as_str(raw.get(b"sha256"))
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise refused.A0Corrupt(f"stored A0 {identity} does not match its sha256 (expected {expected[:12]}…, "
                            f"got {actual[:12]}…): delete {self.keys.a0(identity)} and restart the workers")
        return data


def _checked_idempotency_key(key: str) -> str:
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise refused.InvalidIdempotencyKey(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    return key
