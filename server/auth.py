"""API keys → callers (tenant and key), checked in constant time; per-key request and token rate limits."""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi.exceptions import RequestValidationError

from tmem.server.errors import Forbidden, RateLimited, TMEMHTTPError, Unauthorized
from tmem.server.limits import is_loopback
from tmem.server.settings import Settings, check_api_key
from tmem.server.store import RateLimitCounters, StoreUnavailable, TokenHold

log = logging.getLogger(__name__)
OPEN_TENANT = "default"
# A key configured as `*=<key>` is a service key (the standalone worker's): it acts for the configured
# tenant it names in `X-TMEM-Tenant`, and for no tenant of its own.
SERVICE_TENANT = "*"
# No ':' (Redis keys are `prefix:{tenant:sid}`, so `acme` + `eu:s1` must never equal `acme:eu` + `s1`) and no
# glob characters (session listings SCAN with the tenant in the pattern).
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# What the worker needs from an API replica, and so all a service key may do: unrecorded chat completions.
SERVICE_ROUTES = frozenset({("POST", "/v1/chat/completions")})


class StartupRefused(RuntimeError):
    """The configuration is unsafe to serve with; the message says what to change."""


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant whose data is touched, and the key that pays (a digest, never the key)."""

    tenant: str
    key_id: str
    service: bool = False


OPEN_CALLER = Caller(OPEN_TENANT, "open")


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, each naming its tenant. Empty means the server runs open."""

    entries: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of --api-keys and --api-keys-file; a bad tenant name refuses to start (ValueError)."""
        lines = list(settings.api_keys)
        if settings.api_keys_file is not None:
            text = Path(settings.api_keys_file).read_text()
            lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return cls(tuple(_entry(line, number) for number, line in enumerate(lines, start=1)))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @property
    def tenants(self) -> frozenset[str]:
        """The configured tenants: the only names a service key may act for."""
        return frozenset(tenant for tenant, _ in self.entries if tenant != SERVICE_TENANT)

    def caller(self, authorization: str | None, acting_for: str | None = None) -> Caller:
        """The caller of a `Bearer <key>` header (a service key's named tenant); 401 for a missing or unknown key."""
        if not self.enabled:
            return OPEN_CALLER
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        candidate = presented.strip().encode()
        found: str | None = None
        for tenant, key in self.entries:  # every key is compared, so timing says nothing about which matched
            if hmac.compare_digest(candidate, key):
                found = tenant
        if found is None:
            raise Unauthorized("Incorrect API key provided.")
        key_id = hashlib.sha256(candidate).hexdigest()[:16]
        if found == SERVICE_TENANT:
            if not acting_for or acting_for not in self.tenants:
                raise Forbidden("a service key must name a configured tenant in X-TMEM-Tenant", param="X-TMEM-Tenant")
            return Caller(acting_for, key_id, service=True)
        if acting_for and acting_for != found:
            raise Forbidden("only a service key may act for another tenant", param="X-TMEM-Tenant")
        return Caller(found, key_id)

    def tenant_for(self, authorization: str | None, acting_for: str | None = None) -> str:
        return self.caller(authorization, acting_for).tenant


def _entry(line: str, number: int) -> tuple[str, bytes]:
    tenant, sep, key = line.partition("=")
    if not sep:
        key = tenant
        # A bare key's tenant is a digest of it: stable across restarts, never the key itself.
        tenant = "t-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    tenant = tenant.strip()
    if tenant != SERVICE_TENANT and not TENANT_RE.fullmatch(tenant):
        # The entry's number, not its text: a malformed line may hold a key.
        raise ValueError(f"API key entry {number}: a tenant name must be 1-64 letters, digits, '_' or '-' "
                         "(`tenant=key`), or `*` for a service key")
    check_api_key(key)
    return tenant, key.strip().encode()


def service_may(method: str, route: str, record: bool) -> bool:
    """A service key may only generate without recording a turn, as the worker's extraction does."""
    return (method, route) in SERVICE_ROUTES and not record


def refuse_open_exposure(settings: Settings, keys: KeyRing) -> None:
    """No keys on a reachable address makes every session id the only secret: refuse unless asked for."""
    if keys.enabled or settings.allow_unauthenticated or is_loopback(settings.host):
        return
    raise StartupRefused(
        f"refusing to serve on {settings.host} without API keys: anyone who can reach it could read every "
        "session. Configure keys (--api-keys / --api-keys-file / TMEM_API_KEYS), bind to 127.0.0.1, or pass "
        "--allow-unauthenticated (TMEM_ALLOW_UNAUTHENTICATED=true) if the network in front is trusted.")


@dataclass
class Reservation:
    """Tokens held for one chat request at admission; settled against what it used when it ends."""

    hold: TokenHold
    used: int | None = None  # reported by the chat service when the reply was delivered


# The reservation of the request being served: the chat service reports usage through
# `RateLimiter.add_tokens(tenant, n)`, which has no request at hand. Set in the request's own task,
# so a streaming response (a task started from it) sees it too.
_ACTIVE: contextvars.ContextVar[Reservation | None] = contextvars.ContextVar("tmem_reservation", default=None)


def _refused_before_generation(exc: Exception) -> bool:
    """A 4xx (bad body, limits, context length, unknown model) is answered before the engine runs."""
    return isinstance(exc, RequestValidationError) or (isinstance(exc, TMEMHTTPError) and exc.status < 500)


class RateLimiter:
    """Fixed one-minute windows per API key, counted in Redis so every replica shares them.

    Requests are counted at admission; a chat request holds its max_tokens at admission (refused when
    they do not fit the minute) and gives back what it did not use when it ends. Without counters
    (None) nothing is limited.
    """

    def __init__(self, counters: RateLimitCounters | None, rpm: int, tpm: int) -> None:
        self.counters, self.rpm, self.tpm = counters, rpm, tpm

    @property
    def enabled(self) -> bool:
        return self.counters is not None and (self.rpm > 0 or self.tpm > 0)

    async def admit(self, caller: Caller) -> None:
        """Count one request; 429 with Retry-After once the key's requests for this minute are spent."""
        if self.counters is None or self.rpm <= 0 or caller.service:
            return
        try:
            count, window = await self.counters.count_request(caller.key_id)
        except StoreUnavailable as exc:  # fail open for rate limits: the store reports its own outage
            log.warning("rate limiter unavailable (%s); admitting", exc)
            return
        if count > self.rpm:
            raise RateLimited(f"Rate limit reached: {self.rpm} requests per minute.",
                              retry_after=window.retry_after_s, code="rate_limit_exceeded")

    @asynccontextmanager
    async def reservation(self, caller: Caller, tokens: int) -> AsyncIterator[None]:
        """Hold `tokens` for the request inside (429 when the minute has no room); settle on the way out.

        The worker's service key is not limited: its generations serve updates the tenants already paid for.
        """
        held = await self._hold(caller, tokens) if self.tpm > 0 and not caller.service else None
        _ACTIVE.set(held)
        refused = False
        try:
            yield
        except Exception as exc:
            refused = _refused_before_generation(exc)
            raise
        finally:
            _ACTIVE.set(None)
            if held is not None:
                # A delivered reply reported its usage; a stream cut short (or failed mid-way) keeps what it held.
                used = 0 if refused else (held.used if held.used is not None else held.hold.tokens)
                with anyio.CancelScope(shield=True):  # the client may be gone; the count must still settle
                    await self._settle(held, used)

    async def _hold(self, caller: Caller, tokens: int) -> Reservation | None:
        if self.counters is None:
            return None
        want = min(max(tokens, 1), self.tpm)  # a request larger than the whole minute waits for an empty one
        try:
            hold = await self.counters.reserve_tokens(caller.key_id, want, self.tpm)
        except StoreUnavailable as exc:
            log.warning("rate limiter unavailable (%s); admitting", exc)
            return None
        if not hold.granted:
            raise RateLimited(f"Rate limit reached: {self.tpm} tokens per minute (this request may use {want}).",
                              retry_after=hold.window.retry_after_s, code="tokens_limit_exceeded")
        return Reservation(hold)

    async def _settle(self, held: Reservation, used: int) -> None:
        if self.counters is None:
            return
        try:
            await self.counters.settle_tokens(held.hold, used)
        except StoreUnavailable as exc:
            log.warning("rate limiter unavailable (%s); tokens not settled", exc)

    async def add_tokens(self, tenant: str, tokens: int) -> None:
        """The chat service's report of a delivered reply's prompt + completion tokens."""
        del tenant  # the reservation knows the key that pays
        held = _ACTIVE.get()
        if held is not None and tokens > 0:
            held.used = (held.used or 0) + tokens
