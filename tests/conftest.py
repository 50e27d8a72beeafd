"""Shared fixtures: one tiny model, one redis-server and one `tmem serve` (one vLLM engine) per test session."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis_fixture import RedisServer
from server_proc import ServerProcess

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tmem")


@pytest.fixture(scope="session")
def tiny_model_dir(artifacts: Path) -> Path:
    """The default-size tiny model (4 layers, hidden 256, head_dim 64), built at run time."""
    from tmem.adapters.tiny_model import build_tiny_model

    return build_tiny_model(artifacts / "tiny-model", layers=4, hidden=256, seed=0)


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The real demo model (SmolLM2-135M-Instruct, fp32), built once into the repo's .cache by `make test`."""
    from tmem.adapters.demo_model import build_demo_model

    return build_demo_model(REPO / ".cache" / "demo-model", quiet=True)


@pytest.fixture(scope="session")
def redis_main(artifacts: Path) -> Iterator[RedisServer]:
    with RedisServer(data_dir=artifacts / "redis-main") as server:
        yield server


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, redis_main: RedisServer, artifacts: Path) -> Iterator[ServerProcess]:
    """The shared `tmem serve`: real vLLM engine, real Redis, inline worker, test trainer config."""
    with ServerProcess(tiny_model_dir, redis_main.url, artifacts / "server-main.log") as proc:
        yield proc


@pytest.fixture()
def sid() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def openai_client(server: ServerProcess) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def run(coro: Any) -> Any:
    """Run one coroutine to completion from a sync test."""
    return asyncio.run(coro)
