"""The Redis store, one job per module: `keys` (every key name), `sessions` (RedisStore: session state,
turns, memories, checkpoints, the update lock, A0), `jobs` (the update job stream, held by the store),
`ratelimits` (the per-key rate-limit counters, held by the store), `scripts` (Lua), `checkpoints` (the
checkpoint records), `errors` (what the store refuses).

Two modules are imported by name, not re-exported here: `verified` (the newest version that verifies;
it loads torch) and `refusals` (the HTTP errors the refusals become; it loads fastapi).
"""

from tmem.server.store.checkpoints import CheckpointHeader, StoredCheckpoint
from tmem.server.store.errors import (
    A0Corrupt,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    QueueFull,
    SessionFull,
    SessionNotFound,
    StaleSnapshot,
    StoreFull,
    StoreUnavailable,
)
from tmem.server.store.jobs import Job, JobQueue
from tmem.server.store.keys import KeyLayout
from tmem.server.store.limits import StoreLimits
from tmem.server.store.ratelimits import RateLimitCounters, TokenHold, Window
from tmem.server.store.records import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    AppendResult,
    CommitResult,
    SessionState,
    UpdateSnapshot,
    request_fingerprint,
)
from tmem.server.store.sessions import RedisStore

__all__ = [
    "MAX_IDEMPOTENCY_KEY_CHARS",
    "A0Corrupt",
    "AppendResult",
    "CheckpointHeader",
    "CommitResult",
    "IdempotencyKeyReused",
    "InvalidIdempotencyKey",
    "Job",
    "JobQueue",
    "KeyLayout",
    "QueueFull",
    "RateLimitCounters",
    "RedisStore",
    "SessionFull",
    "SessionNotFound",
    "SessionState",
    "StaleSnapshot",
    "StoreFull",
    "StoreLimits",
    "StoreUnavailable",
    "StoredCheckpoint",
    "TokenHold",
    "UpdateSnapshot",
    "Window",
    "request_fingerprint",
]
