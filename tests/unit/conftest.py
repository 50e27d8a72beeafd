"""Fixtures the unit tests share: a real, private redis-server per module and a store on it per test, and the
tokenizer of the tiny model a module builds (its own `model_dir` fixture)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_fixture import RedisServer

from tmem.server.store import RedisStore


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def store(redis_srv: RedisServer) -> AsyncIterator[RedisStore]:
    """A store under its own key prefix, so tests sharing the module's redis-server never see each other."""
    s = RedisStore.from_url(redis_srv.url, prefix=f"t{uuid.uuid4().hex[:10]}", socket_timeout=2.0)
    await s.jobs.ensure_group()
    yield s
    await s.aclose()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    """The tokenizer of the module's tiny model (`model_dir`: each module builds the size it needs)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
