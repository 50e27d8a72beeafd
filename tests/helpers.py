"""Helpers for integration tests: direct Redis writes of adapter versions, greedy chats, adapter downloads."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from typing import Any

import httpx
import torch

from tmem.server.store import RedisStore

TENANT = "default"


def write_version(redis_url: str, sid: str, runtime: Any, b: dict[str, torch.Tensor], prefix: str = "tmem") -> int:
    """Commit B as the session's next version, exactly as the worker would (A0 published too)."""

    async def go() -> int:
        store = RedisStore.from_url(redis_url, prefix=prefix)
        try:
            await store.put_a0(runtime.identity, runtime.a0_blob)
            await store.ensure_session(TENANT, sid)
            snap = await store.claim_snapshot(TENANT, sid)
            ckpt = runtime.encode(b)
            result = await store.commit_update(TENANT, sid, snap, checkpoint=ckpt.data, sha256=ckpt.sha256,
                                               summary=None, job_id=f"test:{sid}:{snap.version + 1}")
            return int(result.version)
        finally:
            await store.aclose()

    return asyncio.run(go())


def greedy(url: str, question: str, sid: str | None = None, max_tokens: int = 24, record: bool = False
           ) -> tuple[str, int]:
    """(reply text, served adapter version) of a temperature-0 chat."""
    headers = {"X-TMEM-Record": "true" if record else "false"}
    if sid is not None:
        headers["X-Session-ID"] = sid
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"], int(response.headers["X-TMEM-Adapter-Version"])


def download_adapter(url: str, sid: str, dest: Path) -> tuple[Path, int]:
    response = httpx.get(f"{url}/v1/sessions/{sid}/adapter", timeout=60)
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    (folder,) = list(dest.iterdir())
    return folder, int(response.headers["X-TMEM-Adapter-Version"])


def teach_and_flush(url: str, sid: str, pairs: list[tuple[str, str]]) -> int:
    body = {"pairs": [{"instruction": q, "output": a} for q, a in pairs]}
    assert httpx.post(f"{url}/v1/sessions/{sid}/memories", json=body, timeout=30).status_code == 200
    flushed = httpx.post(f"{url}/v1/sessions/{sid}/flush", json={"timeout": 180}, timeout=200)
    assert flushed.status_code == 200, flushed.text
    return int(flushed.json()["adapter_version"])


def session_info(url: str, sid: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())
