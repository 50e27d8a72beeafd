"""The asynchronous client: a thin ``httpx.AsyncClient`` shell over :mod:`tmem.client._core`.

It mirrors :mod:`tmem.client._sync` method for method; only the I/O calls are awaited.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from ._archive import save_adapter
from ._core import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Core,
    MessagesInput,
    PairsInput,
    Plan,
    RetryPolicy,
    adapter_plan,
    adapter_version_of,
    chat_plan,
    connection_error,
    delete_plan,
    error_for,
    flush_plan,
    health_plan,
    ingest_plan,
    memories_plan,
    models_plan,
    request_id_of,
    session_info_plan,
    teach_plan,
)
from ._streaming import ChunkDecoder
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    DeleteResult,
    FlushResult,
    HealthStatus,
    Memory,
    ModelList,
    SessionInfo,
)

T = TypeVar("T")


class AsyncChatStream:
    """A streamed chat completion: ``async for`` it for :class:`ChatCompletionChunk` objects.

    An error event raises the matching :class:`~client.errors.APIStatusError`. The response is
    closed when the stream is exhausted, raises, or is closed (``await close()`` or leaving an
    ``async with`` block)::

        async with await session.chat("Hi", stream=True) as stream:
            async for chunk in stream:
                print(chunk.delta_text, end="")
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.request_id = request_id_of(response)
        self.adapter_version = adapter_version_of(response)
        self._chunks = self._iter_chunks()

    def __aiter__(self) -> AsyncIterator[ChatCompletionChunk]:
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        return await self._chunks.__anext__()

    async def __aenter__(self) -> AsyncChatStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading and close the response; safe to call more than once."""
        await self._chunks.aclose()
        await self.response.aclose()

    async def _iter_chunks(self) -> AsyncGenerator[ChatCompletionChunk, None]:
        decoder = ChunkDecoder(self.request_id)
        try:
            async for line in self.response.aiter_lines():
                chunk = decoder.feed(line)
                if chunk is not None:
                    yield chunk
                if decoder.done:
                    return
            chunk = decoder.finish()
            if chunk is not None:
                yield chunk
        except httpx.TransportError as exc:
            raise connection_error(exc) from exc
        finally:
            await self.response.aclose()


class _AsyncChats:
    """The overloaded ``chat`` of the async client and of its sessions, written once (as in the sync client)."""

    def _chat_route(self) -> tuple[AsyncTMEMClient, str | None]:
        """The client that sends the chat, and the session it belongs to (None: stateless)."""
        raise NotImplementedError

    @overload
    async def chat(self, messages: MessagesInput, stream: Literal[False] = False, **params: Any) -> ChatCompletion: ...
    @overload
    async def chat(self, messages: MessagesInput, stream: Literal[True], **params: Any) -> AsyncChatStream: ...
    @overload
    async def chat(self, messages: MessagesInput, stream: bool, **params: Any) -> ChatCompletion | AsyncChatStream: ...
    async def chat(
        self, messages: MessagesInput, stream: bool = False, **params: Any
    ) -> ChatCompletion | AsyncChatStream:
        """A chat completion, in the session or stateless on the client; see :meth:`client.TMEMClient.chat`."""
        client, session_id = self._chat_route()
        return await client._chat(messages, stream, session_id, params)


class AsyncSession(_AsyncChats):
    """One server-side session and its adapter; get it from :meth:`AsyncTMEMClient.session`."""

    def __init__(self, client: AsyncTMEMClient, session_id: str) -> None:
        self._client = client
        self.id = session_id

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"

    def _chat_route(self) -> tuple[AsyncTMEMClient, str | None]:
        return self._client, self.id

    async def ingest(self, messages: MessagesInput) -> SessionInfo:
        """Add messages to the session without asking for a reply."""
        return await self._client._request(ingest_plan(self.id, messages))

    async def teach(self, pairs: PairsInput) -> SessionInfo:
        """Teach question-answer pairs directly (QAPair, ``(question, answer)`` tuples or dicts)."""
        return await self._client._request(teach_plan(self.id, pairs))

    async def memories(self) -> list[Memory]:
        """The pairs the session learned from, oldest first, each with the adapter version it went into."""
        return (await self._client._request(memories_plan(self.id))).data

    async def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every pending update is live (at most ``timeout`` seconds server-side)."""
        return await self._client._request(flush_plan(self.id, timeout))

    async def info(self) -> SessionInfo:
        """The session's adapter version, turn count, summary and pending updates."""
        return await self._client._request(session_info_plan(self.id))

    async def download_adapter(self, path: str | os.PathLike[str]) -> int:
        """Save the live adapter and return its version; see :meth:`client.Session.download_adapter`."""
        content, version = await self._client._request(adapter_plan(self.id))
        await asyncio.to_thread(save_adapter, content, path)
        return version

    async def delete(self) -> DeleteResult:
        """Delete the session, its memory and its adapter."""
        return await self._client._request(delete_plan(self.id))


class AsyncTMEMClient(_AsyncChats):
    """Asynchronous client of a TMEM server; same settings as :class:`client.TMEMClient`."""

    def __init__(
        self,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.AsyncClient | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._core = Core(base_url, api_key, timeout, RetryPolicy(max_retries=max_retries))
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient()
        self._sleep = sleep

    @property
    def base_url(self) -> str:
        """The server root, without ``/v1``."""
        return self._core.base_url

    def session(self, session_id: str) -> AsyncSession:
        """A handle on session ``session_id`` (created by the server on first use)."""
        return AsyncSession(self, session_id)

    def _chat_route(self) -> tuple[AsyncTMEMClient, str | None]:
        return self, None

    async def models(self) -> ModelList:
        """The models the server serves."""
        return await self._request(models_plan())

    async def health(self) -> HealthStatus:
        """The server's health report."""
        return await self._request(health_plan())

    async def close(self) -> None:
        """Close the HTTP connection pool (unless it was passed in)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTMEMClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _chat(
        self, messages: MessagesInput, stream: bool, session_id: str | None, params: dict[str, Any]
    ) -> ChatCompletion | AsyncChatStream:
        plan = chat_plan(messages, stream=stream, session_id=session_id, params=params)
        if stream:
            return AsyncChatStream(await self._send(plan))
        return await self._request(plan)

    async def _request(self, plan: Plan[T]) -> T:
        return plan.decode(await self._send(plan))

    async def _send(self, plan: Plan[Any]) -> httpx.Response:
        request = self._core.build_request(self._http, plan)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=plan.stream)
            except httpx.TransportError as exc:
                delay = self._core.retry.delay(attempt, None)
                if delay is None:
                    raise connection_error(exc) from exc
            else:
                delay = self._core.retry.delay(attempt, response)
                if delay is None:
                    return await self._checked(response)
                await response.aclose()
            await self._sleep(delay)
            attempt += 1

    @staticmethod
    async def _checked(response: httpx.Response) -> httpx.Response:
        if not response.is_error:
            return response
        try:
            await response.aread()
        except httpx.TransportError:
            pass  # the status alone still names the error
        finally:
            await response.aclose()
        raise error_for(response)
