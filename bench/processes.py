"""Server and worker subprocesses for benchmarks and tests: started, waited for, logged and stopped one way.

Each child runs in its own process group, so that stopping it also reaches the processes it starts (vLLM's
engine core and workers), and appends its output to a log file the caller can show when something fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import httpx

POLL_S = 0.25  # how often a starting child is checked
GROUP_GRACE_S = 5.0  # how long what is left of a stopped child's group gets before SIGKILL
WORKER_READY = b" ready (api "  # the line `tmem worker` logs once it takes jobs
# The random tiny model on a small CPU machine: fp32 (vLLM's greedy tokens then match transformers + PEFT
# exactly) and a small KV cache; it never closes its JSON, so extraction and summaries are capped.
TINY_ENGINE_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.08", "--max-model-len", "2048",
                     "--context-tokens", "1536"]
TINY_WORKER_FLAGS = ["--extraction-chunk-tokens", "384", "--extraction-max-tokens", "96", "--summary-max-tokens", "48"]
_Child = TypeVar("_Child", bound="ChildProcess")
_Worker = TypeVar("_Worker", bound="TmemWorker")


def tmem_command(*args: str) -> list[str]:
    """`tmem ARGS` run by this interpreter, so the child imports the same `tmem` as the caller."""
    return [sys.executable, "-m", "tmem.server.cli", *args]


class ChildProcess:
    """One subprocess in its own process group, its output appended to `log_path`; ready when `ready()` says so.

    `env` is added to this process's environment (plus unbuffered Python output, so the log is current).
    """

    start_timeout_s = 600.0

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name, self.cmd, self.log_path = name, list(cmd), log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        """True once the child serves; each kind of child says how it knows."""
        raise NotImplementedError

    def start(self: _Child, timeout_s: float | None = None) -> _Child:
        """Start the child and wait until it is ready; raise, with the log's tail, if it exits or times out first."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        print(f"starting {self.name} (log: {self.log_path})", file=sys.stderr, flush=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()  # what it started (vLLM's engine processes) may still run
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   f"{self.log_tail()}")
            if self.ready():
                return self
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout_s} s; see {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of the child's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL to the whole group: a crash, with no chance to ack, release a lock or clean up."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the whole group; after `timeout_s`, and once more for what is left of it, SIGKILL."""
        if self.proc is None:
            return
        group = self.proc.pid
        _signal_group(group, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        # A vLLM worker can outlive the server it belongs to: ask what is left once more, then force it.
        if _signal_group(group, signal.SIGTERM):
            deadline = time.monotonic() + GROUP_GRACE_S
            while time.monotonic() < deadline and _signal_group(group, 0):
                time.sleep(POLL_S)
        _signal_group(group, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def __enter__(self: _Child) -> _Child:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class HttpServer(ChildProcess):
    """A server child on 127.0.0.1:`port`, ready once GET /health answers 200."""

    def __init__(self, name: str, cmd: Sequence[str], port: int, log_path: Path,
                 env: Mapping[str, str] | None = None) -> None:
        super().__init__(name, cmd, log_path, env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200
        return False


class TmemWorker(ChildProcess):
    """`tmem worker ARGS`, ready once it logs that it takes jobs."""

    def __init__(self, args: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__("tmem worker", tmem_command("worker", *args), log_path, env)

    def ready(self) -> bool:
        return WORKER_READY in self.log_path.read_bytes()

    def start(self: _Worker, timeout_s: float | None = None) -> _Worker:
        self.log_path.write_bytes(b"")  # a ready line from an earlier worker must not count
        return super().start(timeout_s)


def _signal_group(group: int, sig: int) -> bool:
    """Signal a process group (0: only ask whether it has members); False when it has none."""
    try:
        os.killpg(group, sig)
        return True
    except ProcessLookupError:
        return False
