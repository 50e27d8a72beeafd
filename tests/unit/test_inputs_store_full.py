"""Redis at maxmemory (noeviction) refuses writes with OOM: clients get a 503 with Retry-After, never a 500.

A real redis-server is shrunk to just above what it holds, then filled until it refuses; the store's
own calls must then raise StoreFull, and the app's one error mapper must answer it in OpenAI's shape.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import OutOfMemoryError

from tmem.server.app import create_app
from tmem.server.errors import to_http_error
from tmem.server.metrics import METRICS
from tmem.server.settings import Settings
from tmem.server.store import RedisStore, StoreFull, StoreUnavailable

pytestmark = pytest.mark.asyncio(loop_scope="session")
T = "acme"
TURN = [{"role": "user", "content": "I moved to Lisbon."}, {"role": "assistant", "content": "Nice!"}]


@pytest.fixture
async def full_store(store: RedisStore) -> AsyncIterator[RedisStore]:
    """A store with one existing session, on a Redis that has just refused a write for lack of memory."""
    await store.ensure_session(T, "s1")
    client = store.client
    for i in range(64):  # other data filled it (1 MB)...
        await client.set(f"{store.prefix}:fill:{i}", b"x" * 16_000)
    # ...past a maxmemory set below what it holds: noeviction frees nothing, so it stays full.
    await client.config_set("maxmemory-policy", "noeviction")
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used - 512_000)
    with pytest.raises(OutOfMemoryError):
        await client.set(f"{store.prefix}:one-more", b"x")
    yield store
    await client.config_set("maxmemory", 0)
    await client.flushdb()


async def test_a_write_at_maxmemory_is_store_full_not_a_bare_response_error(full_store: RedisStore) -> None:
    with pytest.raises(StoreFull, match="out of memory"):
        await full_store.append_turns(T, "s1", TURN)
    with pytest.raises(StoreFull):
        await full_store.ensure_session(T, "s2")
    # The worker rides out StoreUnavailable (backs off and retries): a full Redis is treated the same.
    assert issubclass(StoreFull, StoreUnavailable)


async def test_store_full_is_a_503_with_retry_after_in_openais_shape(full_store: RedisStore) -> None:
    create_app(Settings(_env_file=None))  # registers the app's mappings, as at start-up
    with pytest.raises(StoreFull) as caught:
        await full_store.append_turns(T, "s1", TURN)
    before = METRICS.registry.get_sample_value("tmem_store_unavailable_total") or 0.0
    response = to_http_error(caught.value).to_response()
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    error = json.loads(bytes(response.body))["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "store_full"
    assert "out of memory" in error["message"] and "maxmemory" in error["message"]
    assert METRICS.registry.get_sample_value("tmem_store_unavailable_total") == before + 1
