"""A real, private `redis-server` for tests: a free loopback port, a temp data dir, AOF on, no RDB.

    with RedisServer() as server:
        url = server.url
        server.stop()      # clients now see connection errors
        server.restart()   # same port, same data dir: the AOF brings the data back

Plain code, no pytest: unit and integration suites (and scripts) wrap it in their own fixtures.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from tmem.server.redis_proc import await_redis, free_port, stop_redis

FALLBACK_BINARY = "/usr/bin/redis-server"


def find_redis_server() -> str:
    """The redis-server binary: $TMEM_REDIS_SERVER, then PATH, then /usr/bin."""
    candidate = os.environ.get("TMEM_REDIS_SERVER") or shutil.which("redis-server") or FALLBACK_BINARY
    if not Path(candidate).is_file():
        raise RuntimeError("redis-server not found: install it (`make redis`) or set TMEM_REDIS_SERVER")
    return candidate


def _answers_ping(port: int) -> bool:
    """True once the server accepts commands (a server still loading its AOF answers -LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; start/stop/restart keep the port and the data dir."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None, start_timeout_s: float = 10.0) -> None:
        self.port = port or free_port()
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="tmem-redis-"))
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL of this server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
                "--save", "", "--appendonly", "yes", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log")]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await_redis(self._proc, lambda: _answers_ping(self.port), self.start_timeout_s, self.data_dir / "redis.log")
        return self

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM: Redis flushes its AOF before it exits)."""
        if self._proc is not None:
            stop_redis(self._proc)
        self._proc = None

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port with the same data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the data dir when this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A started RedisServer, closed (and its data dir removed) on exit."""
    with RedisServer() as server:
        yield server
