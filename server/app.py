"""The FastAPI application and the lifespan that starts Redis, the engine, the pool and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from tmem import __version__
from tmem.server.asgi import HttpMiddleware
from tmem.server.auth import KeyRing, RateLimiter, StartupRefused, refuse_open_exposure
from tmem.server.chat import ChatService
from tmem.server.deps import Auth, Services
from tmem.server.engine import Engine
from tmem.server.errors import RequestIdMiddleware, ServiceUnavailable, install_error_handlers, register_exception
from tmem.server.generation import EngineGenerator
from tmem.server.lifecycle import SessionLifecycle
from tmem.server.limits import BodySizeLimit, HostAllowList, allowed_hosts
from tmem.server.metrics import METRICS
from tmem.server.pool import AdapterPool
from tmem.server.redis_proc import PrivateRedis
from tmem.server.routers import chat, sessions, system
from tmem.server.sessions import SessionService
from tmem.server.settings import Settings
from tmem.server.store import RedisStore, StoreFull, StoreLimits, StoreUnavailable
from tmem.server.store.refusals import register_store_errors
from tmem.server.trainer_runtime import TrainerRuntime
from tmem.server.worker import UpdateWorker

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """An app whose lifespan owns every resource; nothing is started at import time.

    Raises StartupRefused for a configuration that must not serve (bad key file, open on a reachable host).
    """
    keys = _key_ring(settings)
    refuse_open_exposure(settings, keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _running(app, settings, keys):
            yield

    app = FastAPI(title="TMEM server", version=__version__, lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(HostAllowList, hosts=allowed_hosts(settings))  # outside the body limit: no body read
    app.add_middleware(RequestIdMiddleware)
    if not keys.enabled:
        log.warning("NO API KEYS CONFIGURED: the server is open to anyone who can reach it "
                    "(set TMEM_API_KEYS or --api-keys-file; --require-auth refuses to start without keys)")
    app.add_middleware(RequestCounter)
    install_error_handlers(app)
    register_exception(StoreUnavailable, _store_unavailable)
    register_exception(StoreFull, _store_full)
    register_store_errors()
    for module in (chat, sessions, system):
        app.include_router(module.router)
    app.openapi = _without_422(app.openapi)  # type: ignore[method-assign]
    return app


def _key_ring(settings: Settings) -> KeyRing:
    try:
        return KeyRing.from_settings(settings)
    except (OSError, ValueError) as exc:  # the messages name the entry, never a key
        raise StartupRefused(f"API keys: {exc}") from exc


def _store_unavailable(exc: StoreUnavailable) -> ServiceUnavailable:
    METRICS.store_errors.inc()
    return ServiceUnavailable("session storage (Redis) is unavailable; retry shortly", retry_after=2,
                              code="store_unavailable")


def _store_full(exc: StoreFull) -> ServiceUnavailable:
    # Not the client's fault and not a bug: Redis refuses writes at maxmemory until an operator frees room.
    METRICS.store_errors.inc()
    return ServiceUnavailable("session storage (Redis) is out of memory; retry later (the operator must raise "
                              "its maxmemory or free space)", retry_after=30, code="store_full")


def _without_422(build: Any) -> Any:
    """FastAPI documents 422 for validation errors; this server answers them with OpenAI's 400."""

    def openapi() -> dict[str, Any]:
        spec: dict[str, Any] = build()
        for operations in spec.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        return spec

    return openapi


class RequestCounter(HttpMiddleware):
    """Counts requests by route template and status."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = {"code": 500}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The route template, not the raw path: session ids must not become metric labels.
            route = getattr(scope.get("route"), "path", "unmatched")
            METRICS.requests.labels(route, str(status["code"])).inc()


@asynccontextmanager
async def _running(app: FastAPI, settings: Settings, keys: KeyRing) -> AsyncIterator[None]:
    private = None
    redis_url = settings.redis_url
    if redis_url is None:
        private = PrivateRedis(settings.redis_data_dir).start()
        redis_url = private.url
        log.info("started a private redis-server at %s (data in %s)", private.address, private.data_dir)
    store = RedisStore.from_url(redis_url, prefix=settings.redis_prefix, limits=StoreLimits.from_settings(settings))
    engine = Engine.start(settings)
    worker_task: asyncio.Task[None] | None = None
    worker: UpdateWorker | None = None
    try:
        await store.jobs.ensure_group()
        pool = AdapterPool(engine, store, settings.adapter_dir, settings.model_name, settings.max_resident_adapters)
        limiter = RateLimiter(store.rate_limits, settings.rate_limit_rpm, settings.rate_limit_tpm)
        lifecycle = SessionLifecycle(store, pool, engine.tokenizer, settings)
        chat_service = ChatService(engine, lifecycle, pool, settings, limiter)
        session_service = SessionService(lifecycle, store, pool, settings)
        if settings.worker == "inline":
            runtime = await asyncio.to_thread(TrainerRuntime.load, settings)
            generator = EngineGenerator(engine, pool, settings.extraction_structured)
            worker = UpdateWorker(store, runtime, generator, settings)
            worker_task = asyncio.create_task(worker.run(), name="tmem-update-worker")
        app.state.services = Services(settings, Auth(keys, limiter), chat_service, session_service, pool, store)
        log.info(
            "TMEM server ready: model=%s policy=%s worker=%s",
            settings.model_name,
            settings.update_policy,
            settings.worker,
        )
        yield
    finally:
        if worker is not None and worker_task is not None:
            worker.stop()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(worker_task, timeout=30)
        engine.shutdown()
        await store.aclose()
        if private is not None:
            private.stop()
