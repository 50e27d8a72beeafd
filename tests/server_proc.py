"""Start `tmem serve` and `tmem worker` as real subprocesses for integration tests, and stop them."""

from __future__ import annotations

from pathlib import Path

from tmem.bench.processes import TINY_ENGINE_FLAGS, TINY_WORKER_FLAGS, HttpServer, TmemWorker, tmem_command
from tmem.server.redis_proc import free_port

# A trainer config that learns a handful of pairs in one update on the random tiny model.
TEST_TRAINER_FLAGS = ["--optimizer", "adam", "--lr", "0.01", "--epochs", "30", "--batch-size", "16"]
TEST_ENGINE_FLAGS = TINY_ENGINE_FLAGS
TEST_WORKER_FLAGS = TINY_WORKER_FLAGS
# The real demo model (SmolLM2-135M-Instruct) with the server's own defaults: calibrated trainer preset,
# bounded extraction. Its fp32 weights need a larger share of host memory than the tiny model.
REAL_MODEL_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.25", "--max-model-len", "2048",
                    "--context-tokens", "1536"]


def a0_cache(log_path: Path) -> dict[str, str]:
    """Environment that makes every child of one test run share the A0 cache beside its logs."""
    return {"TMEM_A0_CACHE_DIR": str(log_path.parent / "a0")}


class ServerProcess(HttpServer):
    """`tmem serve` on a free loopback port, logging to a file the test report can show.

    `flags` replaces the tiny-model test flags (engine, worker, trainer) as a whole, e.g. REAL_MODEL_FLAGS.
    """

    start_timeout_s = 240.0

    def __init__(self, model_dir: Path, redis_url: str, log_path: Path, extra: list[str] | None = None,
                 flags: list[str] | None = None) -> None:
        port = free_port()
        base = flags if flags is not None else [*TEST_ENGINE_FLAGS, *TEST_WORKER_FLAGS, *TEST_TRAINER_FLAGS]
        cmd = tmem_command("serve", "--model", str(model_dir), "--redis-url", redis_url, "--port", str(port),
                           *base, *(extra or []))
        super().__init__("tmem serve", cmd, port, log_path, a0_cache(log_path))


class WorkerProcess(TmemWorker):
    """`tmem worker` as its own process (no engine: it generates through the API replica at `api_url`)."""

    start_timeout_s = 120.0

    def __init__(self, model_dir: Path, redis_url: str, api_url: str, log_path: Path,
                 extra: list[str] | None = None) -> None:
        super().__init__(["--model", str(model_dir), "--redis-url", redis_url, "--api-url", api_url,
                          *TEST_WORKER_FLAGS, *TEST_TRAINER_FLAGS, *(extra or [])],
                         log_path, a0_cache(log_path))
