"""A session's lifecycle, shared by chat and the session API: open, read, store turns, queue updates, delete.

Sessions belong to their tenant: every key is the tenant's, so a session id another tenant uses is a
different session, and reading one that the caller's tenant does not have is a 404.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from tmem.server.errors import Forbidden, NotFound
from tmem.server.pool import AdapterPool
from tmem.server.prompting import StoredMessage, has_token_count, with_token_counts
from tmem.server.settings import Settings
from tmem.server.store import AppendResult, RedisStore, SessionState

_FIRST_PAGE = 32  # stored messages read in the first round trip; each later page doubles


async def counted(tokenizer: Any, messages: list[StoredMessage]) -> list[StoredMessage]:
    """Messages with their token counts: stored ones carry theirs; the rest are counted off the event loop."""
    if all(has_token_count(m) for m in messages):
        return messages
    return await asyncio.to_thread(with_token_counts, tokenizer, messages)


@dataclass
class SessionHistory:
    """Stored messages [start, end) of one session, read newest first in growing pages, each decoded once.

    `older()` hands out what is loaded but not yet walked, else the next older page, so a walk that
    stops early (the context budget is full) never reads or decodes the rest. Without a store it is empty.
    """

    store: RedisStore | None = None
    tenant: str = ""
    sid: str = ""
    start: int = 0
    end: int = 0
    loaded: list[StoredMessage] = field(default_factory=list)  # the newest len(loaded) messages
    walked: int = 0  # of `loaded`, the newest this many were handed out by older()

    @property
    def size(self) -> int:
        return self.end - self.start

    async def all(self) -> list[StoredMessage]:
        while await self._read_page():
            pass
        return self.loaded

    async def older(self) -> list[StoredMessage]:
        if self.walked == len(self.loaded) and not await self._read_page():
            return []
        page = self.loaded[: len(self.loaded) - self.walked]
        self.walked = len(self.loaded)
        return page

    async def _read_page(self) -> bool:
        top = self.end - len(self.loaded)
        low = max(self.start, top - max(_FIRST_PAGE, len(self.loaded)))
        if self.store is None or low >= top:
            return False
        page = await self.store.get_turns(self.tenant, self.sid, low, top - 1)
        self.loaded[:0] = page
        return bool(page)


class SessionLifecycle:
    """Opens sessions within the tenant's cap, stores turns with their token counts, queues updates, deletes."""

    def __init__(self, store: RedisStore, pool: AdapterPool, tokenizer: Any, settings: Settings) -> None:
        self.store, self.pool, self.tokenizer, self.settings = store, pool, tokenizer, settings

    async def open(self, tenant: str, sid: str) -> SessionState:
        """The session's state, created on first use unless the tenant is at its session cap (403)."""
        state = await self.store.get_session(tenant, sid)
        if state is not None:
            return state
        if await self.store.count_sessions(tenant) >= self.settings.max_sessions_per_tenant:
            raise Forbidden(f"session limit reached: at most {self.settings.max_sessions_per_tenant} sessions "
                            "per key; delete one first", code="session_limit_reached")
        return await self.store.ensure_session(tenant, sid)

    async def get(self, tenant: str, sid: str) -> SessionState:
        """The state of a session the tenant has (404 otherwise)."""
        state = await self.store.get_session(tenant, sid)
        if state is None:
            raise NotFound(f"session '{sid}' does not exist", param="session_id", code="session_not_found")
        return state

    def history(self, tenant: str, sid: str, start: int, end: int) -> SessionHistory:
        """Stored messages [start, end), read lazily newest first."""
        return SessionHistory(self.store, tenant, sid, start, end)

    async def record(self, tenant: str, sid: str, messages: list[StoredMessage], idempotency_key: str | None,
                     request_sha256: str, reason: str) -> AppendResult:
        """Store messages with their token counts; when the policy wants an update, it is queued in the same
        atomic step."""
        messages = await counted(self.tokenizer, messages)
        adding = sum(int(m["tokens"]) for m in messages)
        enqueue = reason if await self._wants_update(tenant, sid, adding) else None
        return await self.store.append_turns(tenant, sid, messages, idempotency_key, request_sha256=request_sha256,
                                             enqueue=enqueue)

    async def teach(self, tenant: str, sid: str, pairs: list[dict[str, str]]) -> None:
        """Open the session, store the pairs and queue their update, whatever the policy."""
        await self.open(tenant, sid)
        await self.store.add_teach_pairs(tenant, sid, pairs)
        await self.queue_update(tenant, sid, reason="teach")

    async def queue_update(self, tenant: str, sid: str, reason: str) -> bool:
        """Queue the session's update now, whatever the policy; False when one is already queued."""
        return await self.store.jobs.enqueue_update(tenant, sid, reason=reason, force=True)

    async def delete(self, tenant: str, sid: str) -> None:
        """Delete the session (404 if the tenant has none) and drop its adapters from this replica."""
        await self.get(tenant, sid)
        await self.store.delete_session(tenant, sid)
        await self.pool.forget(tenant, sid)

    async def _wants_update(self, tenant: str, sid: str, adding: int) -> bool:
        """every-turn: always; context-budget: once the unabsorbed text, with `adding` tokens more, reaches
        --context-tokens, or teach pairs wait.

        Counts come from the stored turns' `tokens`, read newest first only until the budget is reached.
        """
        if self.settings.update_policy != "context-budget":
            return True
        state = await self.store.get_session(tenant, sid)
        if state is None:
            return False
        if state.teach_pending:
            return True
        needed = self.settings.context_tokens - adding
        pending, total = self.history(tenant, sid, state.absorbed_turns, state.turns), 0
        while total < needed and (page := await pending.older()):
            total += sum(int(m["tokens"]) for m in await counted(self.tokenizer, page))
        return total >= needed
