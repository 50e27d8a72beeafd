"""The FastAPI application and the lifespan that starts Redis, the engine, the pool and the worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.chat import ChatService
from server.deps import Services
from server.engine import Engine
from server.errors import RequestIdMiddleware, ServiceUnavailable, install_error_handlers, register_exception
from server.generation import EngineGenerator
from server.pool import AdapterPool
from server.redis_proc import PrivateRedis
from server.routers import chat, sessions, system
from server.sessions import SessionService
from server.settings import Settings
from server.store import RedisStore, StoreUnavailable
from server.trainer_runtime import TrainerRuntime
from server.worker import UpdateWorker

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """An app whose lifespan owns every resource; nothing is started at import time."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _running(app, settings):
            yield

    app = FastAPI(title="TMEM server", version="0.1.0", lifespan=lifespan)
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    register_exception(
        StoreUnavailable,
        lambda exc: ServiceUnavailable(
            "session storage (Redis) is unavailable; retry shortly", retry_after=2, code="store_unavailable"
        ),
    )
    for module in (chat, sessions, system):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _running(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    private = None
    redis_url = settings.redis_url
    if redis_url is None:
        private = PrivateRedis(settings.redis_data_dir).start()
        redis_url = private.url
        log.info("started a private redis-server at %s (data in %s)", redis_url, private.data_dir)
    store = RedisStore.from_url(redis_url, prefix=settings.redis_prefix)
    engine = Engine.start(settings)
    worker_task: asyncio.Task[None] | None = None
    worker: UpdateWorker | None = None
    try:
        await store.ensure_group()
        pool = AdapterPool(engine, store, settings.adapter_dir, settings.model_name)
        chat_service = ChatService(engine, pool, store, settings)
        app.state.session_service = SessionService(store, pool, chat_service, settings)
        if settings.worker == "inline":
            runtime = await asyncio.to_thread(TrainerRuntime.load, settings)
            generator = EngineGenerator(engine, pool, settings.extraction_structured)
            worker = UpdateWorker(store, runtime, generator, settings)
            worker_task = asyncio.create_task(worker.run(), name="tmem-update-worker")
        app.state.services = Services(settings, chat_service, pool, store)
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
