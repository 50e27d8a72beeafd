"""One chat turn: build the session's context, generate with its live adapter, store the turn, queue the update."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from tmem.server.auth import RateLimiter
from tmem.server.engine import Engine
from tmem.server.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from tmem.server.lifecycle import SessionHistory, SessionLifecycle, counted
from tmem.server.limits import check_max_tokens, check_messages
from tmem.server.metrics import METRICS
from tmem.server.pool import AdapterLease, AdapterPool
from tmem.server.prompting import (
    StoredMessage,
    TailFit,
    new_suffix,
    render_fitting,
    session_system,
    system_tokens,
)
from tmem.server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    delivered_finish_reason,
)
from tmem.server.settings import Settings
from tmem.server.store import request_fingerprint

Message = dict[str, str]
# Whether the client is still connected; asked before a delivered turn is stored.
ConnectionCheck = Callable[[], Awaitable[bool]]
T = TypeVar("T")
log = logging.getLogger(__name__)
_HISTORY_TURNS = 400  # the most stored messages one prompt is built from


async def _always_connected() -> bool:
    return True


@dataclass
class TurnContext:
    """Who is asking and how the turn is kept: tenant, session (None = stateless), recording, idempotency."""

    tenant: str
    session_id: str | None
    record: bool = True
    idempotency_key: str | None = None
    request_sha256: str = ""  # the request body's fingerprint, bound to idempotency_key when the turn is stored
    use_adapter: bool = True  # False (header X-TMEM-Adapter: off): base model + summary, for ablations
    use_context: bool = True  # False (header X-TMEM-Context: none): adapter only, no stored turns or summary
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: Any
    version: int
    new_messages: list[StoredMessage]  # with their `tokens` counts, as they will be stored
    model: str


class ChatService:
    """Chat completions for stateless requests and sessions alike."""

    def __init__(self, engine: Engine, sessions: SessionLifecycle, pool: AdapterPool, settings: Settings,
                 limiter: RateLimiter | None = None) -> None:
        self.engine, self.sessions, self.pool, self.settings = engine, sessions, pool, settings
        self.limiter = limiter

    def check_model(self, model: str | None) -> str:
        name = model or self.settings.model_name
        if name not in (self.settings.model_name, self.settings.model):
            raise ModelNotFound(name)
        return self.settings.model_name

    async def prepare(self, req: ChatCompletionRequest, ctx: TurnContext) -> Prepared:
        model = self.check_model(req.model)
        ctx.request_sha256 = request_fingerprint(req.model_dump(mode="json"))
        sent = [{"role": m.role, "content": m.text} for m in req.messages]
        check_messages(sent, self.settings)
        check_max_tokens(req.max_tokens, self.settings)
        # The client's system text leads; the operator's default (none unless configured) stands in for it.
        client_system = "\n\n".join(m["content"] for m in sent if m["role"] == "system")
        system = client_system or self.settings.system_prompt
        dialogue = [m for m in sent if m["role"] != "system"]
        if not dialogue:
            raise InvalidRequest("messages must contain at least one user or assistant message", param="messages")
        version, summary, history, whole = 0, "", SessionHistory(), None
        if ctx.session_id is not None:
            state = await self.sessions.open(ctx.tenant, ctx.session_id)
            version = state.adapter_version if ctx.use_adapter else 0
            if ctx.use_context:
                summary = state.summary
                start = state.absorbed_turns if self.settings.update_policy == "context-budget" else 0
                history = self.sessions.history(ctx.tenant, ctx.session_id,
                                                max(start, state.turns - _HISTORY_TURNS), state.turns)
            whole = history if history.start == 0 and history.size == state.turns else (
                self.sessions.history(ctx.tenant, ctx.session_id, 0, state.turns))
        new_messages = await counted(self.engine.tokenizer, await _new_messages(whole, dialogue))
        prompt_ids = await self._fit(session_system(self.engine.tokenizer, system, summary), history, new_messages)
        params = req.to_sampling_params(self.settings.default_max_tokens, self.engine.max_model_len, len(prompt_ids))
        return Prepared(prompt_ids, params, version, new_messages, model)

    async def _fit(self, system: str | None, history: SessionHistory, new_messages: list[StoredMessage]) -> list[int]:
        """The prompt: the system text and the newest turns that fit the context budget.

        Stored turns are read newest first, a page at a time, only until the budget is full; their
        stored token counts price them, so a long session costs this request no more than what fits.
        """
        tokenizer, budget = self.engine.tokenizer, self.settings.context_tokens
        fit = TailFit(await asyncio.to_thread(system_tokens, tokenizer, system) if system else None, budget)
        turns = list(new_messages)
        fits = fit.take(reversed(turns))
        while fits and (page := await history.older()):
            page = await counted(self.engine.tokenizer, page)
            turns[:0] = page
            fits = fit.take(reversed(page))
        kept = turns[len(turns) - fit.kept :]
        ids, _ = await asyncio.to_thread(render_fitting, tokenizer, system, kept, budget)
        return ids

    async def complete(self, req: ChatCompletionRequest, ctx: TurnContext,
                       connected: ConnectionCheck = _always_connected) -> tuple[ChatCompletionResponse, int]:
        """Generate the whole reply; store the turn unless the reply was cut off or the client has left."""
        prep = await self.prepare(req, ctx)
        started = time.perf_counter()
        final = None
        async with await self._lease(ctx, prep.version) as lease:
            async for output in self.engine.generate(prep.prompt_ids, prep.params, ctx.request_id,
                                                     lease.lora_request):
                if final is None:
                    METRICS.ttft.observe(time.perf_counter() - started)
                final = output
        assert final is not None
        completion = final.outputs[0]
        _check_complete(completion.finish_reason)
        text, n_out = completion.text, len(completion.token_ids)
        await self.finish_turn(ctx, prep.new_messages, text, connected)
        await self._count(ctx, len(prep.prompt_ids), n_out)
        response = ChatCompletionResponse.build(
            request_id=ctx.request_id,
            model=prep.model,
            text=text,
            finish_reason=completion.finish_reason,
            prompt_tokens=len(prep.prompt_ids),
            completion_tokens=n_out,
        )
        return response, lease.served_version

    async def stream(
        self, req: ChatCompletionRequest, ctx: TurnContext, connected: ConnectionCheck = _always_connected
    ) -> tuple[AsyncGenerator[ChatCompletionChunk, None], int]:
        """Prepare eagerly (so errors become HTTP errors), then return the chunk iterator and the version."""
        prep = await self.prepare(req, ctx)
        lease = await self._lease(ctx, prep.version)
        return self._chunks(req, ctx, prep, lease, connected), lease.served_version

    async def _chunks(
        self, req: ChatCompletionRequest, ctx: TurnContext, prep: Prepared, lease: AdapterLease,
        connected: ConnectionCheck,
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        started, sent_len, n_out, completion = time.perf_counter(), 0, 0, None
        finished = False  # the engine is done with the request: nothing left to abort
        try:
            yield ChatCompletionChunk.build(ctx.request_id, prep.model, role="assistant")
            async for output in self.engine.generate(prep.prompt_ids, prep.params, ctx.request_id,
                                                     lease.lora_request):
                completion = output.outputs[0]
                if sent_len == 0:
                    METRICS.ttft.observe(time.perf_counter() - started)
                delta, sent_len = completion.text[sent_len:], len(completion.text)
                n_out = len(completion.token_ids)
                if delta:
                    yield ChatCompletionChunk.build(ctx.request_id, prep.model, content=delta)
            finished = True
            assert completion is not None
            log.debug("request %s: final output (%s) at +%.3fs", ctx.request_id, completion.finish_reason,
                      time.perf_counter() - started)
            _check_complete(completion.finish_reason)
            yield ChatCompletionChunk.build(ctx.request_id, prep.model, finish_reason=completion.finish_reason)
            if req.stream_usage:
                yield ChatCompletionChunk.usage_only(ctx.request_id, prep.model, len(prep.prompt_ids), n_out)
            # Resumed only once the server has written the events above: a client that went away while
            # they were generated or written is seen now, and a reply it never got is not a turn.
            stored = await self.finish_turn(ctx, prep.new_messages, completion.text, connected)
            log.debug("request %s: turn %s at +%.3fs", ctx.request_id, "stored" if stored else "not stored",
                      time.perf_counter() - started)
            await self._count(ctx, len(prep.prompt_ids), n_out)
        finally:
            # Shielded: on a disconnect Starlette cancels this task, and an unshielded await here would be
            # cancelled too, leaving the engine generating and the adapter pinned forever.
            with anyio.CancelScope(shield=True):
                if not finished:
                    # The reply was never delivered: the turn is not stored and the engine stops on it,
                    # but what it generated until then is charged (the rate limiter settles on it).
                    await self.engine.abort(ctx.request_id)
                    await self._count(ctx, len(prep.prompt_ids), n_out)
                await lease.release()

    async def _lease(self, ctx: TurnContext, version: int) -> AdapterLease:
        """The adapter this turn is served with, held until its reply ends; the base model when it has none."""
        if ctx.session_id is None or version == 0:
            return AdapterLease.base_model()
        return await self.pool.lease(ctx.tenant, ctx.session_id, version)

    async def finish_turn(self, ctx: TurnContext, new_messages: list[StoredMessage], reply: str,
                          connected: ConnectionCheck = _always_connected) -> bool:
        """Store the delivered turn once and queue its update, unless the client has gone; True when stored.

        Storing and queuing are one step that a cancellation (the client leaving meanwhile) cannot split.
        """
        if ctx.session_id is None or not ctx.record:
            return False
        if not await connected():
            log.info("request %s: the client left before the end of its reply; turn not stored", ctx.request_id)
            return False
        turn = [*new_messages, {"role": "assistant", "content": reply}]
        await _shielded(self.sessions.record(ctx.tenant, ctx.session_id, turn, ctx.idempotency_key,
                                             ctx.request_sha256, reason="turn"))
        return True

    async def _count(self, ctx: TurnContext, prompt: int, completion: int) -> None:
        METRICS.prompt_tokens.inc(prompt)
        METRICS.completion_tokens.inc(completion)
        if self.limiter is not None:
            await self.limiter.add_tokens(ctx.tenant, prompt + completion)


async def _new_messages(whole: SessionHistory | None, dialogue: list[Message]) -> list[StoredMessage]:
    """What the request adds to the stored history (see new_suffix); `whole` is all of it, from message 0.

    Only a request sending more messages than the session has stored can be a resent conversation; only
    then is the stored history read to compare, a cost as large as the request's own. It is compared from
    its first message, whatever the prompt's window (an update may have absorbed the older turns).
    """
    if whole is not None and 0 < whole.size < len(dialogue):
        return list(new_suffix(await whole.all(), dialogue))
    return list(dialogue)


def _check_complete(finish_reason: str | None) -> None:
    """A reply the engine cut off (vLLM's "abort", "error") was not delivered whole: nothing is stored."""
    if delivered_finish_reason(finish_reason) is None:
        raise ServiceUnavailable(f"the reply ended early (finish reason {finish_reason!r}); nothing was stored, "
                                 "retry the request", retry_after=1, code="generation_incomplete")


async def _shielded(step: Coroutine[Any, Any, T]) -> T:
    """Await `step` to its end even when the caller is cancelled meanwhile (the caller still sees the cancel).

    A client disconnect cancels the request's task: a turn being stored and queued must not stop halfway.
    """
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_failure)
        raise


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("storing a turn after its request was cancelled failed: %r", task.exception())

