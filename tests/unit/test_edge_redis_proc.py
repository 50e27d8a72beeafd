"""Issue 12 item 12a: the private redis-server of `tmem serve` keeps its data across restarts and needs a password."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tmem.server.redis_proc import DEFAULT_DATA_DIR, PrivateRedis


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def test_data_survives_a_restart_in_the_default_dir(in_tmp: Path) -> None:
    first = PrivateRedis().start()
    try:
        assert first.data_dir == DEFAULT_DATA_DIR == Path(".cache/redis")
        with redis.Redis.from_url(first.url) as client:
            client.set("tmem:{default:s1}:meta", b"kept")
    finally:
        first.stop()
    second = PrivateRedis().start()  # a new process (and port), as after `tmem serve` restarts
    try:
        with redis.Redis.from_url(second.url) as client:
            assert client.get("tmem:{default:s1}:meta") == b"kept"
    finally:
        second.stop()
    assert (in_tmp / ".cache/redis/appendonlydir").is_dir()


def test_a_client_without_the_password_is_refused(in_tmp: Path) -> None:
    private = PrivateRedis().start()
    try:
        with redis.Redis(host="127.0.0.1", port=private.port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        guessing = redis.Redis(host="127.0.0.1", port=private.port, password="guess")
        with guessing, pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            guessing.ping()
        with redis.Redis.from_url(private.url) as client:
            assert client.ping() is True
    finally:
        private.stop()


def test_the_password_is_private_and_never_on_the_command_line(in_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMEM_API_KEYS", "alice=alice-key-0123456789abcdef")  # redis-server has no use for it
    private = PrivateRedis().start()
    try:
        assert private.proc is not None
        cmdline = Path(f"/proc/{private.proc.pid}/cmdline").read_bytes().decode()
        assert private.password not in cmdline and len(private.password) >= 32
        for name in ("password", "redis.conf"):
            mode = stat.S_IMODE(os.stat(private.data_dir / name).st_mode)
            assert mode == 0o600, (name, oct(mode))
        assert stat.S_IMODE(os.stat(private.data_dir).st_mode) == 0o700
        environ = Path(f"/proc/{private.proc.pid}/environ").read_bytes()
        assert b"TMEM_" not in environ and b"alice-key" not in environ
    finally:
        private.stop()
    again = PrivateRedis()
    assert again._password() == private.password  # one password per data dir, kept across restarts


def test_one_redis_server_per_data_dir(in_tmp: Path) -> None:
    """Two servers appending to one AOF would corrupt it: the second start is refused while the first runs."""
    first = PrivateRedis().start()
    try:
        with pytest.raises(RuntimeError, match="another redis-server uses"):
            PrivateRedis().start()
    finally:
        first.stop()
    PrivateRedis().start().stop()  # free again once the first has stopped
