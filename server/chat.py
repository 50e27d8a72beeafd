"""One chat turn: build the session's context, generate with its live adapter, store the turn, queue the update."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio

from server.auth import RateLimiter
from server.engine import Engine
from server.errors import Forbidden, InvalidRequest, NotFound
from server.limits import check_max_tokens, check_messages
from server.metrics import METRICS
from server.pool import AdapterPool
from server.prompting import fit_turns, new_suffix, session_system
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from server.settings import Settings
from server.store import RedisStore, SessionState

Message = dict[str, str]


@dataclass
class TurnContext:
    """Who is asking and how the turn is kept: tenant, session (None = stateless), recording, idempotency."""

    tenant: str
    session_id: str | None
    record: bool = True
    idempotency_key: str | None = None
    use_adapter: bool = True  # False (header X-TMEM-Adapter: off): base model + summary, for ablations
    use_context: bool = True  # False (header X-TMEM-Context: none): adapter only, no stored turns or summary
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: Any
    version: int
    new_messages: list[Message]
    model: str


class ChatService:
    """Chat completions for stateless requests and sessions alike."""

    def __init__(self, engine: Engine, pool: AdapterPool, store: RedisStore | None, settings: Settings,
                 limiter: RateLimiter | None = None) -> None:
        self.engine, self.pool, self.store, self.settings = engine, pool, store, settings
        self.limiter = limiter

    async def open_session(self, tenant: str, sid: str) -> SessionState:
        """The session's state, created on first use unless the tenant is at its session cap (403)."""
        assert self.store is not None
        state = await self.store.get_session(tenant, sid)
        if state is not None:
            return state
        if await self.store.count_sessions(tenant) >= self.settings.max_sessions_per_tenant:
            raise Forbidden(f"session limit reached: at most {self.settings.max_sessions_per_tenant} sessions "
                            "per key; delete one first", code="session_limit_reached")
        return await self.store.ensure_session(tenant, sid)

    def check_model(self, model: str | None) -> str:
        name = model or self.settings.model_name
        if name not in (self.settings.model_name, self.settings.model):
            raise NotFound(f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return self.settings.model_name

    async def prepare(self, req: ChatCompletionRequest, ctx: TurnContext) -> Prepared:
        model = self.check_model(req.model)
        sent = [{"role": m.role, "content": m.text} for m in req.messages]
        check_messages(sent, self.settings)
        check_max_tokens(req.max_tokens, self.settings)
        # The client's system text leads; the operator's default (none unless configured) stands in for it.
        client_system = "\n\n".join(m["content"] for m in sent if m["role"] == "system")
        system = client_system or self.settings.system_prompt
        dialogue = [m for m in sent if m["role"] != "system"]
        if not dialogue:
            raise InvalidRequest("messages must contain at least one user or assistant message", param="messages")
        version, summary, history = 0, "", []
        if ctx.session_id is not None and self.store is not None:
            state = await self.open_session(ctx.tenant, ctx.session_id)
            version = state.adapter_version if ctx.use_adapter else 0
            if ctx.use_context:
                summary = state.summary
                start = state.absorbed_turns if self.settings.update_policy == "context-budget" else 0
                history = await self.store.get_turns(ctx.tenant, ctx.session_id, max(start, state.turns - 400))
        new_messages = new_suffix(history, dialogue) if history else dialogue
        budget = self.settings.context_tokens
        tokenizer = self.engine.tokenizer
        prompt_ids, _ = fit_turns(tokenizer, session_system(tokenizer, system, summary), history + new_messages, budget)
        params = req.to_sampling_params(self.settings.default_max_tokens, self.engine.max_model_len, len(prompt_ids))
        return Prepared(prompt_ids, params, version, new_messages, model)

    async def complete(self, req: ChatCompletionRequest, ctx: TurnContext) -> tuple[ChatCompletionResponse, int]:
        prep = await self.prepare(req, ctx)
        started = time.perf_counter()
        final = None
        async with self._adapter(ctx, prep.version) as (served, lora):
            async for output in self.engine.generate(prep.prompt_ids, prep.params, ctx.request_id, lora):
                if final is None:
                    METRICS.ttft.observe(time.perf_counter() - started)
                final = output
        assert final is not None
        completion = final.outputs[0]
        text, n_out = completion.text, len(completion.token_ids)
        await self.finish_turn(ctx, prep.new_messages, text)
        await self._count(ctx, len(prep.prompt_ids), n_out)
        response = ChatCompletionResponse.build(
            request_id=ctx.request_id,
            model=prep.model,
            text=text,
            finish_reason=_finish(completion.finish_reason),
            prompt_tokens=len(prep.prompt_ids),
            completion_tokens=n_out,
        )
        return response, served

    async def stream(
        self, req: ChatCompletionRequest, ctx: TurnContext
    ) -> tuple[AsyncGenerator[ChatCompletionChunk, None], int]:
        """Prepare eagerly (so errors become HTTP errors), then return the chunk iterator and the version."""
        prep = await self.prepare(req, ctx)
        holder = self._adapter(ctx, prep.version)
        served, lora = await holder.__aenter__()
        return self._chunks(req, ctx, prep, holder, lora), served

    async def _chunks(
        self, req: ChatCompletionRequest, ctx: TurnContext, prep: Prepared, holder: Any, lora: Any
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        started, sent_len, finish, n_out = time.perf_counter(), 0, None, 0
        completed = False
        try:
            yield ChatCompletionChunk.build(ctx.request_id, prep.model, role="assistant")
            async for output in self.engine.generate(prep.prompt_ids, prep.params, ctx.request_id, lora):
                completion = output.outputs[0]
                if sent_len == 0:
                    METRICS.ttft.observe(time.perf_counter() - started)
                delta, sent_len = completion.text[sent_len:], len(completion.text)
                n_out, finish = len(completion.token_ids), completion.finish_reason
                if delta:
                    yield ChatCompletionChunk.build(ctx.request_id, prep.model, content=delta)
            yield ChatCompletionChunk.build(ctx.request_id, prep.model, finish_reason=_finish(finish))
            completed = True
            if req.stream_usage:
                yield ChatCompletionChunk.usage_only(ctx.request_id, prep.model, len(prep.prompt_ids), n_out)
            await self.finish_turn(ctx, prep.new_messages, completion.text)
            await self._count(ctx, len(prep.prompt_ids), n_out)
        finally:
            # Shielded: on a disconnect Starlette cancels this task, and an unshielded await here would be
            # cancelled too, leaving the engine generating and the adapter pinned forever.
            with anyio.CancelScope(shield=True):
                if not completed:
                    # The reply was never delivered: the turn is not stored and the engine stops on it.
                    await self.engine.abort(ctx.request_id)
                await holder.__aexit__(None, None, None)

    def _adapter(self, ctx: TurnContext, version: int) -> Any:
        if ctx.session_id is None or version == 0:
            return _NoAdapter()
        return self.pool.use(ctx.tenant, ctx.session_id, version)

    async def finish_turn(self, ctx: TurnContext, new_messages: list[Message], reply: str) -> None:
        """Store the delivered turn once, then queue the session's update per the policy."""
        if ctx.session_id is None or not ctx.record or self.store is None:
            return
        turn = [*new_messages, {"role": "assistant", "content": reply}]
        result = await self.store.append_turns(ctx.tenant, ctx.session_id, turn, idempotency_key=ctx.idempotency_key)
        if not result.duplicate:
            await self.maybe_enqueue(ctx.tenant, ctx.session_id, reason="turn")

    async def maybe_enqueue(self, tenant: str, sid: str, reason: str) -> bool:
        """every-turn: always; context-budget: once the unabsorbed text passes --context-tokens."""
        assert self.store is not None
        if self.settings.update_policy == "context-budget":
            state = await self.store.get_session(tenant, sid)
            if state is None:
                return False
            pending = await self.store.get_turns(tenant, sid, state.absorbed_turns)
            tokens = sum(len(self.engine.tokenizer.encode(m["content"], add_special_tokens=False)) for m in pending)
            if tokens < self.settings.context_tokens and state.teach_pending == 0:
                return False
        return await self.store.enqueue_update(tenant, sid, reason=reason)

    async def _count(self, ctx: TurnContext, prompt: int, completion: int) -> None:
        METRICS.prompt_tokens.inc(prompt)
        METRICS.completion_tokens.inc(completion)
        if self.limiter is not None:
            await self.limiter.add_tokens(ctx.tenant, prompt + completion)


class _NoAdapter:
    async def __aenter__(self) -> tuple[int, None]:
        return 0, None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
