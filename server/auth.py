"""API keys → tenants, checked in constant time; per-tenant request and token rate limits."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from server.errors import Forbidden, RateLimited, Unauthorized
from server.settings import Settings, check_api_key

log = logging.getLogger(__name__)
OPEN_TENANT = "default"
# A key configured as `*=<key>` is a service key (the standalone worker's): it acts for the tenant it
# names in `X-TMEM-Tenant`, and for no tenant of its own.
SERVICE_TENANT = "*"
_TENANT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$")


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, each naming its tenant. Empty means the server runs open."""

    entries: tuple[tuple[str, bytes], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        lines = list(settings.api_keys)
        if settings.api_keys_file is not None:
            text = Path(settings.api_keys_file).read_text()
            lines += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        return cls(tuple(_entry(line) for line in lines))

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def tenant_for(self, authorization: str | None, acting_for: str | None = None) -> str:
        """The tenant of a `Bearer <key>` header (a service key's named tenant); 401 for a missing or unknown key."""
        if not self.enabled:
            return OPEN_TENANT
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
        if found == SERVICE_TENANT:
            if not acting_for or not _TENANT_RE.fullmatch(acting_for):
                raise Forbidden("a service key must name its tenant in X-TMEM-Tenant", param="X-TMEM-Tenant")
            return acting_for
        if acting_for and acting_for != found:
            raise Forbidden("only a service key may act for another tenant", param="X-TMEM-Tenant")
        return found


def _entry(line: str) -> tuple[str, bytes]:
    tenant, sep, key = line.partition("=")
    if not sep:
        key = tenant
        # A bare key's tenant is a digest of it: stable across restarts, never the key itself.
        tenant = "t-" + hashlib.sha256(key.encode()).hexdigest()[:16]
    check_api_key(key)
    return tenant.strip(), key.strip().encode()


class RateLimiter:
    """Fixed one-minute windows per tenant, counted in Redis so every replica shares them."""

    def __init__(self, redis: object | None, prefix: str, rpm: int, tpm: int) -> None:
        self.redis, self.prefix, self.rpm, self.tpm = redis, prefix, rpm, tpm

    @property
    def enabled(self) -> bool:
        return self.redis is not None and (self.rpm > 0 or self.tpm > 0)

    def _key(self, kind: str, tenant: str) -> tuple[str, int]:
        window = int(time.time() // 60)
        return f"{self.prefix}:rl:{kind}:{{{tenant}}}:{window}", 60 - int(time.time() % 60)

    async def admit(self, tenant: str) -> None:
        """Count one request; 429 with Retry-After once the minute's requests or tokens are spent."""
        if not self.enabled:
            return
        try:
            await self._admit(tenant)
        except RateLimited:
            raise
        except Exception as exc:  # Redis away: fail open for rate limits, the store reports its own outage
            log.warning("rate limiter unavailable (%s); admitting", exc)

    async def _admit(self, tenant: str) -> None:
        redis = self.redis
        assert redis is not None
        if self.rpm > 0:
            key, retry = self._key("req", tenant)
            count = await redis.incr(key)  # type: ignore[attr-defined]
            if count == 1:
                await redis.expire(key, 120)  # type: ignore[attr-defined]
            if count > self.rpm:
                raise RateLimited(f"Rate limit reached: {self.rpm} requests per minute.", retry_after=retry,
                                  code="rate_limit_exceeded")
        if self.tpm > 0:
            key, retry = self._key("tok", tenant)
            used = int(await redis.get(key) or 0)  # type: ignore[attr-defined]
            if used >= self.tpm:
                raise RateLimited(f"Rate limit reached: {self.tpm} tokens per minute.", retry_after=retry,
                                  code="tokens_limit_exceeded")

    async def add_tokens(self, tenant: str, tokens: int) -> None:
        if not self.enabled or self.tpm <= 0 or tokens <= 0:
            return
        key, _ = self._key("tok", tenant)
        try:
            await self.redis.incrby(key, tokens)  # type: ignore[union-attr]
            await self.redis.expire(key, 120)  # type: ignore[union-attr]
        except Exception as exc:
            log.warning("rate limiter unavailable (%s); tokens not counted", exc)
