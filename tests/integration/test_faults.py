"""Faults survived with nothing lost: a worker killed mid-update (twice), a NaN update, Redis going away,
a server restart. Uses its own redis-server and a `tmem serve --worker off` with `tmem worker` processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers import greedy, session_info, write_version
from redis_fixture import RedisServer
from server_proc import ServerProcess, WorkerProcess

from tmem.server.settings import Settings
from tmem.server.store import RedisStore

pytestmark = pytest.mark.engine
FAST_LOCKS = ["--job-lock-ttl-ms", "1500", "--job-reclaim-idle-ms", "1000"]
PAIRS = [("What is my favorite color?", "Your favorite color is teal."), ("Where do I live?", "You live in Lisbon.")]


@pytest.fixture(scope="module")
def redis_faults(artifacts: Path) -> Iterator[RedisServer]:
    with RedisServer(data_dir=artifacts / "redis-faults") as server:
        yield server


@pytest.fixture(scope="module")
def api(tiny_model_dir: Path, redis_faults: RedisServer, artifacts: Path, server: ServerProcess
        ) -> Iterator[ServerProcess]:
    # Depends on the shared `server` so the two engines never start at once on 2 cores.
    with ServerProcess(tiny_model_dir, redis_faults.url, artifacts / "server-faults.log",
                       extra=["--worker", "off"]) as proc:
        yield proc


def worker(name: str, model: Path, redis_url: str, api: ServerProcess, artifacts: Path, *extra: str) -> WorkerProcess:
    return WorkerProcess(model, redis_url, api.url, artifacts / f"worker-{name}.log", [*FAST_LOCKS, *extra]).start()


def store_call(url: str, method: str, *args: Any) -> Any:
    async def go() -> Any:
        store = RedisStore.from_url(url)
        try:
            return await getattr(store, method)(*args)
        finally:
            await store.aclose()

    return asyncio.run(go())


def assert_versions_verify(redis_url: str, sid: str, skip: tuple[int, ...] = ()) -> list[int]:
    """Every stored version's checkpoint loads and matches its sha256 (bar ones corrupted on purpose)."""
    from tmem.adapters.checkpoint import decode_b

    versions = store_call(redis_url, "list_versions", "default", sid)
    for version in versions:
        if version not in skip:
            stored = store_call(redis_url, "get_checkpoint", "default", sid, version)
            assert decode_b(stored.data, stored.sha256)
    return list(versions)


def wait_for_lock(redis_url: str, sid: str, timeout_s: float = 60) -> None:
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.exists(f"tmem:{{default:{sid}}}:lock"):
            return
        time.sleep(0.05)
    raise AssertionError("the worker never started the update")


def teach(api: ServerProcess, sid: str) -> None:
    body = {"pairs": [{"instruction": q, "output": a} for q, a in PAIRS]}
    httpx.post(f"{api.url}/v1/sessions/{sid}/memories", json=body, timeout=30).raise_for_status()


def flush(api: ServerProcess, sid: str, timeout: float = 240) -> int:
    response = httpx.post(f"{api.url}/v1/sessions/{sid}/flush", json={"timeout": timeout}, timeout=timeout + 20)
    assert response.status_code == 200, response.text
    return int(response.json()["adapter_version"])


def test_worker_killed_mid_update_twice_then_the_job_completes_exactly_once(
        api, redis_faults, tiny_model_dir, artifacts, sid) -> None:
    turns = [{"role": "user", "content": "I moved to Lisbon last spring."}, {"role": "assistant", "content": "Nice!"}]
    httpx.post(f"{api.url}/v1/sessions/{sid}/messages", json={"messages": turns}, timeout=30).raise_for_status()
    teach(api, sid)
    for attempt in range(2):  # each of these would train for minutes: killed while it holds the session
        slow = worker(f"slow{attempt}", tiny_model_dir, redis_faults.url, api, artifacts, "--epochs", "100000")
        wait_for_lock(redis_faults.url, sid)
        slow.kill()
        assert session_info(api.url, sid)["adapter_version"] == 0
    survivor = worker("survivor", tiny_model_dir, redis_faults.url, api, artifacts)
    try:
        assert flush(api, sid) == 1
        info = session_info(api.url, sid)
        assert info["turns"] == 2 and info["pending_updates"] == 0
        stored = store_call(redis_faults.url, "get_turns", "default", sid)  # each with its token count too
        assert [{"role": t["role"], "content": t["content"]} for t in stored] == turns  # each turn once
        assert assert_versions_verify(redis_faults.url, sid) == [1]  # one update, one verified version
        # Served from the one committed version (the random model's own extracted pairs and summary
        # were trained too, so the taught answers are not checked word for word here; see test_serving).
        assert greedy(api.url, PAIRS[0][0], sid)[1] == 1
    finally:
        survivor.stop()


def test_nan_update_is_rejected_and_the_session_keeps_its_weights(api, redis_faults, tiny_model_dir,
                                                                  artifacts, sid) -> None:
    exploding = worker("nan", tiny_model_dir, redis_faults.url, api, artifacts, "--optimizer", "sgd", "--lr", "1e30")
    try:
        teach(api, sid)
        assert flush(api, sid) == 0  # absorbed, but no version was published
        info = session_info(api.url, sid)
        assert info["pending_updates"] == 0
        assert "update rejected" in (info["last_error"] or "")
        assert assert_versions_verify(redis_faults.url, sid) == []
        assert greedy(api.url, PAIRS[0][0], sid)[1] == 0
    finally:
        exploding.stop()


def test_redis_going_away_gives_503_for_sessions_and_stateless_still_works(api, redis_faults, sid) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    ok = httpx.post(f"{api.url}/v1/chat/completions", json=body, headers={"X-Session-ID": sid}, timeout=60)
    assert ok.status_code == 200
    redis_faults.stop()
    try:
        down = httpx.post(f"{api.url}/v1/chat/completions", json=body, headers={"X-Session-ID": sid}, timeout=60)
        assert down.status_code == 503
        assert down.json()["error"]["code"] == "store_unavailable"
        assert int(down.headers["Retry-After"]) >= 1
        assert httpx.get(f"{api.url}/v1/sessions/{sid}", timeout=30).status_code == 503
        stateless = httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=60)
        assert stateless.status_code == 200
        assert httpx.get(f"{api.url}/health", timeout=30).json()["status"] == "degraded"
        assert _metric(api, "tmem_store_unavailable_total") >= 2  # the two refused session requests
    finally:
        redis_faults.start()
    again = httpx.post(f"{api.url}/v1/chat/completions", json=body, headers={"X-Session-ID": sid}, timeout=60)
    assert again.status_code == 200
    assert session_info(api.url, sid)["turns"] == 4  # the turn acknowledged before the outage survived (AOF)
    turns = store_call(redis_faults.url, "get_turns", "default", sid)
    assert [t["content"] for t in turns if t["role"] == "user"] == ["hello", "hello"]  # each acknowledged turn once
    assert_versions_verify(redis_faults.url, sid)


def test_a_corrupted_checkpoint_is_refused_and_the_previous_version_served(
        api, redis_faults, tiny_model_dir, artifacts, sid) -> None:
    from tmem.server.trainer_runtime import TrainerRuntime

    runtime = TrainerRuntime.load(Settings(model=str(tiny_model_dir), a0_cache_dir=artifacts / "a0"))
    import torch

    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        write_version(redis_faults.url, sid, runtime,
                      {n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in runtime.zero_b().items()})
    client = redis.Redis.from_url(redis_faults.url)
    key = f"tmem:{{default:{sid}}}:ckpt:2"
    data = bytearray(client.hget(key, "data"))
    data[-3] ^= 0xFF  # one flipped bit-pattern in the tensor bytes: the sha256 no longer matches
    client.hset(key, "data", bytes(data))
    faults_before = _metric(api, "tmem_checkpoint_faults_total")

    _, version = greedy(api.url, "What do you remember?", sid)
    assert version == 1  # v2 is refused; the newest version that verifies is served
    assert _metric(api, "tmem_checkpoint_faults_total") == faults_before + 1

    # The next update builds on v1 (never on the corrupt v2) and publishes a verified v3.
    survivor = worker("after-corrupt", tiny_model_dir, redis_faults.url, api, artifacts)
    try:
        teach(api, sid)
        assert flush(api, sid) == 3
    finally:
        survivor.stop()
    assert assert_versions_verify(redis_faults.url, sid, skip=(2,)) == [1, 2, 3]
    assert greedy(api.url, PAIRS[0][0], sid)[1] == 3


def _metric(server: ServerProcess, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_new_server_process_on_the_same_redis_serves_the_same_version_and_output(
        api, redis_faults, tiny_model_dir, artifacts, sid) -> None:
    from tmem.server.trainer_runtime import TrainerRuntime

    runtime = TrainerRuntime.load(Settings(model=str(tiny_model_dir), a0_cache_dir=artifacts / "a0"))
    import torch

    gen = torch.Generator().manual_seed(3)
    b = {n: torch.randn(t.shape, generator=gen) * 0.05 for n, t in runtime.zero_b().items()}
    assert write_version(redis_faults.url, sid, runtime, b) == 1
    before = greedy(api.url, "What do you know about me?", sid)
    api.stop()
    restarted = ServerProcess(tiny_model_dir, redis_faults.url, artifacts / "server-restarted.log",
                              extra=["--worker", "off"]).start()
    try:
        assert greedy(restarted.url, "What do you know about me?", sid) == before
        assert before[1] == 1
    finally:
        restarted.stop()
