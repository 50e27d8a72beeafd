"""Request-scoped dependencies: the services, the caller's tenant, the validated session id."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Path, Request

from tmem.server.auth import Caller, KeyRing, RateLimiter, service_may
from tmem.server.chat import ChatService, TurnContext
from tmem.server.errors import Forbidden, InvalidRequest, ServiceUnavailable
from tmem.server.limits import completion_budget
from tmem.server.pool import AdapterPool
from tmem.server.sessions import SessionService
from tmem.server.settings import Settings
from tmem.server.store import RedisStore

# Letters, digits and . _ : - ; never a path: ids only ever reach Redis keys and digests.
SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_:\-][A-Za-z0-9._:\-]{0,127}$")


@dataclass
class Auth:
    """Who may call (the API keys) and how much (the rate limiter)."""

    keys: KeyRing
    limiter: RateLimiter


@dataclass
class Services:
    """What the routes serve with; the lifespan puts it on `app.state.services` once everything is up."""

    settings: Settings
    auth: Auth
    chat: ChatService
    sessions: SessionService
    pool: AdapterPool
    store: RedisStore


def validate_session_id(value: str | None, param: str = "X-Session-ID") -> str:
    """Return the id if it is 1–128 chars of [A-Za-z0-9._:-] not starting with '.', else a 400."""
    if value is None or not SESSION_ID_RE.fullmatch(value):
        raise InvalidRequest(
            "session id must be 1-128 characters of letters, digits and . _ : - (not starting with '.')",
            param=param,
            code="invalid_session_id",
        )
    return value


def get_services(request: Request) -> Services:
    """The app's services (503 while the server is still starting): the one way routes reach them."""
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise ServiceUnavailable("the server is still starting", retry_after=5)
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_caller(request: Request, services: ServicesDep, authorization: Annotated[str | None, Header()] = None,
                     x_tmem_tenant: Annotated[str | None, Header()] = None,
                     x_tmem_record: Annotated[str | None, Header()] = None) -> Caller:
    """The caller from its API key (401 otherwise), counted against its key's rate limit (429)."""
    cached: Caller | None = getattr(request.state, "caller", None)
    if cached is not None:
        return cached
    auth = services.auth
    caller = auth.keys.caller(authorization, x_tmem_tenant)
    route = getattr(request.scope.get("route"), "path", "")
    if caller.service and not service_may(request.method, route, _recording(x_tmem_record)):
        raise Forbidden("a service key may only request unrecorded chat completions (X-TMEM-Record: false)",
                        code="service_key_scope")
    await auth.limiter.admit(caller)
    request.state.caller = caller
    return caller


async def get_tenant(caller: Annotated[Caller, Depends(get_caller)]) -> str:
    """The tenant whose sessions the request may touch."""
    return caller.tenant


def _recording(value: str | None) -> bool:
    """X-TMEM-Record: anything but false/0/no records the turn (the default)."""
    return (value or "true").strip().lower() not in ("false", "0", "no")


def path_session_id(session_id: Annotated[str, Path()]) -> str:
    return validate_session_id(session_id, param="session_id")


def header_session_id(x_session_id: Annotated[str | None, Header()] = None) -> str | None:
    return None if x_session_id is None else validate_session_id(x_session_id)


async def turn_context(
    request: Request,
    services: ServicesDep,
    caller: Annotated[Caller, Depends(get_caller)],
    session_id: Annotated[str | None, Depends(header_session_id)],
    x_tmem_record: Annotated[str | None, Header()] = None,
    x_tmem_adapter: Annotated[str | None, Header()] = None,
    x_tmem_context: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> AsyncIterator[TurnContext]:
    """The turn's context, with the caller's max_tokens held against its token limit until the reply ends."""
    ctx = _turn(request, caller.tenant, session_id, _recording(x_tmem_record), x_tmem_adapter, x_tmem_context,
                idempotency_key)
    budget = completion_budget(await _json_body(request), services.settings)
    async with services.auth.limiter.reservation(caller, budget):
        yield ctx


async def _json_body(request: Request) -> object:
    """The body FastAPI has already parsed (Starlette caches it); a second validation would double its errors."""
    try:
        return await request.json() if await request.body() else None
    except ValueError:
        return None  # not JSON: the route's own validation answers with the 400


def _turn(request: Request, tenant: str, session_id: str | None, record: bool, x_tmem_adapter: str | None,
          x_tmem_context: str | None, idempotency_key: str | None) -> TurnContext:
    use_adapter = (x_tmem_adapter or "on").strip().lower() not in ("off", "false", "0", "no")
    use_context = _context_header(x_tmem_context)
    request_id = getattr(request.state, "request_id", None)
    ctx = TurnContext(tenant=tenant, session_id=session_id, record=record, idempotency_key=idempotency_key,
                      use_adapter=use_adapter, use_context=use_context)
    if request_id:
        ctx.request_id = f"{request_id}-{ctx.request_id[:8]}"
    return ctx


def _context_header(value: str | None) -> bool:
    """X-TMEM-Context: `full` (default) serves with the stored turns and summary, `none` with the adapter alone."""
    mode = (value or "full").strip().lower()
    if mode not in ("full", "none"):
        raise InvalidRequest("X-TMEM-Context must be 'full' or 'none'", param="X-TMEM-Context",
                             code="invalid_header")
    return mode == "full"


def get_session_service(services: ServicesDep) -> SessionService:
    return services.sessions


TenantDep = Annotated[str, Depends(get_tenant)]
SessionIdDep = Annotated[str, Depends(path_session_id)]
TurnDep = Annotated[TurnContext, Depends(turn_context)]
SessionServiceDep = Annotated[SessionService, Depends(get_session_service)]
