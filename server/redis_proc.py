"""A private `redis-server` for `tmem serve` without --redis-url: persistent, password-protected, stopped on exit.

Its data dir (default `.cache/redis`) outlives the server, so a restart keeps every session. The password is
generated once and kept in that dir (mode 0600); redis-server reads it from a config file there, so it never
appears in a process listing.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

DEFAULT_DATA_DIR = Path(".cache/redis")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def await_redis(proc: subprocess.Popen[bytes], answers: Callable[[], bool], timeout_s: float, log: Path) -> None:
    """Wait until a starting redis-server `answers()`; if it exits or `timeout_s` passes first, stop it and raise
    RuntimeError saying which, with the end of its `log`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if answers():
            return
        time.sleep(0.05)
    code = proc.poll()
    stop_redis(proc)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    what = f"exited with {code}" if code is not None else f"did not answer within {timeout_s}s"
    raise RuntimeError(f"redis-server {what}; see {log}:\n{tail}")


def stop_redis(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM (redis-server flushes its AOF before it exits), then SIGKILL if it is still there after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _write_private(path: Path, text: str) -> None:
    """Create or replace `path` readable by its owner only (never briefly world-readable)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


def _redis_string(value: str) -> str:
    """A double-quoted redis.conf argument (paths may hold spaces)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class PrivateRedis:
    """redis-server on loopback with AOF persistence and a password, its data in `data_dir`."""

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `make install` installs it, or pass --redis-url")
        self.binary = binary
        self.data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = ""
        self._lock: IO[bytes] | None = None

    @property
    def address(self) -> str:
        """host:port, for logs (the URL carries the password)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The URL with the password (known before start: a caller may hand it to children first)."""
        return f"redis://:{self._password()}@127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        self._take_lock()
        config = self.data_dir / "redis.conf"
        _write_private(config, self._config())
        # The lock file goes to the child too: the lock lasts as long as a redis-server that outlives us.
        assert self._lock is not None
        self.proc = subprocess.Popen([self.binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=_child_env(), pass_fds=(self._lock.fileno(),))
        try:
            await_redis(self.proc, self._answers, timeout_s, self.data_dir / "redis.log")
        except RuntimeError:
            self.stop()  # and release the data dir
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_redis(self.proc)
        self.proc = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _take_lock(self) -> None:
        """Two redis-servers appending to one AOF corrupt it: one owner per data dir."""
        self._password()  # creates the dir
        lock = open(self.data_dir / "lock", "ab")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RuntimeError(f"another redis-server uses {self.data_dir}: stop it, or pass --redis-data-dir "
                               "or --redis-url") from None
        self._lock = lock

    def _password(self) -> str:
        """Generated on first use and kept with the data, so a restart opens the same store."""
        if not self.password:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.data_dir.chmod(0o700)
            path = self.data_dir / "password"
            if not path.exists():
                _write_private(path, secrets.token_hex(32))
            path.chmod(0o600)
            self.password = path.read_text().strip()
        return self.password

    def _config(self) -> str:
        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"dir {_redis_string(str(self.data_dir.resolve()))}",
            "appendonly yes",
            'save ""',
            f"logfile {_redis_string(str((self.data_dir / 'redis.log').resolve()))}",
            f"requirepass {self._password()}",
        ]
        return "\n".join(lines) + "\n"

    def _answers(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:  # not listening yet, or still loading the AOF
            return False
        finally:
            client.close()


def _child_env() -> dict[str, str]:
    """redis-server needs none of TMEM_*, and some of it is secret (API keys)."""
    return {name: value for name, value in os.environ.items() if not name.startswith("TMEM_")}
