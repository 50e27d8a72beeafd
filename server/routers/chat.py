"""POST /v1/chat/completions — OpenAI-compatible, with an optional session (X-Session-ID)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tmem.server.deps import ServicesDep, TurnDep
from tmem.server.errors import ERROR_RESPONSES, error_chunk
from tmem.server.protocol import SSE_DONE, ChatCompletionChunk, ChatCompletionRequest, sse_event

router = APIRouter(responses=ERROR_RESPONSES)
VERSION_HEADER = "X-TMEM-Adapter-Version"
DELIVERY_SETTLE_S = 0.005  # delays only the end of a reply ([DONE]), once per request


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, services: ServicesDep, ctx: TurnDep, request: Request
) -> JSONResponse | StreamingResponse:
    if body.stream:
        chunks, version = await services.chat.stream(body, ctx, _connected(request))
        return StreamingResponse(
            _sse(chunks, request),
            media_type="text/event-stream",
            headers={VERSION_HEADER: str(version), "Cache-Control": "no-cache"},
        )
    response, version = await services.chat.complete(body, ctx, _connected(request))
    return JSONResponse(response.model_dump(exclude_none=True), headers={VERSION_HEADER: str(version)})


def _connected(request: Request) -> Callable[[], Awaitable[bool]]:
    """Whether the client is still there; the chat service asks before it stores a delivered turn."""

    async def connected() -> bool:
        # A reset that reached the socket before the last write is reported to the app only a few loop
        # turns later (read error, then connection_lost, then the receive event), and is_disconnected()
        # itself looks for just two turns: let the loop run briefly first, so such a client is seen.
        await asyncio.sleep(DELIVERY_SETTLE_S)
        return not await request.is_disconnected()

    return connected


async def _sse(chunks: AsyncGenerator[ChatCompletionChunk, None], request: Request) -> AsyncIterator[str]:
    """SSE framing; an error after the first byte becomes an error event followed by [DONE].

    A client that has gone stops the generation: closing `chunks` aborts the engine request, and the
    turn, never delivered, is not stored.
    """
    try:
        async for chunk in chunks:
            if await request.is_disconnected():
                return
            yield sse_event(chunk)
    except Exception as exc:
        yield error_chunk(exc)
    finally:
        await chunks.aclose()
    yield SSE_DONE
