"""Text generation for the worker's extraction and summary prompts, with the session's own adapter."""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from tmem.server.engine import Engine, Sampling, sampling_params
from tmem.server.pool import AdapterLease, AdapterPool
from tmem.server.prompting import render_ids


class SessionGenerator(Protocol):
    """What the update worker generates extraction and summaries with (this engine, or an API replica)."""

    async def generate(self, tenant: str, sid: str, version: int | None, messages: list[dict[str, str]],
                       max_tokens: int, json_schema: dict[str, Any] | None = None) -> str:
        """Greedy text for `messages` from the session's adapter at `version` (None: the bare base model);
        JSON per `json_schema` if given."""
        ...

    def serving_requests(self) -> int | None:
        """Requests the engine is generating now, or None when the engine runs elsewhere."""
        ...


class EngineGenerator:
    """Greedy generation through this replica's engine (the inline worker inside `tmem serve`)."""

    def __init__(self, engine: Engine, pool: AdapterPool, structured: bool) -> None:
        self.engine, self.pool, self.structured = engine, pool, structured

    def serving_requests(self) -> int | None:
        return self.engine.active

    async def generate(self, tenant: str, sid: str, version: int | None, messages: list[dict[str, str]],
                       max_tokens: int, json_schema: dict[str, Any] | None = None) -> str:
        ids = render_ids(self.engine.tokenizer, messages)
        room = self.engine.max_model_len - len(ids)
        if room < 1:
            return ""  # the extraction prompt alone overflows the window: nothing to extract this time
        schema = json_schema if (json_schema and self.structured) else None
        params = sampling_params(Sampling(max_tokens=min(max_tokens, room), json_schema=schema))
        text = ""
        lease = AdapterLease.base_model() if version is None else await self.pool.lease(tenant, sid, version)
        async with lease:
            request_id = f"tmem-worker-{uuid.uuid4().hex}"
            async for output in self.engine.generate(ids, params, request_id, lease.lora_request):
                text = output.outputs[0].text
        return text
