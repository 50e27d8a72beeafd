"""Session operations behind /v1/sessions: info, ingest, teach, flush, adapter download, delete."""

from __future__ import annotations

import asyncio
import io
import tarfile
import tempfile
import time
from pathlib import Path

from tmem.adapters.extraction import normalize_question
from tmem.server.errors import InvalidRequest, NotFound, RateLimited, ServiceUnavailable
from tmem.server.lifecycle import SessionLifecycle
from tmem.server.limits import check_messages
from tmem.server.pool import AdapterPool
from tmem.server.session_protocol import Memory, SessionInfo
from tmem.server.settings import Settings
from tmem.server.store import RedisStore, SessionState, request_fingerprint

_FLUSH_POLL_S = 0.05


def session_info(state: SessionState) -> SessionInfo:
    return SessionInfo(
        id=state.session_id,
        adapter_version=state.adapter_version,
        turns=state.turns,
        summary=state.summary,
        pending_updates=state.pending_updates,
        created_at=int(state.created_at),
        last_error=state.last_error,
        last_update=state.last_update,
    )


class SessionService:
    """Everything a client can do to a session besides chatting."""

    def __init__(self, sessions: SessionLifecycle, store: RedisStore, pool: AdapterPool, settings: Settings) -> None:
        self.sessions, self.store, self.pool, self.settings = sessions, store, pool, settings
        # Flushes waiting per tenant on this replica: each one polls Redis until its deadline.
        self._flushing: dict[str, int] = {}

    async def get(self, tenant: str, sid: str) -> SessionState:
        return await self.sessions.get(tenant, sid)

    async def ingest(
        self, tenant: str, sid: str, messages: list[dict[str, str]], idempotency_key: str | None
    ) -> SessionState:
        check_messages(messages, self.settings)
        await self.sessions.open(tenant, sid)
        await self.sessions.record(tenant, sid, messages, idempotency_key, request_fingerprint(messages),
                                   reason="ingest")
        return await self.get(tenant, sid)

    async def teach(self, tenant: str, sid: str, pairs: list[dict[str, str]]) -> SessionState:
        if len(pairs) > self.settings.max_pairs_per_teach:
            raise InvalidRequest(f"at most {self.settings.max_pairs_per_teach} pairs per call", param="pairs")
        await self.sessions.teach(tenant, sid, pairs)
        return await self.get(tenant, sid)

    async def flush(self, tenant: str, sid: str, timeout_s: float | None) -> SessionState:
        """Return once every pending turn and pair of the session is absorbed (read-your-writes)."""
        limit = self.settings.flush_timeout_s
        if timeout_s is not None and timeout_s > limit:
            raise InvalidRequest(f"timeout may be at most {limit:g} seconds on this server", param="timeout",
                                 code="invalid_value")
        if self._flushing.get(tenant, 0) >= self.settings.max_flushes_per_tenant:
            raise RateLimited(f"at most {self.settings.max_flushes_per_tenant} flushes may wait at once; "
                              "retry when one has returned", retry_after=1, code="too_many_flushes")
        self._flushing[tenant] = self._flushing.get(tenant, 0) + 1
        try:
            return await self._wait_absorbed(tenant, sid, timeout_s or limit)
        finally:
            self._flushing[tenant] -= 1
            if not self._flushing[tenant]:
                del self._flushing[tenant]

    async def _wait_absorbed(self, tenant: str, sid: str, timeout_s: float) -> SessionState:
        state = await self.get(tenant, sid)
        if state.pending_updates:
            await self.sessions.queue_update(tenant, sid, reason="flush")
        deadline = time.monotonic() + timeout_s
        while state.pending_updates or state.job_pending:
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"session '{sid}' still has {state.pending_updates} pending updates; is a worker running?",
                    retry_after=5,
                    code="flush_timeout",
                )
            await asyncio.sleep(_FLUSH_POLL_S)
            state = await self.get(tenant, sid)
        return state

    async def memories(self, tenant: str, sid: str) -> list[Memory]:
        """The session's learned pairs, oldest first, one per question (the newest answer wins)."""
        await self.get(tenant, sid)
        latest: dict[str, Memory] = {}
        for raw in await self.store.get_memories(tenant, sid, self.settings.max_memories):
            memory = Memory.model_validate(raw)
            key = normalize_question(memory.instruction)
            latest.pop(key, None)  # re-inserted last: the list stays in learning order
            latest[key] = memory
        return list(latest.values())

    async def adapter_archive(self, tenant: str, sid: str) -> tuple[bytes, int]:
        """The live version as a .tar.gz of its PEFT directory, and the version number."""
        state = await self.get(tenant, sid)
        if state.adapter_version == 0:
            raise NotFound(
                f"session '{sid}' has no adapter yet (version 0 is the base model)",
                param="session_id",
                code="no_adapter",
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"adapter-v{state.adapter_version}"
            if not await self.pool.write_version(tenant, sid, state.adapter_version, path):
                raise NotFound(f"version {state.adapter_version} of '{sid}' is gone", code="no_adapter")
            return await asyncio.to_thread(_tar_gz, path), state.adapter_version

    async def delete(self, tenant: str, sid: str) -> None:
        await self.sessions.delete(tenant, sid)


def _tar_gz(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for file in sorted(directory.iterdir()):
            tar.add(file, arcname=f"{directory.name}/{file.name}")
    return buffer.getvalue()
