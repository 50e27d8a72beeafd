"""The synchronous client: a thin ``httpx.Client`` shell over :mod:`tmem.client._core`."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Generator, Iterator
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


class ChatStream:
    """A streamed chat completion: iterate it for :class:`ChatCompletionChunk` objects.

    An error event in the stream raises the matching :class:`~client.errors.APIStatusError`. The
    HTTP response is closed when the stream is exhausted, raises, or is closed (``close()`` or
    leaving a ``with`` block)::

        with session.chat("Hi", stream=True) as stream:
            for chunk in stream:
                print(chunk.delta_text, end="")
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.request_id = request_id_of(response)
        self.adapter_version = adapter_version_of(response)
        self._chunks = self._iter_chunks()

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return next(self._chunks)

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and close the response; safe to call more than once."""
        self._chunks.close()
        self.response.close()

    def _iter_chunks(self) -> Generator[ChatCompletionChunk, None, None]:
        decoder = ChunkDecoder(self.request_id)
        try:
            for line in self.response.iter_lines():
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
            self.response.close()


class _Chats:
    """The overloaded ``chat`` of the client (stateless) and of its sessions (in the session), written once."""

    def _chat_route(self) -> tuple[TMEMClient, str | None]:
        """The client that sends the chat, and the session it belongs to (None: stateless)."""
        raise NotImplementedError

    @overload
    def chat(self, messages: MessagesInput, stream: Literal[False] = False, **params: Any) -> ChatCompletion: ...
    @overload
    def chat(self, messages: MessagesInput, stream: Literal[True], **params: Any) -> ChatStream: ...
    @overload
    def chat(self, messages: MessagesInput, stream: bool, **params: Any) -> ChatCompletion | ChatStream: ...
    def chat(self, messages: MessagesInput, stream: bool = False, **params: Any) -> ChatCompletion | ChatStream:
        """A chat completion: in a :class:`Session`, sent with ``X-Session-ID``, the turn also teaches its
        adapter; on the client it is stateless (no session, nothing learned).

        ``messages`` is a string (one user message) or a list of messages. ``params`` are OpenAI
        sampling fields (``model``, ``temperature``, ``max_tokens``, ...) plus ``idempotency_key``.
        """
        client, session_id = self._chat_route()
        return client._chat(messages, stream, session_id, params)


class Session(_Chats):
    """One server-side session and its adapter; get it from :meth:`TMEMClient.session`."""

    def __init__(self, client: TMEMClient, session_id: str) -> None:
        self._client = client
        self.id = session_id

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def _chat_route(self) -> tuple[TMEMClient, str | None]:
        return self._client, self.id

    def ingest(self, messages: MessagesInput) -> SessionInfo:
        """Add messages to the session without asking for a reply."""
        return self._client._request(ingest_plan(self.id, messages))

    def teach(self, pairs: PairsInput) -> SessionInfo:
        """Teach question-answer pairs directly (QAPair, ``(question, answer)`` tuples or dicts)."""
        return self._client._request(teach_plan(self.id, pairs))

    def memories(self) -> list[Memory]:
        """The pairs the session learned from, oldest first, each with the adapter version it went into."""
        return (self._client._request(memories_plan(self.id))).data

    def flush(self, timeout: float | None = None) -> FlushResult:
        """Wait until every pending update is live (at most ``timeout`` seconds server-side)."""
        return self._client._request(flush_plan(self.id, timeout))

    def info(self) -> SessionInfo:
        """The session's adapter version, turn count, summary and pending updates."""
        return self._client._request(session_info_plan(self.id))

    def download_adapter(self, path: str | os.PathLike[str]) -> int:
        """Save the live adapter and return its version.

        A ``path`` ending in ``.tar.gz``/``.tgz`` receives the archive; any other path becomes the
        PEFT directory (created if needed, archive unpacked into it).
        """
        content, version = self._client._request(adapter_plan(self.id))
        save_adapter(content, path)
        return version

    def delete(self) -> DeleteResult:
        """Delete the session, its memory and its adapter."""
        return self._client._request(delete_plan(self.id))


class TMEMClient(_Chats):
    """Synchronous client of a TMEM server.

    ``base_url`` may end in ``/v1`` or not. ``api_key`` defaults to ``$TMEM_API_KEY``. Retryable
    failures (408/409/429/5xx, connection errors) are retried ``max_retries`` times, waiting
    ``Retry-After`` when the server sends it. ``sleep`` is the wait function (replace it in tests).
    An ``http_client`` you pass in stays yours to close.
    """

    def __init__(
        self,
        base_url: str | httpx.URL = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        http_client: httpx.Client | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._core = Core(base_url, api_key, timeout, RetryPolicy(max_retries=max_retries))
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client()
        self._sleep = sleep

    @property
    def base_url(self) -> str:
        """The server root, without ``/v1``."""
        return self._core.base_url

    def session(self, session_id: str) -> Session:
        """A handle on session ``session_id`` (created by the server on first use)."""
        return Session(self, session_id)

    def _chat_route(self) -> tuple[TMEMClient, str | None]:
        return self, None

    def models(self) -> ModelList:
        """The models the server serves."""
        return self._request(models_plan())

    def health(self) -> HealthStatus:
        """The server's health report."""
        return self._request(health_plan())

    def close(self) -> None:
        """Close the HTTP connection pool (unless it was passed in)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> TMEMClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _chat(
        self, messages: MessagesInput, stream: bool, session_id: str | None, params: dict[str, Any]
    ) -> ChatCompletion | ChatStream:
        plan = chat_plan(messages, stream=stream, session_id=session_id, params=params)
        if stream:
            return ChatStream(self._send(plan))
        return self._request(plan)

    def _request(self, plan: Plan[T]) -> T:
        return plan.decode(self._send(plan))

    def _send(self, plan: Plan[Any]) -> httpx.Response:
        request = self._core.build_request(self._http, plan)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=plan.stream)
            except httpx.TransportError as exc:
                delay = self._core.retry.delay(attempt, None)
                if delay is None:
                    raise connection_error(exc) from exc
            else:
                delay = self._core.retry.delay(attempt, response)
                if delay is None:
                    return self._checked(response)
                response.close()
            self._sleep(delay)
            attempt += 1

    @staticmethod
    def _checked(response: httpx.Response) -> httpx.Response:
        if not response.is_error:
            return response
        try:
            response.read()
        except httpx.TransportError:
            pass  # the status alone still names the error
        finally:
            response.close()
        raise error_for(response)
