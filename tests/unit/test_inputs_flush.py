"""Flush bounds: a flush waits no longer than the server allows, and a tenant holds few waiting flushes at once.

Each waiting flush polls Redis until its deadline, so both bounds cap what one tenant can make a replica
do. The store is a small fake whose session stays pending until the test absorbs it (no worker here).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tmem.server.errors import InvalidRequest, RateLimited, ServiceUnavailable
from tmem.server.lifecycle import SessionLifecycle
from tmem.server.sessions import SessionService
from tmem.server.settings import Settings
from tmem.server.store import SessionState


class PendingStore:
    """Sessions with two stored messages that no worker absorbs until `absorb()`."""

    def __init__(self) -> None:
        self.absorbed = False
        self.reads = 0

    async def get_session(self, tenant: str, sid: str) -> SessionState:
        self.reads += 1
        return SessionState(session_id=sid, tenant=tenant, turns=2, absorbed_turns=2 if self.absorbed else 0,
                            adapter_version=1 if self.absorbed else 0)

    async def enqueue_update(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def absorb(self) -> None:
        self.absorbed = True

    @property
    def jobs(self) -> PendingStore:
        """The job queue half of the store (RedisStore.jobs): here the same fake."""
        return self


def service(store: PendingStore, **settings: Any) -> SessionService:
    config = Settings(_env_file=None, **settings)
    lifecycle = SessionLifecycle(store, pool=None, tokenizer=None, settings=config)  # type: ignore[arg-type]
    return SessionService(lifecycle, store, pool=None, settings=config)  # type: ignore[arg-type]


async def test_a_timeout_over_the_servers_limit_is_a_400_before_any_wait() -> None:
    store = PendingStore()
    with pytest.raises(InvalidRequest) as caught:
        await service(store, flush_timeout_s=30).flush("acme", "s1", timeout_s=31)
    err = caught.value
    assert (err.status, err.param, err.code) == (400, "timeout", "invalid_value")
    assert "at most 30 seconds" in err.message
    assert store.reads == 0


async def test_without_a_timeout_the_wait_ends_at_the_servers_limit() -> None:
    svc = service(PendingStore(), flush_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        await svc.flush("acme", "s1", timeout_s=None)
    assert caught.value.code == "flush_timeout" and caught.value.headers["Retry-After"] == "5"
    assert 0.2 <= time.monotonic() - started < 2


async def test_a_tenant_may_hold_only_so_many_waiting_flushes() -> None:
    store = PendingStore()
    svc = service(store, max_flushes_per_tenant=2)
    waiting = [asyncio.create_task(svc.flush("acme", f"s{i}", timeout_s=10)) for i in range(2)]
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in waiting)
    with pytest.raises(RateLimited) as caught:
        await svc.flush("acme", "s3", timeout_s=10)
    err = caught.value
    assert (err.status, err.code, err.headers["Retry-After"]) == (429, "too_many_flushes", "1")
    other = asyncio.create_task(svc.flush("other-tenant", "s1", timeout_s=10))  # another tenant is not refused
    store.absorb()
    states = await asyncio.gather(*waiting, other)
    assert [s.adapter_version for s in states] == [1, 1, 1]
    assert (await svc.flush("acme", "s3", timeout_s=10)).adapter_version == 1, "finished flushes free their slot"


async def test_a_flush_that_times_out_frees_its_slot() -> None:
    svc = service(PendingStore(), max_flushes_per_tenant=1)
    for _ in range(2):  # the second would be a 429 if the first one's slot leaked
        with pytest.raises(ServiceUnavailable):
            await svc.flush("acme", "s1", timeout_s=0.1)
