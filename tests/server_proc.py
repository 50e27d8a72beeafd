"""Start `tmem serve` as a real subprocess for integration tests, and stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tmem.server.redis_proc import free_port

# A trainer config that learns a handful of pairs in one update on the random tiny model.
TEST_TRAINER_FLAGS = ["--optimizer", "adam", "--lr", "0.01", "--epochs", "30", "--batch-size", "16"]
# fp32 so vLLM's greedy tokens match transformers + PEFT exactly; small KV cache for 2-core CI.
TEST_ENGINE_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.08", "--max-model-len", "2048",
                     "--context-tokens", "1536"]
# Short extraction/summary generations: the random model never closes its JSON, so cap what it writes.
TEST_WORKER_FLAGS = ["--extraction-chunk-tokens", "384", "--extraction-max-tokens", "96", "--summary-max-tokens", "48"]


def spawn(cmd: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a `tmem` subprocess in its own process group, logging to `log_path`, sharing the A0 cache."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after this returns
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMEM_A0_CACHE_DIR": str(log_path.parent / "a0")}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


# The real demo model (SmolLM2-135M-Instruct) with the server's own defaults: calibrated trainer preset,
# bounded extraction. Its fp32 weights need a larger share of host memory than the tiny model.
REAL_MODEL_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.25", "--max-model-len", "2048",
                    "--context-tokens", "1536"]


class ServerProcess:
    """`tmem serve` on a free loopback port, logging to a file the test report can show.

    `flags` replaces the tiny-model test flags (engine, worker, trainer) as a whole, e.g. REAL_MODEL_FLAGS.
    """

    def __init__(self, model_dir: Path, redis_url: str, log_path: Path, extra: list[str] | None = None,
                 flags: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        base = flags if flags is not None else [*TEST_ENGINE_FLAGS, *TEST_WORKER_FLAGS, *TEST_TRAINER_FLAGS]
        self.cmd = [sys.executable, "-m", "tmem.server.cli", "serve", "--model", str(model_dir),
                    "--redis-url", redis_url, "--port", str(self.port), *base, *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 240.0) -> ServerProcess:
        self.proc = spawn(self.cmd, self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


class WorkerProcess:
    """`tmem worker` as its own process (no engine: it generates through the API replica at `api_url`)."""

    def __init__(self, model_dir: Path, redis_url: str, api_url: str, log_path: Path,
                 extra: list[str] | None = None) -> None:
        self.log_path = log_path
        self.cmd = [sys.executable, "-m", "tmem.server.cli", "worker", "--model", str(model_dir),
                    "--redis-url", redis_url, "--api-url", api_url, "--dtype", "float32",
                    *TEST_WORKER_FLAGS, *TEST_TRAINER_FLAGS, *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120.0) -> WorkerProcess:
        self.log_path.write_bytes(b"")
        self.proc = spawn(self.cmd, self.log_path)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if b" ready (api " in self.log_path.read_bytes():
                return self
            time.sleep(0.2)
        self.kill()
        raise RuntimeError("worker did not become ready")

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to ack, release the lock or clean up."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
