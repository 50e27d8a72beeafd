"""Issue 12 item 13: `tmem` flags become Settings arguments, never environment variables; secrets never echo."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from tmem.server.cli import build_parser, main
from tmem.server.flags import settings_from_args

KEY = "alice-key-0123456789abcdef"
SHORT_SECRET = "tiny-secret"  # under 16 characters: refused, and must not be printed while refusing


@pytest.fixture(autouse=True)
def no_tmem_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TMEM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir("/")  # no .env file of the checkout


def test_flags_reach_settings_without_touching_the_environment() -> None:
    before = dict(os.environ)
    args = build_parser().parse_args(["serve", "--api-keys", f"alice={KEY}", "--port", "8123",
                                      "--allow-unauthenticated", "--allowed-hosts", "a.example,b.example"])
    settings = settings_from_args(args)
    assert settings.api_keys == (f"alice={KEY}",)
    assert (settings.port, settings.allow_unauthenticated) == (8123, True)
    assert settings.allowed_hosts == ("a.example", "b.example")
    assert dict(os.environ) == before  # children (redis-server, vLLM's engine core) inherit nothing
    assert KEY not in repr(settings)


def test_environment_still_fills_the_fields_no_flag_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMEM_PORT", "9001")
    monkeypatch.setenv("TMEM_RATE_LIMIT_RPM", "7")
    settings = settings_from_args(build_parser().parse_args(["serve", "--rate-limit-rpm", "3"]))
    assert (settings.port, settings.rate_limit_rpm) == (9001, 3)  # the flag wins over the environment


@pytest.mark.parametrize("flags", [
    ["--api-keys", f"alice={SHORT_SECRET}"],
    ["--api-keys", f"alice={KEY},bob={SHORT_SECRET}"],
    ["--redis-url", f"redis://:{SHORT_SECRET}@127.0.0.1:6379/0", "--port", f"{SHORT_SECRET}"],
])
def test_a_validation_error_never_echoes_a_secret(flags: list[str]) -> None:
    args = build_parser().parse_args(["serve", *flags])
    with pytest.raises(ValidationError) as caught:
        settings_from_args(args)
    text = str(caught.value)  # what a traceback or `tmem serve` prints
    assert SHORT_SECRET not in text and KEY not in text
    assert "api_keys" in text or "port" in text  # it still says which field is wrong


def test_serve_refuses_bad_keys_with_a_clean_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--api-keys", f"alice={SHORT_SECRET}"]) == 2
    err = capsys.readouterr().err
    assert "api_keys" in err and SHORT_SECRET not in err and "Traceback" not in err


def test_serve_refuses_an_open_reachable_bind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "without API keys" in err and "--allow-unauthenticated" in err


def test_serve_refuses_a_colliding_tenant_without_printing_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--api-keys", f"acme={KEY},acme:eu=eu-key-0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert "tenant name" in err and "eu-key-0123456789abcdef" not in err and KEY not in err
