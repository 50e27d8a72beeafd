"""/v1/sessions/{id}: info, messages (ingest), memories (teach and list), flush, adapter, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import Response

from tmem.server.deps import SessionIdDep, SessionServiceDep, TenantDep
from tmem.server.errors import ERROR_RESPONSES
from tmem.server.session_protocol import (
    DeleteResponse,
    FlushRequest,
    FlushResponse,
    MemoryList,
    SessionInfo,
    SessionMessagesRequest,
    TeachRequest,
)
from tmem.server.sessions import session_info

router = APIRouter(prefix="/v1/sessions", responses=ERROR_RESPONSES)


@router.get("/{session_id}")
async def get_session(session_id: SessionIdDep, tenant: TenantDep, svc: SessionServiceDep) -> SessionInfo:
    return session_info(await svc.get(tenant, session_id))


@router.post("/{session_id}/messages")
async def ingest(
    session_id: SessionIdDep,
    body: SessionMessagesRequest,
    tenant: TenantDep,
    svc: SessionServiceDep,
    idempotency_key: Annotated[str | None, Header()] = None,
) -> SessionInfo:
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    return session_info(await svc.ingest(tenant, session_id, messages, idempotency_key))


@router.post("/{session_id}/memories")
async def teach(session_id: SessionIdDep, body: TeachRequest, tenant: TenantDep, svc: SessionServiceDep) -> SessionInfo:
    pairs = [{"instruction": p.instruction, "output": p.output} for p in body.pairs]
    return session_info(await svc.teach(tenant, session_id, pairs))


@router.get("/{session_id}/memories")
async def list_memories(session_id: SessionIdDep, tenant: TenantDep, svc: SessionServiceDep) -> MemoryList:
    return MemoryList(data=await svc.memories(tenant, session_id))


@router.post("/{session_id}/flush")
async def flush(
    session_id: SessionIdDep, tenant: TenantDep, svc: SessionServiceDep, body: FlushRequest | None = None
) -> FlushResponse:
    state = await svc.flush(tenant, session_id, body.timeout if body else None)
    return FlushResponse(id=session_id, adapter_version=state.adapter_version)


@router.get("/{session_id}/adapter")
async def download_adapter(session_id: SessionIdDep, tenant: TenantDep, svc: SessionServiceDep) -> Response:
    archive, version = await svc.adapter_archive(tenant, session_id)
    headers = {
        "X-TMEM-Adapter-Version": str(version),
        "Content-Disposition": f'attachment; filename="adapter-v{version}.tar.gz"',
    }
    return Response(archive, media_type="application/gzip", headers=headers)


@router.delete("/{session_id}")
async def delete_session(session_id: SessionIdDep, tenant: TenantDep, svc: SessionServiceDep) -> DeleteResponse:
    await svc.delete(tenant, session_id)
    return DeleteResponse(id=session_id)
