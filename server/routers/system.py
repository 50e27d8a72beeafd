"""GET /v1/models, /health, /metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response

from tmem.server.deps import ServicesDep, get_tenant
from tmem.server.errors import ERROR_RESPONSES
from tmem.server.metrics import METRICS
from tmem.server.protocol import ModelCard, ModelList
from tmem.server.store import StoreUnavailable

router = APIRouter(responses=ERROR_RESPONSES)
_STARTED = int(time.time())


@router.get("/v1/models", dependencies=[Depends(get_tenant)])
async def list_models(services: ServicesDep) -> ModelList:
    return ModelList(data=[ModelCard(id=services.settings.model_name, created=_STARTED, owned_by="tmem")])


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, object]:
    """ok when the engine and Redis answer; `degraded` (still 200) when only stateless serving works."""
    try:
        redis_ok = await services.store.ping()
    except StoreUnavailable:
        redis_ok = False
    return {"status": "ok" if redis_ok else "degraded", "redis": redis_ok, "model": services.settings.model_name}


@router.get("/metrics")
async def metrics() -> Response:
    return Response(METRICS.render(), media_type="text/plain; version=0.0.4")
