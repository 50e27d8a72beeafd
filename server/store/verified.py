"""The one rule for which adapter version to build on: the newest stored version that verifies.

The pool serves it and the worker trains from it, so both walk down from the session's version through
`newest_verified`, and both read a version through `read_verified`: a version the pool refuses is never
the one the worker builds the next version on. Loads torch (the checks decode the tensors), so the
store package does not import this module itself.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import Tensor

from tmem.adapters.checkpoint import CheckpointError, decode_b, read_metadata
from tmem.server.metrics import METRICS
from tmem.server.store.checkpoints import CheckpointHeader, StoredCheckpoint
from tmem.server.store.sessions import RedisStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A stored version whose bytes match their sha256, hold finite tensors and a readable header."""

    version: int
    header: CheckpointHeader
    b: dict[str, Tensor]


def verify(stored: StoredCheckpoint) -> VerifiedCheckpoint:
    """The checkpoint's B and header; CheckpointError when it must not be used."""
    b = decode_b(stored.data, stored.sha256)
    try:
        header = CheckpointHeader.from_metadata(read_metadata(stored.data))
    except ValueError as exc:
        raise CheckpointError(str(exc)) from exc
    return VerifiedCheckpoint(stored.version, header, b)


async def read_verified(store: RedisStore, tenant: str, sid: str, version: int) -> VerifiedCheckpoint | None:
    """One stored version, verified; None when it is not stored, CheckpointError when it must not be used."""
    stored = await store.get_checkpoint(tenant, sid, version)
    return None if stored is None else verify(stored)


async def newest_verified(tenant: str, sid: str, version: int, load: Callable[[int], Awaitable[T | None]]) -> T | None:
    """What `load` gives for the newest version at or below `version` that is stored and not refused.

    `load(v)` returns None when v is not stored and raises CheckpointError when v must not be used (what
    `read_verified` checks, plus the caller's own needs). A refused version is counted and logged, and
    the walk goes on below it. None when nothing is left: the base model, B = 0.
    """
    for candidate in range(version, 0, -1):
        try:
            found = await load(candidate)
        except CheckpointError as exc:
            METRICS.checkpoint_faults.inc()
            log.error("refusing checkpoint %s/%s@v%d: %s", tenant, sid, candidate, exc)
            continue
        if found is not None:
            return found
    return None
