"""`tmem worker`: the update worker as its own process, for scale-out and for surviving crashes.

It holds the trainer's frozen model but no inference engine: extraction and summaries are generated
by an API replica (`--api-url`) with the session's live adapter, so one engine keeps the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import httpx

from tmem.server.flags import add_settings_flags, settings_from_args
from tmem.server.settings import WORKER_FIELDS, Settings, check_api_key

log = logging.getLogger(__name__)


class HttpGenerator:
    """Greedy generation through an API replica, never recorded as a turn of the session."""

    def __init__(self, api_url: str, api_key: str | None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=api_url.rstrip("/"), headers=headers, timeout=timeout_s)

    async def generate(self, tenant: str, sid: str, version: int | None, messages: list[dict[str, str]],
                       max_tokens: int, json_schema: dict[str, Any] | None = None) -> str:
        # The replica serves the session's live version; without the session header, the base model.
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
        if json_schema is not None:
            schema = {"name": "qa_pairs", "schema": json_schema}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        # With keys configured, --api-key is a service key (`*=<key>`) acting for the session's tenant.
        headers = {"X-TMEM-Record": "false", "X-TMEM-Tenant": tenant}
        if version is not None:
            headers["X-Session-ID"] = sid
        response = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        if response.status_code == 400 and json_schema is not None:
            # A replica whose engine lacks structured output: the tolerant parser copes with free text.
            body.pop("response_format")
            response = await self.client.post("/v1/chat/completions", json=body, headers=headers)
        if response.status_code in (401, 403):
            # Otherwise every update fails the same way with a bare status: say what to fix.
            log.error("the API refused the worker (%d): give it the service key configured there as `*=<key>` "
                      "(TMEM_WORKER_KEY or --worker-key-file)", response.status_code)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"] or "")

    def serving_requests(self) -> int | None:
        return None  # the engine is another process (or machine): the trainer keeps --worker-threads

    async def aclose(self) -> None:
        await self.client.aclose()


async def run_worker(settings: Settings, api_url: str, api_key: str | None, metrics_port: int | None = None) -> None:
    from tmem.server.store import RedisStore, StoreLimits
    from tmem.server.trainer_runtime import TrainerRuntime
    from tmem.server.worker import UpdateWorker

    if settings.redis_url is None:
        raise SystemExit("tmem worker needs --redis-url (the Redis the API replicas use)")
    if metrics_port:
        from prometheus_client import start_http_server

        from tmem.server.metrics import METRICS

        # Update lag, losses and queue depth live in this process: Prometheus scrapes it here.
        start_http_server(metrics_port, registry=METRICS.registry)
    store = RedisStore.from_url(settings.redis_url, prefix=settings.redis_prefix,
                                limits=StoreLimits.from_settings(settings))
    runtime = await asyncio.to_thread(TrainerRuntime.load, settings)
    generator = HttpGenerator(api_url, api_key)
    worker = UpdateWorker(store, runtime, generator, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    log.info("worker %s ready (api %s)", worker.name, api_url)
    try:
        await worker.run()
    finally:
        await generator.aclose()
        await store.aclose()


def worker_key(settings: Settings, flag_key: str | None = None) -> str | None:
    """The service key the worker sends: --worker-key-file, else TMEM_WORKER_KEY, else --api-key; None if unset.

    A file or the environment keeps the key out of `ps` and shell history, which a flag does not.
    """
    key = flag_key
    if settings.worker_key_file is not None:
        key = _read_key_file(Path(settings.worker_key_file))
    elif settings.worker_key is not None:
        key = settings.worker_key.get_secret_value()
    elif flag_key:
        log.warning("--api-key is visible to every local user (ps); prefer TMEM_WORKER_KEY or --worker-key-file")
    key = (key or "").strip()
    if not key:
        return None
    try:
        check_api_key(key)
    except ValueError as exc:  # the message names the rule, never the key
        raise SystemExit(f"tmem worker: the worker key is refused: {exc}") from exc
    return key


def _read_key_file(path: Path) -> str:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SystemExit(f"tmem worker: cannot read the worker key file {path}: {exc.strerror}") from exc
    if not text.strip():
        raise SystemExit(f"tmem worker: the worker key file {path} is empty")
    return text


def register(sub: Any) -> None:
    """Add `tmem worker`, with the flags of the settings it reads (WORKER_FIELDS) and its own."""
    parser: argparse.ArgumentParser = sub.add_parser("worker", help="run the update worker alone (scale-out)")
    add_settings_flags(parser, WORKER_FIELDS)
    parser.add_argument("--api-url", required=True, help="an API replica used for extraction generation")
    parser.add_argument("--api-key", default=None,
                        help="service key for the API replica (prefer TMEM_WORKER_KEY or --worker-key-file)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")

    def cmd(args: argparse.Namespace) -> int:
        settings = settings_from_args(args)
        asyncio.run(run_worker(settings, args.api_url, worker_key(settings, args.api_key), args.metrics_port))
        return 0

    parser.set_defaults(func=cmd)
