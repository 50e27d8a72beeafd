"""TMEM: an inference server in which every conversation learns in its weights while it is served.

One import package over the product's rooms, each an import name of its own:

- ``tmem.client``   the Python SDK (``pip install tmem``: httpx and pydantic only)
- ``tmem.server``   the OpenAI-compatible server, its store, worker and CLI (``tmem[cpu]`` / ``tmem[gpu]``)
- ``tmem.adapters`` the fast-weight math, with no HTTP, Redis or vLLM (part of ``tmem[server]``)
- ``tmem.bench``    load tests, benchmarks and evaluations (``tmem[bench]``)

``from tmem import Client`` is the SDK's client; nothing heavier is imported until it is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The one version string: pyproject.toml reads it from here, the server reports it.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from tmem.client import AsyncTMEMClient as AsyncClient
    from tmem.client import TMEMClient as Client

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import tmem.server.cli` does not load the SDK and `import tmem` stays free.
    if name in ("Client", "AsyncClient"):
        from tmem import client

        return client.TMEMClient if name == "Client" else client.AsyncTMEMClient
    raise AttributeError(f"module 'tmem' has no attribute {name!r}")
