"""What the store hands back: a session's state, the outcome of an append or a commit, an update's snapshot."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

MAX_IDEMPOTENCY_KEY_CHARS = 255  # as Stripe: room for a UUID or a client's own scheme, not for a payload


def request_fingerprint(body: Any) -> str:
    """The sha256 of a request body as canonical JSON: what an idempotency key is bound to."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


class SessionState(BaseModel):
    """One session as the server sees it."""

    session_id: str
    tenant: str
    adapter_version: int = 0  # 0 = the base model, no adapter
    adapter_sha256: str | None = None
    turns: int = 0  # messages stored
    absorbed_turns: int = 0  # messages already turned into an update
    teach_pending: int = 0  # taught pairs waiting for the next update
    summary: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    job_pending: bool = False
    last_error: str | None = None
    last_job: str | None = None  # job_id of the last commit: a job with this id has nothing left to do
    last_update: dict[str, Any] | None = None  # what the last committed update did (pairs, fallback, summary)

    @property
    def pending_updates(self) -> int:
        """Messages plus taught pairs not yet absorbed into the adapter (0 = the adapter is current)."""
        return max(0, self.turns - self.absorbed_turns) + self.teach_pending


@dataclass(frozen=True)
class AppendResult:
    """Outcome of append_turns; a duplicate carries the result stored by the first call."""

    turns_total: int
    appended: int
    duplicate: bool
    queued: bool = False  # an update job was queued in the same step


@dataclass(frozen=True)
class UpdateSnapshot:
    """What one update consumes: the unabsorbed turns and all pending teach pairs, at one instant."""

    version: int
    generation: int  # commits so far; commit_update refuses a snapshot whose generation moved on
    absorbed_turns: int
    turns_total: int
    new_turns: list[dict[str, Any]] = field(default_factory=list)
    teach_pairs: list[dict[str, Any]] = field(default_factory=list)
    teach_count: int = 0
    summary: str = ""
    incarnation: str = ""  # the session this snapshot read; a commit into a recreated session is refused


@dataclass(frozen=True)
class CommitResult:
    """The session's version after a commit, and whether this commit created it."""

    version: int
    bumped: bool
