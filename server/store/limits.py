"""Bounds on what one session and the job queue may hold in Redis (the store's share of the settings)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StoreLimits:
    """Bounds on what one session and the job queue may hold in Redis (see Settings for each)."""

    max_checkpoints: int = 8
    max_session_messages: int = 20_000
    max_session_bytes: int = 16_000_000
    idempotency_ttl_s: int = 86_400
    max_idempotency_keys: int = 1024
    job_stream_maxlen: int = 100_000
    job_stale_after_s: float = 900.0

    @classmethod
    def from_settings(cls, settings: Any) -> StoreLimits:
        """The limits configured in `tmem.server.settings.Settings` (duck-typed: the store does not import it)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls) if hasattr(settings, f.name)})
