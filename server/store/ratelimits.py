"""Per-API-key request and token counters in fixed one-minute windows, shared by every replica.

The policy (what is allowed, what a refusal says) is `tmem.server.auth.RateLimiter`'s; this module only
counts. Each counter outlives its window by a minute (`KEEP_S`), so a reservation can still be settled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

import tmem.server.store.scripts as lua
from tmem.server.store.errors import faults_as_unavailable
from tmem.server.store.keys import KeyLayout

WINDOW_S, KEEP_S = 60, 120


@dataclass(frozen=True)
class Window:
    """One API key's counter for the current minute, and the seconds until the next minute starts."""

    key: str
    retry_after_s: int


@dataclass(frozen=True)
class TokenHold:
    """A reservation's outcome: whether the tokens were counted against the window (to be settled there)."""

    window: Window
    tokens: int
    granted: bool


class RateLimitCounters:
    """The counters, behind three atomic steps; Redis faults surface as StoreUnavailable."""

    def __init__(self, client: aioredis.Redis, keys: KeyLayout) -> None:
        self.keys = keys
        self._count = client.register_script(lua.COUNT_REQUEST)
        self._reserve = client.register_script(lua.RESERVE_TOKENS)
        self._settle = client.register_script(lua.SETTLE_TOKENS)

    def window(self, kind: str, key_id: str) -> Window:
        """The current window of one key's `req` or `tok` counter."""
        now = time.time()
        return Window(self.keys.rate_limit(kind, key_id, int(now // WINDOW_S)), WINDOW_S - int(now % WINDOW_S))

    @faults_as_unavailable
    async def count_request(self, key_id: str) -> tuple[int, Window]:
        """Count one request of the key: (its requests in this window, this one included; the window)."""
        window = self.window("req", key_id)
        return int(await self._count(keys=[window.key], args=[KEEP_S])), window

    @faults_as_unavailable
    async def reserve_tokens(self, key_id: str, tokens: int, limit: int) -> TokenHold:
        """Count `tokens` against the key's window if they fit under `limit`; a refused hold counts nothing."""
        window = self.window("tok", key_id)
        granted = bool(await self._reserve(keys=[window.key], args=[tokens, limit, KEEP_S]))
        return TokenHold(window, tokens, granted)

    @faults_as_unavailable
    async def settle_tokens(self, hold: TokenHold, used: int) -> None:
        """Charge a granted hold's window what the request used instead of what it held (nothing once expired)."""
        if hold.granted and used != hold.tokens:
            await self._settle(keys=[hold.window.key], args=[used - hold.tokens])
