"""How the store's refusals reach a client: each one mapped once to its OpenAI-shaped HTTP error."""

from __future__ import annotations

import tmem.server.store.errors as refused
from tmem.server.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    UnprocessableContent,
    register_exception,
)


def register_store_errors() -> None:
    """Register every store refusal with server.errors (StoreUnavailable is mapped by the app, with its metric)."""
    register_exception(refused.SessionNotFound,
                       lambda e: NotFound(str(e), param="session_id", code="session_not_found"))
    register_exception(refused.SessionFull, lambda e: PayloadTooLarge(str(e), code="session_full"))
    register_exception(refused.QueueFull, lambda e: ServiceUnavailable(str(e), retry_after=5, code="update_queue_full"))
    register_exception(
        refused.IdempotencyKeyReused,
        lambda e: UnprocessableContent(str(e), param="Idempotency-Key", code="idempotency_key_reused"))
    register_exception(
        refused.InvalidIdempotencyKey,
        lambda e: InvalidRequest(str(e), param="Idempotency-Key", code="invalid_idempotency_key"))
    # A broken shared A0 is an operator's fix (the message says which key), not the client's.
    register_exception(refused.A0Corrupt, lambda e: ServiceUnavailable(str(e), retry_after=30, code="a0_corrupt"))
