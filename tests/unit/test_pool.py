"""The adapter pool's bounds: a global LRU cap on loaded versions and their directories, and state that shrinks.

The engine is a fake that records add/remove calls, and checkpoints are not read from Redis: the pool's
own bookkeeping (refcounts, LRU order, directories under adapter_dir, metrics) is what runs for real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeEngine

import tmem.server.pool as pool_module
from tmem.adapters.spec import FastWeightSpec
from tmem.server.metrics import METRICS
from tmem.server.pool import AdapterPool, VersionTensors
from tmem.server.store import CheckpointHeader
from tmem.server.store.verified import VerifiedCheckpoint

T = "acme"


def _write_dir(path: Path, *args: Any) -> None:
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")


@pytest.fixture
def pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AdapterPool:
    monkeypatch.setattr(pool_module, "write_peft_dir", _write_dir)
    made = AdapterPool(FakeEngine(), store=None, adapter_dir=tmp_path, base_model="base",  # type: ignore[arg-type]
                       max_resident=2)

    async def version_tensors(tenant: str, sid: str, version: int) -> VersionTensors:
        # Every version exists; the fake writer ignores the tensors.
        header = CheckpointHeader(a0="a0", spec=FastWeightSpec(), layers=[0])
        return VersionTensors(VerifiedCheckpoint(version, header, {}), {})

    made.version_tensors = version_tensors  # type: ignore[method-assign]
    return made


def evictions(reason: str) -> float:
    return METRICS.registry.get_sample_value("tmem_adapter_evictions_total", {"reason": reason}) or 0.0


def dirs(pool: AdapterPool) -> list[Path]:
    return sorted(p for p in pool.adapter_dir.iterdir() if p.is_dir())


async def serve(pool: AdapterPool, sid: str, version: int = 1) -> str:
    async with await pool.lease(T, sid, version) as lease:
        assert lease.served_version == version and lease.lora_request is not None
        return str(lease.lora_request.lora_name)


async def test_the_least_recently_used_idle_version_goes_first(pool: AdapterPool) -> None:
    before = evictions("lru")
    await serve(pool, "s1")
    s2 = await serve(pool, "s2")
    await serve(pool, "s1")  # s1 is now more recent than s2
    await serve(pool, "s3")
    engine: FakeEngine = pool.engine
    assert s2 not in engine.loaded.values()
    assert {n.split("@")[0] for n in engine.loaded.values()} == {f"{T}/s1", f"{T}/s3"}
    assert pool.resident_count == 2 and len(dirs(pool)) == 2, "an evicted version's directory is removed"
    assert evictions("lru") == before + 1
    assert METRICS.registry.get_sample_value("tmem_adapters_resident") == 2


async def test_a_version_in_use_is_never_evicted_and_goes_once_released(pool: AdapterPool) -> None:
    pool.max_resident = 1
    async with await pool.lease(T, "held", 1) as lease:
        held = lease.lora_request
        assert held is not None
        await serve(pool, "other")
        # Over the cap while `held` serves a request: its directory must stay for vLLM to re-read.
        assert Path(held.lora_path).is_dir()
        assert held.lora_int_id in pool.engine.loaded
    assert pool.resident_count == 1
    assert len(dirs(pool)) == 1


async def test_per_session_state_shrinks_with_the_residents(pool: AdapterPool) -> None:
    for i in range(20):
        await serve(pool, f"s{i}")
    assert pool.resident_count == 2
    assert len(pool._locks) <= 2 and len(pool._latest) <= 2, (len(pool._locks), len(pool._latest))
    assert pool.tracked_sessions == 2
    for i in (18, 19):
        await pool.forget(T, f"s{i}")
    assert pool.resident_count == 0 and dirs(pool) == []
    assert pool._locks == {} and pool._latest == {} and pool.tracked_sessions == 0


async def test_a_superseded_version_is_unloaded_by_its_session(pool: AdapterPool) -> None:
    before = evictions("superseded")
    await serve(pool, "s", 1)
    await serve(pool, "s", 2)
    assert [n.split("#")[0] for n in pool.engine.loaded.values()] == [f"{T}/s@v2"]
    assert evictions("superseded") == before + 1


async def test_concurrent_sessions_over_the_cap_settle_back_under_it(pool: AdapterPool) -> None:
    async def chat(sid: str) -> None:
        async with await pool.lease(T, sid, 1):
            await asyncio.sleep(0.01)

    await asyncio.gather(*(chat(f"c{i}") for i in range(8)))
    assert pool.resident_count == 2 and len(dirs(pool)) == 2
    assert len(pool.engine.loaded) == 2
    assert pool.tracked_sessions == 2


async def test_a_lease_released_twice_unpins_once(pool: AdapterPool) -> None:
    pool.max_resident = 1
    first = await pool.lease(T, "twice", 1)
    second = await pool.lease(T, "twice", 1)  # the same resident version, pinned by two requests
    assert first.lora_request is second.lora_request
    await first.release()
    await first.release()  # a second release of the same lease must not drop the other request's pin
    await serve(pool, "other")  # over the cap: only an unpinned version could be evicted now
    assert second.lora_request is not None and second.lora_request.lora_int_id in pool.engine.loaded
    await second.release()
    await serve(pool, "other")
    assert second.lora_request.lora_int_id not in pool.engine.loaded


async def test_a_session_without_a_stored_version_leases_the_base_model(pool: AdapterPool) -> None:
    async def no_version(tenant: str, sid: str, version: int) -> Any:
        return None

    pool.version_tensors = no_version  # type: ignore[method-assign]
    lease = await pool.lease(T, "fresh", 3)
    assert (lease.served_version, lease.lora_request, pool.resident_count) == (0, None, 0)
    await lease.release()
