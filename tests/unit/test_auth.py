"""KeyRing: keys → tenants, service keys, placeholder refusal (pure unit tests of one class)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.auth import OPEN_TENANT, KeyRing
from server.errors import Forbidden, Unauthorized
from server.settings import Settings

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
    assert keys.tenant_for(f"Bearer {SERVICE}", "bob") == "bob"
