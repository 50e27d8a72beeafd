"""Issue 12 items 1, 8, 9, 10 at the HTTP edge: the real app, its real dependencies and a real redis-server.

The chat service is a small fake (no engine): it answers, streams, fails or waits on command, and reports
usage the way ChatService does (`limiter.add_tokens`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from redis_fixture import RedisServer

from tmem.server.app import create_app
from tmem.server.auth import KeyRing, StartupRefused
from tmem.server.deps import Auth, Services
from tmem.server.errors import InvalidRequest
from tmem.server.protocol import ChatCompletionChunk, ChatCompletionResponse
from tmem.server.settings import Settings
from tmem.server.store import KeyLayout, RateLimitCounters, RedisStore

pytestmark = pytest.mark.asyncio(loop_scope="session")

ALICE, ALICE2 = "alice-key-0123456789abcdef", "alice-second-key-0123456789"
BOB, SERVICE = "bob-key-0123456789abcdefgh", "service-key-0123456789abcd"
KEYS = (f"alice={ALICE}", f"alice={ALICE2}", f"bob={BOB}", f"*={SERVICE}")
CHAT = "/v1/chat/completions"
HELLO = {"messages": [{"role": "user", "content": "hi"}]}


@dataclass
class FakeChat:
    """Stands in for ChatService: `usage` is reported on delivery; `gate` holds a reply; `fail_mid` cuts a stream."""

    limiter: Any = None
    usage: tuple[int, int] = (10, 5)
    gate: asyncio.Event | None = None
    fail_mid: bool = False
    refuse: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def complete(self, body: Any, ctx: Any, *_: Any) -> tuple[ChatCompletionResponse, int]:
        if self.refuse:  # what prepare() does for a bad request, before the engine runs
            raise InvalidRequest("messages must contain at least one user or assistant message", param="messages")
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        await self.limiter.add_tokens(ctx.tenant, sum(self.usage))
        return ChatCompletionResponse.build(ctx.request_id, "m", "ok", "stop", *self.usage), 0

    async def stream(self, body: Any, ctx: Any, *_: Any) -> tuple[AsyncIterator[ChatCompletionChunk], int]:
        async def chunks() -> AsyncIterator[ChatCompletionChunk]:
            yield ChatCompletionChunk.build(ctx.request_id, "m", role="assistant")
            yield ChatCompletionChunk.build(ctx.request_id, "m", content="partial")
            if self.fail_mid:
                raise RuntimeError("engine died mid-stream")
            yield ChatCompletionChunk.build(ctx.request_id, "m", finish_reason="stop")
            await self.limiter.add_tokens(ctx.tenant, sum(self.usage))

        return chunks(), 0


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def redis_client(redis_srv: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_srv.url)
    yield client
    await client.aclose()


def build(redis_client: aioredis.Redis | None = None, chat: FakeChat | None = None, **overrides: Any) -> Any:
    """The real app with fake services installed (its lifespan, which starts the engine, never runs)."""
    from tmem.server.auth import RateLimiter

    settings = Settings(**{"api_keys": KEYS, "redis_prefix": f"t{uuid.uuid4().hex[:8]}", **overrides})
    app = create_app(settings)
    counters = None if redis_client is None else RateLimitCounters(redis_client, KeyLayout(settings.redis_prefix))
    limiter = RateLimiter(counters, settings.rate_limit_rpm, settings.rate_limit_tpm)
    chat = chat or FakeChat()
    chat.limiter = limiter
    auth = Auth(KeyRing.from_settings(settings), limiter)
    app.state.services = Services(settings, auth, chat, sessions=None, pool=None, store=object())  # type: ignore[arg-type]
    return app


def client(app: Any, host: str = "127.0.0.1:8000") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=f"http://{host}")


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


async def tokens_used(redis_client: aioredis.Redis, app: Any) -> int:
    prefix = app.state.services.auth.limiter.counters.keys.prefix
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:rl:tok:*")]
    return sum([int(await redis_client.get(k) or 0) for k in keys])


# -- item 1: open by default, DNS rebinding ----------------------------------------------------------------
async def test_unknown_host_gets_a_400_in_openai_shape_on_loopback() -> None:
    app = build()
    for good in ("127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST"):
        async with client(app, good) as c:
            assert (await c.get("/metrics")).status_code == 200, good
    async with client(app, "rebound.attacker.example:8000") as c:
        response = await c.get("/metrics")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_host", "Host")
    assert response.headers["x-request-id"]


async def test_reachable_bind_serves_any_host_unless_a_list_is_configured() -> None:
    async with client(build(host="0.0.0.0"), "tmem.internal:8000") as c:
        assert (await c.get("/metrics")).status_code == 200
    listed = build(host="0.0.0.0", allowed_hosts="tmem.example.com,*.tmem.example.com")
    for host, status in (("tmem.example.com", 200), ("eu.tmem.example.com", 200), ("evil.example", 400),
                         ("10.0.0.5:8000", 400)):
        async with client(listed, host) as c:
            assert (await c.get("/metrics")).status_code == status, host


async def test_open_server_on_a_reachable_host_refuses_to_start() -> None:
    with pytest.raises(StartupRefused, match="without API keys"):
        create_app(Settings(host="0.0.0.0"))
    assert create_app(Settings(host="0.0.0.0", allow_unauthenticated=True)).title == "TMEM server"
    assert create_app(Settings(host="127.0.0.1")).title == "TMEM server"


# -- item 8: cross-tenant key collision ---------------------------------------------------------------------
async def test_acme_and_acme_eu_can_no_longer_share_a_session(redis_srv: RedisServer) -> None:
    store = RedisStore.from_url(redis_srv.url, prefix="t-collide")
    try:
        # The collision this prevents: acme's `eu:s1` and acme:eu's `s1` are the same Redis keys.
        assert store.session_pattern("acme", "eu:s1") == store.session_pattern("acme:eu", "s1")
    finally:
        await store.aclose()
    with pytest.raises(StartupRefused, match="entry 2: a tenant name must be") as caught:
        create_app(Settings(api_keys=(f"acme={ALICE}", f"acme:eu={BOB}")))
    assert BOB not in str(caught.value) and ALICE not in str(caught.value)


# -- item 9: service keys ------------------------------------------------------------------------------------
async def test_service_key_may_only_generate_unrecorded_for_configured_tenants() -> None:
    app = build()
    worker = bearer(SERVICE, **{"X-TMEM-Tenant": "alice", "X-Session-ID": "s1", "X-TMEM-Record": "false"})
    async with client(app) as c:
        assert (await c.post(CHAT, json=HELLO, headers=worker)).status_code == 200
        refused = [
            await c.post(CHAT, json=HELLO, headers={**worker, "X-TMEM-Record": "true"}),  # would store a turn
            await c.post(CHAT, json=HELLO, headers={**worker, "X-TMEM-Tenant": "mallory"}),  # not configured
            await c.get("/v1/sessions/s1", headers=worker),
            await c.delete("/v1/sessions/s1", headers=worker),
            await c.post("/v1/sessions/s1/memories", headers=worker,
                         json={"pairs": [{"instruction": "q", "output": "a"}]}),
        ]
    assert [r.status_code for r in refused] == [403] * 5
    assert {r.json()["error"]["type"] for r in refused} == {"permission_error"}
    assert refused[0].json()["error"]["code"] == "service_key_scope"


# -- item 10: rate limits per key, atomic, reserved -----------------------------------------------------------
async def test_requests_are_limited_per_key(redis_client: aioredis.Redis) -> None:
    app = build(redis_client, rate_limit_rpm=1)
    async with client(app) as c:
        assert (await c.post(CHAT, json=HELLO, headers=bearer(ALICE))).status_code == 200
        assert (await c.post(CHAT, json=HELLO, headers=bearer(ALICE2))).status_code == 200  # same tenant, own key
        again = await c.post(CHAT, json=HELLO, headers=bearer(ALICE))
    assert again.status_code == 429 and again.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(again.headers["Retry-After"]) <= 60


async def test_max_tokens_are_reserved_at_admission_and_the_rest_refunded(redis_client: aioredis.Redis) -> None:
    chat = FakeChat(gate=asyncio.Event(), usage=(10, 5))
    app = build(redis_client, chat, rate_limit_tpm=100)
    async with client(app) as c:
        first = asyncio.create_task(c.post(CHAT, json={**HELLO, "max_tokens": 60}, headers=bearer(ALICE)))
        await asyncio.wait_for(chat.started.wait(), 10)
        assert await tokens_used(redis_client, app) == 60  # held while it generates
        second = await c.post(CHAT, json={**HELLO, "max_tokens": 60}, headers=bearer(ALICE))
        assert second.status_code == 429 and second.json()["error"]["code"] == "tokens_limit_exceeded"
        chat.gate.set()  # type: ignore[union-attr]
        assert (await first).status_code == 200
        assert await tokens_used(redis_client, app) == 15  # what it used: 10 prompt + 5 completion
        chat.gate = None
        third = await c.post(CHAT, json={**HELLO, "max_completion_tokens": 85}, headers=bearer(ALICE))
        assert third.status_code == 200
        assert await tokens_used(redis_client, app) == 30


async def test_a_stream_cut_short_is_charged_and_a_refused_request_is_not(redis_client: aioredis.Redis) -> None:
    chat = FakeChat(fail_mid=True)
    app = build(redis_client, chat, rate_limit_tpm=1000)
    async with client(app) as c:
        cut = await c.post(CHAT, json={**HELLO, "max_tokens": 40, "stream": True}, headers=bearer(ALICE))
        assert cut.status_code == 200 and '"error"' in cut.text and cut.text.rstrip().endswith("data: [DONE]")
        assert await tokens_used(redis_client, app) == 40  # never reported its usage: it keeps what it held
        chat.fail_mid = False
        whole = await c.post(CHAT, json={**HELLO, "max_tokens": 40, "stream": True}, headers=bearer(ALICE))
        assert whole.status_code == 200 and '"error"' not in whole.text
        assert await tokens_used(redis_client, app) == 40 + 15
        chat.refuse = True
        bad = await c.post(CHAT, json={**HELLO, "max_tokens": 40}, headers=bearer(ALICE))
        assert bad.status_code == 400
        invalid = await c.post(CHAT, json={**HELLO, "max_tokens": 0}, headers=bearer(ALICE))
        assert invalid.status_code == 400
        assert "more error" not in invalid.json()["error"]["message"]  # the body is validated once
    assert await tokens_used(redis_client, app) == 55  # refused before generating: refunded


async def test_a_cancelled_request_keeps_its_reservation(redis_client: aioredis.Redis) -> None:
    """A client that disconnects cancels the request: it is charged what it held, not nothing."""
    from tmem.server.auth import Caller, RateLimiter

    prefix = f"t{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(RateLimitCounters(redis_client, KeyLayout(prefix)), 0, 500)
    entered = asyncio.Event()

    async def serve() -> None:
        async with limiter.reservation(Caller("alice", "k1"), 120):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(serve())
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:rl:tok:*")]
    assert len(keys) == 1 and int(await redis_client.get(keys[0])) == 120
    assert 0 < await redis_client.ttl(keys[0]) <= 120


class _DropsBetweenCommands:
    """A client whose connection is lost after each INCR: a separate EXPIRE never arrives."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def expire(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("connection lost")


async def test_request_counter_always_expires(redis_client: aioredis.Redis) -> None:
    """INCR and EXPIRE are one script: a counter without expiry would lock its key out for good."""
    from tmem.server.auth import Caller, RateLimiter

    prefix = f"t{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(RateLimitCounters(_DropsBetweenCommands(redis_client), KeyLayout(prefix)), 5, 0)  # type: ignore[arg-type]
    for _ in range(3):
        await limiter.admit(Caller("alice", "k1"))
    keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:rl:req:*")]
    assert len(keys) == 1 and int(await redis_client.get(keys[0])) == 3
    assert 0 < await redis_client.ttl(keys[0]) <= 120
