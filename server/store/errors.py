"""What the store refuses, and the one mapping of redis-py's faults onto StoreUnavailable."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

P = ParamSpec("P")
R = TypeVar("R")


class StoreUnavailable(Exception):
    """Redis could not be reached (after the client's bounded retries); the HTTP layer answers 503."""


class StoreFull(StoreUnavailable):
    """Redis refused a command at maxmemory (noeviction: it never drops data to make room); also a 503."""


class QueueFull(Exception):
    """The update queue holds `job_stream_maxlen` jobs; nothing was written (the HTTP layer answers 503)."""


class SessionNotFound(Exception):
    """The session does not exist (or was deleted meanwhile): writes never recreate a session."""


class StaleSnapshot(Exception):
    """The session changed (another commit, or deletion) since the snapshot was taken; nothing was written."""


class SessionFull(Exception):
    """The session holds `max_session_messages` messages or `max_session_bytes` bytes; nothing was written."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.limit = limit  # "turns" or "bytes"


class IdempotencyKeyReused(Exception):
    """The idempotency key was already used for a different request; nothing was written."""


class InvalidIdempotencyKey(ValueError):
    """An idempotency key that is empty or longer than MAX_IDEMPOTENCY_KEY_CHARS."""


class A0Corrupt(Exception):
    """The stored A0 does not match its stored sha256, or not the shapes this worker trains against."""


def faults_as_unavailable(fn: Callable[P, Awaitable[R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn redis-py's connection and timeout errors into StoreUnavailable: one mapping for every method."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise StoreUnavailable(f"Redis unavailable: {exc}") from exc
        except OutOfMemoryError as exc:  # "OOM command not allowed...": transient for us, a full disk to the operator
            raise StoreFull(f"Redis is out of memory: {exc}") from exc

    return wrapper
