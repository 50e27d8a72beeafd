"""The replica's adapter pool: session versions as fresh vLLM LoRARequests, built from Redis checkpoints.

Decisions (ARCHITECTURE.md): never reuse an adapter name or id; write each version as a PEFT
directory on tmpfs; load the new version first, then evict the old one once no request uses it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load as load_tensors

from tmem.adapters.checkpoint import CheckpointError
from tmem.adapters.peft_io import write_peft_dir
from tmem.server.engine import lora_request
from tmem.server.metrics import METRICS
from tmem.server.store import RedisStore
from tmem.server.store.verified import VerifiedCheckpoint, newest_verified, read_verified

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

log = logging.getLogger(__name__)
SessionKey = tuple[str, str]


@dataclass(frozen=True)
class VersionTensors:
    """A stored version that verified, with the A0 its B multiplies: what a PEFT directory is built from."""

    checkpoint: VerifiedCheckpoint
    a0: dict[str, Any]

    def write_peft_dir(self, path: Path, base_model: str) -> None:
        """The version as a PEFT directory at `path`."""
        header = self.checkpoint.header
        write_peft_dir(path, header.spec, header.layers, self.a0, self.checkpoint.b, base_model)


@dataclass
class Resident:
    """One adapter version loaded in the engine, with the number of requests using it."""

    key: SessionKey
    version: int
    lora: LoRARequest
    path: Path
    refs: int = 0
    # Set when the session is deleted: unloaded as soon as no request holds it.
    doomed: bool = False


class AdapterLease:
    """One request's hold on an adapter version: what it serves, and `release()` once the request is over.

    Also an async context manager. Releasing twice is harmless: only the first release unpins.
    """

    def __init__(self, served_version: int, lora_request: LoRARequest | None,
                 unpin: Callable[[], Awaitable[None]] | None = None) -> None:
        self.served_version = served_version
        self.lora_request = lora_request  # None: the bare base model
        self._unpin = unpin

    @classmethod
    def base_model(cls) -> AdapterLease:
        """The base model alone (version 0): nothing is pinned, so there is nothing to release."""
        return cls(0, None)

    @property
    def released(self) -> bool:
        return self._unpin is None

    async def release(self) -> None:
        unpin, self._unpin = self._unpin, None
        if unpin is not None:
            await unpin()

    async def __aenter__(self) -> AdapterLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class AdapterPool:
    """Maps (tenant, session, version) to a loaded LoRARequest; evicts superseded versions when idle.

    Invariant: a LoRARequest's directory exists for as long as any request may use it, because vLLM
    re-reads the path whenever its own LRU reloads the adapter, and a missing path kills the engine core.
    So a version is pinned (refs) before any await hands it out, and only unpinned versions are removed.

    Bound: at most `max_resident` versions (and directories) stay loaded. Past it, the least recently
    used unpinned ones are unloaded; pinned ones are never touched, so a burst of concurrent sessions
    may exceed the cap until their requests end. Per-session bookkeeping (`_locks`, `_latest`) is
    dropped once a session has no resident version and no request waiting on its lock.
    """

    def __init__(self, engine: Any, store: RedisStore, adapter_dir: Path, base_model: str,
                 max_resident: int = 64) -> None:
        self.engine = engine
        self.store = store
        self.adapter_dir = Path(adapter_dir)
        self.base_model = base_model
        self.max_resident = max_resident
        self._ids = itertools.count(1)  # vLLM ids are never reused within a process
        # Least recently used first: a pin moves its version to the end.
        self._resident: OrderedDict[tuple[str, str, int], Resident] = OrderedDict()
        self._latest: dict[SessionKey, int] = {}
        self._locks: dict[SessionKey, asyncio.Lock] = {}
        self._lock_users: dict[SessionKey, int] = {}
        self._a0: dict[str, dict[str, Any]] = {}

    async def lease(self, tenant: str, sid: str, version: int) -> AdapterLease:
        """Hold the session's adapter at `version` (or the newest earlier one that verifies) for one request.

        The lease serves version 0, the bare base model (no LoRARequest), when no version verifies.
        Release it when the request ends: until then the version stays loaded and its directory stays.
        """
        resident = await self._pin(tenant, sid, version)
        if resident is None:
            return AdapterLease.base_model()
        return AdapterLease(resident.version, resident.lora, functools.partial(self._unpin, resident))

    async def _unpin(self, resident: Resident) -> None:
        resident.refs -= 1
        if resident.doomed and resident.refs == 0:
            await self._unload(resident, "deleted")
        else:
            await self._evict(resident.key)

    @property
    def resident_count(self) -> int:
        """Adapter versions loaded in the engine (each with its directory under adapter_dir)."""
        return len(self._resident)

    @property
    def tracked_sessions(self) -> int:
        """Sessions with per-session state kept (locks or latest versions): bounded by the resident cap."""
        return len(self._locks.keys() | self._latest.keys())

    @asynccontextmanager
    async def _session_lock(self, key: SessionKey) -> AsyncIterator[None]:
        """The session's lock, counted so that it is dropped once nobody holds or awaits it."""
        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                yield
        finally:
            self._lock_users[key] -= 1
            if self._lock_users[key] == 0:
                del self._lock_users[key]
            self._forget_if_unused(key)

    def _forget_if_unused(self, key: SessionKey) -> None:
        # A session with nothing loaded and nobody at its lock needs no state: the next pin rebuilds it.
        if key in self._lock_users or any(r.key == key for r in self._resident.values()):
            return
        self._locks.pop(key, None)
        self._latest.pop(key, None)

    async def _pin(self, tenant: str, sid: str, version: int) -> Resident | None:
        """The resident to serve, with its refcount raised under the session lock (so nothing evicts it)."""
        key = (tenant, sid)
        async with self._session_lock(key):
            # The newest version that verifies, as the worker trains from: a corrupt one is never served.
            found = await newest_verified(tenant, sid, version, lambda v: self._resident_or_load(tenant, sid, v))
            if found is not None:
                # No await since the lookup or the load: nothing can have evicted it in between.
                found.refs += 1
                self._resident.move_to_end((tenant, sid, found.version))
                self._latest[key] = max(self._latest.get(key, 0), found.version)
        await self._evict(key)
        return found

    async def _resident_or_load(self, tenant: str, sid: str, version: int) -> Resident | None:
        resident = self._resident.get((tenant, sid, version))
        return resident if resident is not None else await self._load(tenant, sid, version)

    async def _load(self, tenant: str, sid: str, version: int) -> Resident | None:
        """Rebuild the PEFT directory from Redis and load it into the engine; None when the version is not
        stored, CheckpointError when it must be refused."""
        tensors = await self.version_tensors(tenant, sid, version)
        if tensors is None:
            return None
        started = time.perf_counter()
        lora_id = next(self._ids)
        # The load's own id in the name and path: a session id reused after a delete never shares a
        # LoRA name (vLLM keys its prefix cache by name) or a directory with the old weights.
        path = self.adapter_dir / f"{_dir_name(tenant, sid, version)}-{lora_id}"
        await asyncio.to_thread(tensors.write_peft_dir, path, self.base_model)
        lora = lora_request(f"{tenant}/{sid}@v{version}#{lora_id}", lora_id, path)
        await self.engine.add_lora(lora)  # load the new version before anything is evicted
        METRICS.hot_swap_seconds.observe(time.perf_counter() - started)
        resident = Resident((tenant, sid), version, lora, path)
        self._resident[(tenant, sid, version)] = resident  # newest: the end of the LRU order
        METRICS.adapters_resident.set(len(self._resident))
        return resident

    async def version_tensors(self, tenant: str, sid: str, version: int) -> VersionTensors | None:
        """A stored version, verified, with its A0; None when the version does not exist, CheckpointError
        when it must be refused."""
        checkpoint = await read_verified(self.store, tenant, sid, version)
        if checkpoint is None:
            return None
        return VersionTensors(checkpoint, await self._a0_for(checkpoint.header.a0))

    async def write_version(self, tenant: str, sid: str, version: int, path: Path) -> bool:
        """Write a stored version as a PEFT directory at `path` (e.g. for download); False if absent."""
        tensors = await self.version_tensors(tenant, sid, version)
        if tensors is None:
            return False
        await asyncio.to_thread(tensors.write_peft_dir, path, self.base_model)
        return True

    async def _a0_for(self, identity: str) -> dict[str, Any]:
        if identity not in self._a0:
            blob = await self.store.get_a0(identity)
            if blob is None:
                raise CheckpointError(f"A0 {identity} is not in Redis")
            self._a0[identity] = load_tensors(blob)
        return self._a0[identity]

    async def _evict(self, key: SessionKey) -> None:
        """Unload the session's superseded idle versions, then the least recently used idle ones over the cap."""
        latest = self._latest.get(key, 0)
        superseded = [r for r in self._resident.values() if r.key == key and r.refs == 0 and r.version < latest]
        over = len(self._resident) - len(superseded) - self.max_resident
        chosen = {id(r) for r in superseded}
        lru = [r for r in self._resident.values() if r.refs == 0 and id(r) not in chosen][:max(0, over)]
        # Out of the index before any await: a concurrent pin then loads its own copy instead of
        # raising the refcount of a version that is being removed.
        for resident in (*superseded, *lru):
            del self._resident[(*resident.key, resident.version)]
        for resident in superseded:
            await self._unload(resident, "superseded")
        for resident in lru:
            await self._unload(resident, "lru")
        if lru and len(self._resident) > self.max_resident:
            log.warning("adapter pool over its cap (%d > %d): every other version is in use",
                        len(self._resident), self.max_resident)

    async def _unload(self, resident: Resident, reason: str) -> None:
        if self._resident.get((*resident.key, resident.version)) is resident:
            del self._resident[(*resident.key, resident.version)]
        try:
            await self.engine.remove_lora(resident.lora.lora_int_id)
        finally:
            shutil.rmtree(resident.path, ignore_errors=True)
            METRICS.adapters_resident.set(len(self._resident))
            METRICS.adapter_evictions.labels(reason).inc()
            self._forget_if_unused(resident.key)

    async def forget(self, tenant: str, sid: str) -> None:
        """Drop every version of a deleted session: now if idle, else when its last request ends."""
        key = (tenant, sid)
        async with self._session_lock(key):
            doomed = [r for r in self._resident.values() if r.key == key]
            for resident in doomed:
                resident.doomed = True
                # Out of the index at once: a new session under the same id loads its own versions.
                del self._resident[(*key, resident.version)]
            self._latest.pop(key, None)
        for resident in doomed:
            if resident.refs == 0:
                await self._unload(resident, "deleted")  # in use: the last lease's release unloads it



def _dir_name(tenant: str, sid: str, version: int) -> str:
    # A digest, not the id: nothing a client sends becomes part of a file path.
    digest = hashlib.sha256(f"{tenant}\0{sid}".encode()).hexdigest()[:24]
    return f"{digest}-v{version}"
