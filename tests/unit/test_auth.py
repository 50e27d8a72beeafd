"""KeyRing: keys → tenants, service keys, placeholder refusal (pure unit tests of one class)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tmem.server.auth import OPEN_CALLER, OPEN_TENANT, KeyRing, StartupRefused, refuse_open_exposure, service_may
from tmem.server.errors import Forbidden, Unauthorized
from tmem.server.settings import Settings

ALICE, SERVICE = "alice-key-0123456789abcdef", "service-key-0123456789abcd"


def ring(*entries: str) -> KeyRing:
    return KeyRing.from_settings(Settings(api_keys=entries))


def test_open_server_maps_everyone_to_one_tenant() -> None:
    keys = ring()
    assert not keys.enabled
    assert keys.tenant_for(None) == keys.tenant_for("Bearer anything") == OPEN_TENANT


@pytest.mark.parametrize("header", [None, "", "Bearer ", "Basic " + ALICE, ALICE, "Bearer wrong-key-0123456789abcdef"])
def test_missing_or_wrong_key_is_401(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        ring(f"alice={ALICE}").tenant_for(header)


def test_named_and_bare_keys_map_to_their_tenants() -> None:
    bare = "bare-key-0123456789abcdefgh"
    keys = ring(f"alice={ALICE}", bare)
    assert keys.tenant_for(f"Bearer {ALICE}") == "alice"
    tenant = keys.tenant_for(f"bearer {bare}")
    assert tenant.startswith("t-") and bare not in tenant  # a digest, never the key itself


def test_service_key_acts_for_the_named_tenant_only() -> None:
    keys = ring(f"alice={ALICE}", f"*={SERVICE}")
    assert keys.tenant_for(f"Bearer {SERVICE}", "alice") == "alice"
    with pytest.raises(Forbidden):
        keys.tenant_for(f"Bearer {SERVICE}")  # must name a tenant
    with pytest.raises(Forbidden):
        keys.tenant_for(f"Bearer {SERVICE}", "../x")
    with pytest.raises(Forbidden):
        keys.tenant_for(f"Bearer {ALICE}", "bob")  # a tenant key cannot borrow another tenant
    assert keys.tenant_for(f"Bearer {ALICE}", "alice") == "alice"


@pytest.mark.parametrize("bad", ["changeme", "short", "secret", "your-api-key"])
def test_placeholder_or_short_keys_are_refused_at_start(bad: str) -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        Settings(api_keys=(f"alice={bad}",))


def test_require_auth_without_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="require-auth"):
        Settings(require_auth=True)


def test_keys_file_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice={ALICE}\n\n*={SERVICE}\n")
    keys = KeyRing.from_settings(Settings(api_keys_file=path))
    assert keys.tenant_for(f"Bearer {ALICE}") == "alice"
    assert keys.tenant_for(f"Bearer {SERVICE}", "alice") == "alice"


# -- issue 12, items 8 and 9: tenant names and service keys ------------------------------------------------
@pytest.mark.parametrize("tenant", ["acme:eu", "a b", "ünï", "x" * 65, "a*", "a.b", "{acme}", ""])
def test_bad_tenant_names_refuse_to_start(tenant: str) -> None:
    with pytest.raises(ValueError, match="entry 2: a tenant name must be") as caught:
        ring(f"alice={ALICE}", f"{tenant}={SERVICE}")
    assert SERVICE not in str(caught.value)  # the entry's number, never the line (it holds a key)


def test_colliding_tenant_config_is_refused() -> None:
    """`acme=K1,acme:eu=K2`: the session `eu:s1` of acme and `s1` of acme:eu shared one Redis key."""
    with pytest.raises(ValueError, match="tenant name"):
        ring(f"acme={ALICE}", f"acme:eu={SERVICE}")


def test_service_key_acts_only_for_configured_tenants() -> None:
    bare = "bare-key-0123456789abcdefgh"
    keys = ring(f"alice={ALICE}", bare, f"*={SERVICE}")
    bare_tenant = keys.tenant_for(f"Bearer {bare}")
    assert keys.tenants == {"alice", bare_tenant}
    for unknown in ("bob", "default", "*", "alice:x"):
        with pytest.raises(Forbidden, match="configured tenant"):
            keys.tenant_for(f"Bearer {SERVICE}", unknown)
    caller = keys.caller(f"Bearer {SERVICE}", bare_tenant)
    assert (caller.tenant, caller.service) == (bare_tenant, True)


def test_callers_are_keys_not_tenants() -> None:
    """Two keys of one tenant are two rate-limit buckets; the bucket name is a digest, never the key."""
    other = "alice-second-key-0123456789"
    keys = ring(f"alice={ALICE}", f"alice={other}")
    first, second = keys.caller(f"Bearer {ALICE}"), keys.caller(f"Bearer {other}")
    assert first.tenant == second.tenant == "alice"
    assert first.key_id != second.key_id
    assert ALICE not in first.key_id and len(first.key_id) == 16
    assert ring().caller("Bearer x") == OPEN_CALLER


@pytest.mark.parametrize(("method", "route", "record", "allowed"), [
    ("POST", "/v1/chat/completions", False, True),
    ("POST", "/v1/chat/completions", True, False),
    ("GET", "/v1/sessions/{session_id}", False, False),
    ("DELETE", "/v1/sessions/{session_id}", False, False),
    ("POST", "/v1/sessions/{session_id}/memories", False, False),
    ("GET", "/v1/models", False, False),
])
def test_service_keys_only_do_what_the_worker_needs(method: str, route: str, record: bool, allowed: bool) -> None:
    assert service_may(method, route, record) is allowed


# -- item 1: open and reachable ----------------------------------------------------------------------------
def starts(settings: Settings, keys: KeyRing) -> bool:
    """Whether the server agrees to start with these settings and keys."""
    try:
        refuse_open_exposure(settings, keys)
    except StartupRefused:
        return False
    return True


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "tmem.example.com"])
def test_reachable_host_without_keys_refuses_to_start(host: str) -> None:
    settings = Settings(host=host)
    with pytest.raises(StartupRefused, match="--allow-unauthenticated"):
        refuse_open_exposure(settings, KeyRing.from_settings(settings))
    assert starts(Settings(host=host, allow_unauthenticated=True), ring())  # asked for: allowed
    assert starts(Settings(host=host), ring(f"alice={ALICE}"))  # keys: allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_without_keys_still_starts(host: str) -> None:
    assert starts(Settings(host=host), ring())
