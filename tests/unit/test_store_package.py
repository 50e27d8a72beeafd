"""The store package's own pieces against a real redis-server: the key layout existing data depends on, the
checkpoint records, the one "newest version that verifies" rule the pool and the worker share, and the
rate-limit counters."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_tensors

import tmem.server.pool as pool_module
from tmem.adapters.checkpoint import CheckpointError, encode_b, read_metadata
from tmem.adapters.spec import FastWeightSpec
from tmem.server.metrics import METRICS
from tmem.server.pool import AdapterPool
from tmem.server.settings import Settings
from tmem.server.store import (
    CheckpointHeader,
    Job,
    KeyLayout,
    RateLimitCounters,
    RedisStore,
    StoredCheckpoint,
)
from tmem.server.store.verified import newest_verified, read_verified
from tmem.server.update_prep import UpdatePreparer

ASYNC = pytest.mark.asyncio(loop_scope="session")  # the store fixture lives on the session's loop
T = "acme"
HELLO = [{"role": "user", "content": "I moved to Lisbon."}, {"role": "assistant", "content": "Nice!"}]
HEADER = CheckpointHeader(a0="model@abc", spec=FastWeightSpec(rank=2), layers=[3], base_model="tiny")


# -- the key layout: existing data must still load ----------------------------------------------------
def test_the_key_names_are_the_ones_existing_data_uses() -> None:
    keys = KeyLayout("tmem")
    assert keys.session("default", "alice", "meta") == "tmem:{default:alice}:meta"
    assert keys.checkpoint("default", "alice", 12) == "tmem:{default:alice}:ckpt:12"
    assert keys.session_pattern("default", "a*") == "tmem:{default:a\\*}:*"
    assert keys.tenant_sessions("acme") == "tmem:tenant:{acme}:sessions"
    assert keys.a0("model@abc") == "tmem:a0v2:model@abc"
    assert (keys.jobs_stream, keys.workers_group, keys.dead_letters) == ("tmem:jobs", "tmem:workers", "tmem:jobs:dead")
    assert keys.update_budget("acme", 29_000_000) == "tmem:update-budget:{acme}:29000000"
    assert keys.rate_limit("tok", "k1", 29_000_000) == "tmem:rl:tok:{k1}:29000000"


@ASYNC
async def test_a_session_s_life_writes_exactly_the_keys_of_the_layout(store: RedisStore) -> None:
    p = store.prefix
    await store.ensure_session(T, "s")
    await store.append_turns(T, "s", HELLO, "req-1", enqueue="turn")
    await store.add_teach_pairs(T, "s", [{"instruction": "Where?", "output": "Lisbon"}])
    snap = await store.claim_snapshot(T, "s")
    await store.commit_update(T, "s", snap, checkpoint=b"B", sha256=hashlib.sha256(b"B").hexdigest(), summary="S",
                              job_id="j", memories=[{"instruction": "Where?", "output": "Lisbon"}])
    await store.add_teach_pairs(T, "s", [{"instruction": "Who?", "output": "Ann"}])
    assert await store.acquire_session_lock(T, "s", "w1", 60_000)
    await store.put_a0("model@abc", b"A0")
    assert await store.jobs.take_update_budget(T, 5)
    await store.rate_limits.count_request("k1")
    found = {k.decode() async for k in store.client.scan_iter(match=f"{p}:*", count=1000)}
    session = f"{p}:{{{T}:s}}"
    assert {k for k in found if not k.startswith((f"{p}:update-budget:", f"{p}:rl:"))} == {
        f"{session}:meta", f"{session}:turns", f"{session}:teach", f"{session}:memories", f"{session}:ckpt:1",
        f"{session}:idem:req-1", f"{session}:idem", f"{session}:lock", f"{session}:keys",
        f"{p}:tenant:{{{T}}}:sessions", f"{p}:a0v2:model@abc", f"{p}:jobs",
    }
    minute = [k for k in found if k.startswith(f"{p}:update-budget:")]
    window = [k for k in found if k.startswith(f"{p}:rl:")]
    assert [k.rsplit(":", 1)[0] for k in minute] == [f"{p}:update-budget:{{{T}}}"]
    assert [k.rsplit(":", 1)[0] for k in window] == [f"{p}:rl:req:{{k1}}"]


# -- checkpoint records --------------------------------------------------------------------------------
@ASYNC
async def test_a_committed_checkpoint_reads_back_as_its_record(store: RedisStore) -> None:
    await store.ensure_session(T, "s")
    data = bytes(range(256))
    snap = await store.claim_snapshot(T, "s")
    await store.commit_update(T, "s", snap, checkpoint=data, sha256=hashlib.sha256(data).hexdigest(), summary=None,
                              job_id="j")
    stored = await store.get_checkpoint(T, "s", 1)
    assert stored is not None
    assert (stored.version, stored.data, stored.sha256) == (1, data, hashlib.sha256(data).hexdigest())
    raw = await store.client.hgetall(store.keys.checkpoint(T, "s", 1))
    assert set(raw) == {b"data", b"sha256", b"created_at"}  # the fields the commit script writes
    assert float(raw[b"created_at"]) == stored.created_at
    assert await store.get_checkpoint(T, "s", 2) is None
    assert StoredCheckpoint.from_hash(3, {b"sha256": b"x"}) is None  # no bytes: not a checkpoint


def test_the_header_round_trips_through_safetensors_metadata() -> None:
    checkpoint = encode_b({"w": torch.ones(2, 2)}, HEADER.to_metadata())
    assert CheckpointHeader.from_metadata(read_metadata(checkpoint.data)) == HEADER


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("a0", None, "lacks 'a0'"),
    ("spec", '{"rank": 0}', "unreadable"),
    ("layers", "[3", "unreadable"),
    ("layers", '["3"]', "list of layer indices"),
])
def test_a_broken_header_is_refused_with_what_is_wrong(field: str, value: str | None, problem: str) -> None:
    metadata = HEADER.to_metadata()
    if value is None:
        del metadata[field]
    else:
        metadata[field] = value
    with pytest.raises(ValueError, match=problem):
        CheckpointHeader.from_metadata(metadata)


# -- the newest version that verifies: one rule for the pool and the worker -------------------------------
def b_of(value: float) -> dict[str, torch.Tensor]:
    return {"model.layers.3.mlp.down_proj": torch.full((4, 2), value)}


async def store_versions(store: RedisStore, sid: str, *values: float) -> None:
    await store.ensure_session(T, sid)
    await store.put_a0(HEADER.a0, save_tensors({"model.layers.3.mlp.down_proj": torch.zeros(2, 8)}))
    for value in values:
        checkpoint = encode_b(b_of(value), HEADER.to_metadata())
        snap = await store.claim_snapshot(T, sid)
        await store.commit_update(T, sid, snap, checkpoint=checkpoint.data, sha256=checkpoint.sha256, summary=None,
                                  job_id=f"j{value}")


async def corrupt(store: RedisStore, sid: str, version: int) -> None:
    key = store.keys.checkpoint(T, sid, version)
    data = bytearray(await store.client.hget(key, "data"))
    data[-3] ^= 0xFF  # the sha256 no longer matches
    await store.client.hset(key, "data", bytes(data))


def faults() -> float:
    return METRICS.registry.get_sample_value("tmem_checkpoint_faults_total") or 0.0


@ASYNC
async def test_a_corrupt_newest_version_is_skipped_and_counted(store: RedisStore) -> None:
    await store_versions(store, "s", 1.0, 2.0)
    await corrupt(store, "s", 2)
    before = faults()
    found = await newest_verified(T, "s", 2, lambda v: read_verified(store, T, "s", v))
    assert found is not None and found.version == 1 and found.header == HEADER
    assert torch.equal(found.b["model.layers.3.mlp.down_proj"], torch.full((4, 2), 1.0))
    assert faults() == before + 1
    with pytest.raises(CheckpointError, match="sha256"):
        await read_verified(store, T, "s", 2)


@ASYNC
async def test_missing_versions_are_passed_over_and_none_left_means_the_base_model(store: RedisStore) -> None:
    await store_versions(store, "s", 1.0)
    asked: list[int] = []

    async def load(version: int) -> Any:
        asked.append(version)
        return await read_verified(store, T, "s", version)

    found = await newest_verified(T, "s", 3, load)  # versions 3 and 2 are not stored
    assert found is not None and found.version == 1 and asked == [3, 2, 1]
    await corrupt(store, "s", 1)
    assert await newest_verified(T, "s", 1, lambda v: read_verified(store, T, "s", v)) is None


class FakeEngine:
    def __init__(self) -> None:
        self.loaded: dict[int, str] = {}

    async def add_lora(self, lora: Any) -> None:
        self.loaded[lora.lora_int_id] = lora.lora_name

    async def remove_lora(self, lora_id: int) -> None:
        del self.loaded[lora_id]


@ASYNC
async def test_the_pool_serves_the_version_the_worker_trains_from(
        store: RedisStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await store_versions(store, "s", 1.0, 2.0, 3.0)
    await corrupt(store, "s", 3)
    written: list[float] = []
    monkeypatch.setattr(pool_module, "write_peft_dir", lambda path, spec, layers, a0, b, base: (
        path.mkdir(parents=True), written.append(float(b["model.layers.3.mlp.down_proj"][0, 0]))))
    pool = AdapterPool(FakeEngine(), store, adapter_dir=tmp_path, base_model="tiny")
    lease = await pool.lease(T, "s", 3)
    served = lease.served_version
    await lease.release()

    runtime = SimpleNamespace(fast=SimpleNamespace(check_b=lambda b: None), zero_b=lambda: b_of(0.0))
    preparer = UpdatePreparer(store, runtime, None, Settings())  # type: ignore[arg-type]
    job = Job(stream_id="0-1", job_id="j", tenant=T, sid="s", reason="turn", force=False, enqueued_at=0.0)
    b = await preparer.current_b(job, 3)
    assert served == 2 and written == [2.0]
    assert torch.equal(b["model.layers.3.mlp.down_proj"], torch.full((4, 2), 2.0))


@ASYNC
async def test_the_worker_passes_over_a_version_shaped_for_another_model(store: RedisStore) -> None:
    await store_versions(store, "s", 1.0, 2.0)

    def check_b(b: dict[str, torch.Tensor]) -> None:
        if float(b["model.layers.3.mlp.down_proj"][0, 0]) == 2.0:
            raise ValueError("B does not match the fast-weight spec")

    runtime = SimpleNamespace(fast=SimpleNamespace(check_b=check_b), zero_b=lambda: b_of(0.0))
    preparer = UpdatePreparer(store, runtime, None, Settings())  # type: ignore[arg-type]
    job = Job(stream_id="0-1", job_id="j", tenant=T, sid="s", reason="turn", force=False, enqueued_at=0.0)
    assert float((await preparer.current_b(job, 2))["model.layers.3.mlp.down_proj"][0, 0]) == 1.0
    assert float((await preparer.current_b(job, 0))["model.layers.3.mlp.down_proj"][0, 0]) == 0.0  # B = 0


# -- rate-limit counters ------------------------------------------------------------------------------
@ASYNC
async def test_requests_are_counted_per_key_in_an_expiring_window(store: RedisStore) -> None:
    counters = store.rate_limits
    counts = [(await counters.count_request("k1"))[0] for _ in range(3)]
    other, window = await counters.count_request("k2")
    assert counts == [1, 2, 3] and other == 1
    assert window.key == counters.window("req", "k2").key and 0 < window.retry_after_s <= 60
    assert 60 <= await store.client.ttl(window.key) <= 120  # outlives its window, then goes


@ASYNC
async def test_tokens_are_held_only_when_they_fit_and_settled_to_what_was_used(store: RedisStore) -> None:
    counters = store.rate_limits
    first = await counters.reserve_tokens("k1", 70, 100)
    refused = await counters.reserve_tokens("k1", 40, 100)
    assert first.granted and not refused.granted
    assert int(await store.client.get(first.window.key)) == 70  # the refusal counted nothing
    await counters.settle_tokens(first, 25)  # the reply used 25 of the 70 it held
    assert int(await store.client.get(first.window.key)) == 25
    await counters.settle_tokens(refused, 0)  # a refused hold has nothing to give back
    assert int(await store.client.get(first.window.key)) == 25
    await store.client.delete(first.window.key)  # the window expired before the request ended
    await counters.settle_tokens(first, 90)
    assert await store.client.exists(first.window.key) == 0  # not charged to a window that is gone


@ASYNC
async def test_counters_share_one_window_across_replicas(store: RedisStore) -> None:
    other_replica = RateLimitCounters(store.client, KeyLayout(store.prefix))
    results = await asyncio.gather(*(c.reserve_tokens("k1", 30, 100) for c in [store.rate_limits, other_replica] * 3))
    assert sum(r.granted for r in results) == 3  # 3 x 30 fit under 100, a fourth does not, whichever replica asks
