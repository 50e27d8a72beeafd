"""The standalone worker's service key: read from a file or the environment, and accepted by a keyed API.

Without it, a deployment with keys on never applies an update: every extraction call of the worker
is a 401. The key must also never be echoed when it is refused.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem.server.auth import KeyRing
from tmem.server.cli import build_parser
from tmem.server.flags import settings_from_args as cli_settings
from tmem.server.settings import Settings
from tmem.server.worker_main import HttpGenerator, worker_key

KEY = "svc-7f3a9c1e5b2d4a6f8e0c"
OTHER = "env-1b2c3d4e5f6a7b8c9d0e"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TMEM_WORKER_KEY", "TMEM_WORKER_KEY_FILE", "TMEM_API_KEYS"):
        monkeypatch.delenv(name, raising=False)


def settings(**fields: object) -> Settings:
    return Settings(_env_file=None, **fields)  # type: ignore[arg-type]


def worker_args(*extra: str) -> Settings:
    args = build_parser().parse_args(["worker", "--api-url", "http://api:8000", *extra])
    return cli_settings(args)


def test_the_key_file_flag_is_read_and_its_newline_dropped(tmp_path: Path) -> None:
    key_file = tmp_path / "worker-key"
    key_file.write_text(KEY + "\n")  # as `kubectl create secret --from-file` and `echo >` leave it
    assert worker_key(worker_args("--worker-key-file", str(key_file))) == KEY


def test_the_environment_key_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMEM_WORKER_KEY", KEY)
    assert worker_key(worker_args()) == KEY


def test_a_file_wins_over_the_environment_and_both_over_the_flag(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_text(KEY)
    assert worker_key(settings(worker_key=OTHER, worker_key_file=key_file), flag_key="flag-000000000000000") == KEY
    assert worker_key(settings(worker_key=OTHER), flag_key="flag-000000000000000") == OTHER
    assert worker_key(settings(), flag_key="flag-000000000000000") == "flag-000000000000000"


@pytest.mark.parametrize("value", ["", "   "])
def test_no_key_or_a_blank_one_means_an_open_api(value: str) -> None:
    assert worker_key(settings()) is None
    assert worker_key(settings(worker_key=value)) is None


def test_a_missing_or_empty_key_file_stops_the_worker_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"cannot read the worker key file .*absent"):
        worker_key(settings(worker_key_file=tmp_path / "absent"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        worker_key(settings(worker_key_file=tmp_path / "empty"))


def test_a_placeholder_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(SystemExit) as caught:
        worker_key(settings(worker_key="changeme"))
    assert "at least 16 characters" in str(caught.value.code)
    assert "changeme" not in str(caught.value.code)


async def test_the_key_is_sent_as_a_bearer_token_the_api_takes_as_the_service_key(tmp_path: Path) -> None:
    key_file = tmp_path / "k"
    key_file.write_text(KEY)
    key = worker_key(settings(worker_key_file=key_file))
    generator = HttpGenerator("http://api:8000", key)
    try:
        authorization = generator.client.headers["Authorization"]
    finally:
        await generator.aclose()
    assert authorization == f"Bearer {KEY}"
    api = KeyRing.from_settings(settings(api_keys=("acme=acme-0123456789abcdef", f"*={KEY}")))
    assert api.tenant_for(authorization, acting_for="acme") == "acme"
