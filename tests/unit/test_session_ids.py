"""Session ids are the one client string that reaches Redis keys and the adapter pool: what may pass, what may not.

The contract is written here independently of ``tmem.server.deps.SESSION_ID_RE`` (and matched with
``re.fullmatch``, which — unlike ``$`` — does not let a trailing newline through), so the tests
fail if the server's pattern drifts from it.
"""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tmem.server.deps import validate_session_id
from tmem.server.errors import InvalidRequest
from tmem.server.pool import _dir_name

# The documented contract: 1-128 chars of letters, digits and . _ : - , not starting with '.'.
CONTRACT = re.compile(r"[A-Za-z0-9_:\-][A-Za-z0-9._:\-]{0,127}")
DIR_NAME = re.compile(r"[0-9a-f]{24}-v\d+")
ALLOWED = frozenset(string.ascii_letters + string.digits + "._:-")
# Characters a hostile or careless id is made of: path syntax, control and space characters, and
# unicode look-alikes of the allowed ones (fullwidth, Cyrillic, other scripts' digits, slash homoglyphs).
NEAR_MISSES = (
    "/\\\x00 \t\n\r\x0b\x0c\x85\u00a0\u2028%@+~*?#&=,;'\"<>|$!{}"
    "\u2215\u2044\uff0f\u29f8\uff3c\u2024\uff0e"  # slash and dot look-alikes
    "\u0430\u0435\u043e\u0441\uff41\uff10\u0661\u0966\u00e9\u00df\u0131"  # letter and digit look-alikes
)
NEAR_ALPHABET = "".join(sorted(ALLOWED)) + NEAR_MISSES


def is_acceptable(value: str) -> bool:
    """The contract, spelled out character by character rather than as one pattern."""
    return (
        1 <= len(value) <= 128
        and value not in (".", "..")
        and not value.startswith(".")
        and all(c in ALLOWED for c in value)
        and not any(c in "/\\\x00" or c.isspace() for c in value)
    )


def assert_rejected(value: str | None) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate_session_id(value, param="session_id")
    err = caught.value
    assert (err.status, err.type, err.code, err.param) == (400, "invalid_request_error", "invalid_session_id",
                                                          "session_id")


def assert_accepted(value: str) -> None:
    assert validate_session_id(value) == value


# (case id, value, accepted?)
HAND_PICKED: list[tuple[str, str | None, bool]] = [
    ("missing", None, False),
    ("empty", "", False),
    ("dot", ".", False),
    ("dot dot", "..", False),
    ("hidden file", ".env", False),
    ("traversal", "../../etc/passwd", False),
    ("absolute path", "/etc/passwd", False),
    ("slash", "a/b", False),
    ("backslash", "a\\b", False),
    ("windows traversal", "..\\..\\boot.ini", False),
    ("NUL", "abc\x00", False),
    ("space", "a b", False),
    ("tab", "a\tb", False),
    ("leading newline", "\nabc", False),
    ("trailing newline", "abc\n", False),
    ("trailing CRLF", "abc\r\n", False),
    ("128 chars then newline", "a" * 128 + "\n", False),
    ("percent-encoded slash", "..%2Fetc%2Fpasswd", False),
    ("percent-encoded dots", "%2e%2e", False),
    ("double-encoded slash", "a%252Fb", False),
    ("division slash", "a\u2215b", False),
    ("fraction slash", "a\u2044b", False),
    ("fullwidth solidus", "a\uff0fb", False),
    ("fullwidth reverse solidus", "a\uff3cb", False),
    ("one dot leader", "\u2024\u2024", False),
    ("fullwidth full stop", "\uff0e\uff0e", False),
    ("cyrillic a", "\u0430bc", False),
    ("fullwidth letter", "\uff41bc", False),
    ("arabic-indic digits", "\u0661\u0662\u0663", False),
    ("devanagari digit", "s\u0966", False),
    ("accented letter", "caf\u00e9", False),
    ("no-break space", "a\u00a0b", False),
    ("line separator", "a\u2028b", False),
    ("email", "user@example.com", False),
    ("url", "http://x", False),
    ("shell", "$(rm -rf)", False),
    ("redis glob", "s-*", False),
    ("redis hash tag", "{s}", False),
    ("129 chars", "a" * 129, False),
    ("very long", "s" * 100_000, False),
    ("one letter", "a", True),
    ("one digit", "0", True),
    ("dash", "-", True),
    ("underscore", "_", True),
    ("colon", ":", True),
    ("dot inside", "a.b", True),
    ("trailing dots", "a..", True),
    ("typical", "s-0123456789ab", True),
    ("namespaced", "user:42:chat.v2", True),
    ("uuid", "3f2b8c1e-7d4a-4b9e-9c1f-2a6e5d8b7c90", True),
    ("128 chars", "a" * 128, True),
]


@pytest.mark.parametrize(("value", "accepted"), [c[1:] for c in HAND_PICKED], ids=[c[0] for c in HAND_PICKED])
def test_hand_picked_session_ids(value: str | None, accepted: bool) -> None:
    assert value is None or is_acceptable(value) == accepted  # the table agrees with the contract
    if accepted:
        assert value is not None
        assert_accepted(value)
    else:
        assert_rejected(value)


@settings(max_examples=500, derandomize=True)
@given(st.one_of(st.text(max_size=140), st.text(alphabet=NEAR_ALPHABET, max_size=140)))
@example("abc\n")
@example("a" * 128 + "\n")
def test_accepted_exactly_when_the_contract_holds(value: str) -> None:
    """Accepted ids are returned unchanged and meet the contract; everything else is a 400 invalid_session_id."""
    try:
        returned = validate_session_id(value, param="session_id")
    except InvalidRequest as exc:
        assert exc.code == "invalid_session_id" and exc.status == 400
        assert not CONTRACT.fullmatch(value), f"{value!r} meets the contract but was rejected"
        return
    assert returned == value
    assert CONTRACT.fullmatch(value), f"{value!r} was accepted but breaks the contract"
    assert is_acceptable(value)
    assert not {"/", "\\", "\x00"} & set(value)
    assert not any(c.isspace() for c in value)
    assert value not in (".", "..")
    assert 1 <= len(value) <= 128


@settings(max_examples=300, derandomize=True)
@given(st.from_regex(CONTRACT, fullmatch=True))
def test_every_id_of_the_contract_is_accepted(value: str) -> None:
    assert_accepted(value)


@settings(max_examples=200, derandomize=True)
@given(st.from_regex(CONTRACT, fullmatch=True), st.sampled_from(NEAR_MISSES), st.integers(min_value=0, max_value=128))
def test_one_forbidden_character_anywhere_is_rejected(valid: str, bad: str, at: int) -> None:
    position = min(at, len(valid))
    assert_rejected(valid[:position] + bad + valid[position:])


@settings(max_examples=300, derandomize=True)
@given(tenant=st.text(max_size=64), sid=st.text(max_size=200), version=st.integers(min_value=0, max_value=10**9))
@example(tenant="default", sid="../../etc/passwd", version=1)
@example(tenant="default", sid="deadbeefdeadbeefdeadbeef", version=3)
def test_adapter_dir_name_is_a_digest(tenant: str, sid: str, version: int) -> None:
    """Nothing of the session id (or tenant) reaches the file system: the name is hex digest + version only."""
    name = _dir_name(tenant, sid, version)
    assert DIR_NAME.fullmatch(name), name
    assert name.endswith(f"-v{version}")
    assert set(name) <= set("0123456789abcdef-v")
    assert not (set(sid) - set("0123456789abcdefv-")) & set(name)
    # Versions of one session share the digest: the pool's cleanup globs `<digest>-v*`.
    assert name.rsplit("-v", 1)[0] == _dir_name(tenant, sid, version + 1).rsplit("-v", 1)[0]


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from(["default", "t-1", "acme"]), st.from_regex(CONTRACT, fullmatch=True)),
                min_size=2, max_size=8, unique=True))
def test_distinct_sessions_get_distinct_dirs(keys: list[tuple[str, str]]) -> None:
    names = {_dir_name(tenant, sid, 1) for tenant, sid in keys}
    assert len(names) == len(keys)


def test_tenant_and_session_do_not_run_together() -> None:
    """("a", "b:c") and ("a:b", "c") are different sessions and must not share an adapter directory."""
    assert _dir_name("a", "b:c", 1) != _dir_name("a:b", "c", 1)
    assert _dir_name("ab", "c", 1) != _dir_name("a", "bc", 1)
