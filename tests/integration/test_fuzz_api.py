"""Schemathesis against the shared server's own OpenAPI spec: every answer keeps the contract clients rely on.

Each operation gets a fixed, derandomized budget of generated requests (valid and invalid ones:
schemathesis' positive and negative modes), and every response is held to:

- no 5xx, except a 503 that says when to retry (``Retry-After``);
- every 4xx/5xx body is OpenAI's error object, exactly ``{"error": {message, type, param, code}}``;
- every response carries an ``x-request-id``; a stream that fails says so in the same shape, then ``[DONE]``;
- a fuzzed session id never becomes a file name: the adapter directory holds digests only, and no
  new entry in the directories the server writes to is named after a sent id.

Keeping it short on 2 CPU cores (see :func:`cap_slow_work`): a generated ``max_tokens`` /
``max_completion_tokens`` that would really be generated is lowered to :data:`MAX_GENERATED_TOKENS`
and a chat body without either gets it, so no request decodes the server's default 256 tokens; values
the context window cannot hold are left alone (they are a fast 400). A flush waits at most
:data:`FLUSH_TIMEOUT_S` (a timeout is added when the body has none), so flushing a session with pending
work answers a quick 503 ``flush_timeout`` instead of waiting for the worker. Shrinking is off, so a
failure costs no extra engine calls; schemathesis prints the failing request as a curl command.
Every session the fuzzer could have created is deleted afterwards, so its queued updates do not
hold up the worker for the tests that follow.

Reaching past the first 400: half the cases of a session operation (and of chat, via ``X-Session-ID``)
use one of :data:`FUZZ_SESSIONS`, and valid teach requests on those get their blank pairs filled
(:func:`fill_blank_pairs`), so sessions, updates, flushes and adapter downloads are exercised too.
``TMEM_FUZZ_EXAMPLES=300`` runs a deeper (~5 min) local pass with the same checks.

Cases come from ``APIOperation.as_strategy`` under hypothesis' own ``@given``: schemathesis'
``schemathesis.pytest.from_fixture`` (needed because the URL exists only once the server fixture
runs) fails under pytest 9.2 with ``AttributeError: 'Function' object has no attribute '_nodeid'``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.checks import CheckFunction
from schemathesis.core import NOT_SET
from server_proc import TEST_ENGINE_FLAGS, ServerProcess

from tmem.server.deps import SESSION_ID_RE

pytestmark = pytest.mark.engine

# The operations of the spec (the spec test below checks the list is complete) and whether each has a
# request body: only a body can be made invalid; any path or header string is "valid" to the spec.
# Ordered so that the operations that create sessions run before those that read or delete them.
OPERATIONS: dict[str, bool] = {
    "GET /health": False,
    "GET /metrics": False,
    "GET /v1/models": False,
    "POST /v1/chat/completions": True,
    "POST /v1/sessions/{session_id}/messages": True,
    "POST /v1/sessions/{session_id}/memories": True,
    "GET /v1/sessions/{session_id}": False,
    "GET /v1/sessions/{session_id}/memories": False,
    "POST /v1/sessions/{session_id}/flush": True,
    "GET /v1/sessions/{session_id}/adapter": False,
    "DELETE /v1/sessions/{session_id}": False,
}
# Random text is almost never a valid session id, so half the cases of a session operation use one
# of these (a small pool, so later operations find the sessions earlier ones created).
FUZZ_SESSIONS = ["fuzz-a", "fuzz-b", "fuzz:c.1"]
# Split evenly between valid and invalid bodies where there is a body; raise it for a deeper local run.
EXAMPLES_PER_OPERATION = int(os.environ.get("TMEM_FUZZ_EXAMPLES", "24"))
RUNS = [
    pytest.param(label, mode, EXAMPLES_PER_OPERATION // (2 if has_body else 1), id=f"{label}-{mode.value}")
    for label, has_body in OPERATIONS.items()
    for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if has_body else [GenerationMode.POSITIVE])
]
# A fixed budget: derandomized (same requests every run), no example database, no shrinking (a
# failure costs no extra engine calls; schemathesis prints it as a curl command), no deadline.
FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    print_blob=False,
)
MAX_GENERATED_TOKENS = 4
FLUSH_TIMEOUT_S = 5.0
MAX_MODEL_LEN = int(TEST_ENGINE_FLAGS[TEST_ENGINE_FLAGS.index("--max-model-len") + 1])
ERROR_KEYS = {"message", "type", "param", "code"}
ADAPTER_ENTRY = re.compile(r"\.?[0-9a-f]{24}-v\d+(-[A-Za-z0-9_]+)?")  # a version, or its mkdtemp staging dir
# Shorter pieces of an id would match unrelated file names by chance.
MIN_NEEDLE = 6


def load_schema(server: ServerProcess) -> Any:
    """The server's own spec, with streams read to their end ([DONE] included)."""
    config = schemathesis.Config.from_dict({"max-stream-events": 1000})
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


@dataclass
class FuzzRecord:
    """Where the server writes, what was there before the fuzzing, which session ids were sent, what came back."""

    adapter_dirs: list[Path]
    roots: list[Path]
    before: set[Path]
    sent_ids: set[str] = field(default_factory=set)
    statuses: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    slowest_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    @classmethod
    def start(cls, server: ServerProcess) -> FuzzRecord:
        assert server.proc is not None
        pid = server.proc.pid
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        adapter_dirs = [Path("/dev/shm") / f"tmem-adapters-{pid}", tmp / f"tmem-adapters-{pid}"]
        roots = [server.log_path.parent, Path.cwd(), tmp, Path("/dev/shm"), *adapter_dirs]
        record = cls(adapter_dirs, roots, set())
        record.before = record.entries()
        return record

    def entries(self) -> set[Path]:
        """Top-level entries of every root, and everything under the artifacts and adapter directories."""
        found: set[Path] = set()
        deep = {self.roots[0], *self.adapter_dirs}
        for root in self.roots:
            if not root.is_dir():
                continue
            if root in deep:
                found.update(_walk(root))
            else:
                found.update(_listdir(root))
        return found

    def new_entries(self) -> set[Path]:
        return self.entries() - self.before


def _listdir(root: Path) -> list[Path]:
    try:
        return list(root.iterdir())
    except OSError:  # vanished or unreadable meanwhile
        return []


def _walk(root: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        out.extend(Path(dirpath) / name for name in (*dirnames, *filenames))
    return out


@pytest.fixture(scope="module")
def fuzz_record(server: ServerProcess) -> Iterator[FuzzRecord]:
    record = FuzzRecord.start(server)
    yield record
    # Sessions the fuzzer created would keep the shared worker busy with their updates.
    for sid in sorted(record.sent_ids):
        if SESSION_ID_RE.match(sid):  # what the server accepts, whatever the contract says
            httpx.delete(f"{server.url}/v1/sessions/{quote(sid, safe='')}", timeout=30)


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> Any:
    return load_schema(server)


# --- checks, run on every response -------------------------------------------------------------


def _error_object(response: Response) -> dict[str, Any]:
    """The ``error`` member of an OpenAI error body, after checking the shape is exactly that."""
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"error body is {content_type!r}, not JSON"
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error"}, f"not OpenAI's error shape: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ERROR_KEYS, f"error keys {sorted(error)} != {sorted(ERROR_KEYS)}"
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str | int), error
    return error


def no_server_error(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A 5xx is a bug, except a 503 that tells the client when to retry."""
    if response.status_code < 500:
        return None
    assert response.status_code == 503, f"{response.status_code}: {response.content[:500]!r}"
    retry_after = response.headers.get("retry-after", [""])[0]
    assert retry_after.isdigit(), f"503 without a whole-second Retry-After ({retry_after!r})"
    return None


def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    if response.status_code >= 400:
        _error_object(response)
    return None


def request_id_header(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    request_id = response.headers.get("x-request-id", [""])[0]
    assert request_id, f"{response.status_code} response without an x-request-id"
    return None


def stream_ends_cleanly(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A stream ends with [DONE]; an error in it is OpenAI-shaped and never an internal error."""
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code != 200 or not content_type.startswith("text/event-stream"):
        return None
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", f"stream does not end with [DONE]: {events[-3:]}"
    for event in events[:-1]:
        payload = json.loads(event)
        if "error" in payload:
            error = payload["error"]
            assert set(payload) == {"error"} and set(error) == ERROR_KEYS, f"stream error shape: {payload!r}"
            assert error["type"] != "server_error", f"internal error in a stream: {error!r}"
    return None


CHECKS: list[CheckFunction] = [no_server_error, openai_error_shape, request_id_header, stream_ends_cleanly]


def session_ids_create_no_files(record: FuzzRecord, sent: list[str]) -> None:
    new = record.new_entries()
    for path in new:
        if path.parent in record.adapter_dirs:
            assert ADAPTER_ENTRY.fullmatch(path.name), f"adapter directory entry is not a digest: {path}"
    needles = {piece for sid in sent for piece in re.split(r"[/\\\x00]", sid) if len(piece.strip(". ")) >= MIN_NEEDLE}
    for path in new:
        for needle in needles:
            assert needle not in path.name, f"session id {needle!r} became a file name: {path}"


# --- the fuzzing ---------------------------------------------------------------------------------


def _sent_session_ids(case: Case) -> list[str]:
    """The ids as the server reads them (schemathesis percent-encodes path parameters itself)."""
    ids = [unquote(str(v)) for k, v in case.path_parameters.items() if k == "session_id"]
    header = case.headers.get("x-session-id") if case.headers else None
    if isinstance(header, str):
        ids.append(header)
    return ids


def _cap(value: Any) -> Any:
    """A token count the server would accept (pydantic takes 187.0 as 187) and really generate → the cap."""
    whole = isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer()
    return MAX_GENERATED_TOKENS if whole and MAX_GENERATED_TOKENS < value <= MAX_MODEL_LEN else value


def cap_slow_work(case: Case) -> None:
    """Bound the engine time and waiting one case can cost (see the module docstring)."""
    if case.operation.path == "/v1/chat/completions" and isinstance(case.body, dict):
        body = dict(case.body)
        for key in ("max_tokens", "max_completion_tokens"):
            body[key] = _cap(body.get(key))
        if body["max_tokens"] is None and body["max_completion_tokens"] is None:
            body["max_completion_tokens"] = MAX_GENERATED_TOKENS
        case.body = {k: v for k, v in body.items() if k in case.body or v is not None}
    elif case.operation.path.endswith("/flush"):
        if case.body is NOT_SET or case.body is None:  # no body: the server would wait its default 300 s
            case.body, case.media_type = {"timeout": FLUSH_TIMEOUT_S}, "application/json"
        elif isinstance(case.body, dict):
            timeout = case.body.get("timeout")  # absent or null: the default 300 s again
            if timeout is None or _number(timeout) > FLUSH_TIMEOUT_S:
                case.body = {**case.body, "timeout": FLUSH_TIMEOUT_S}


def fill_blank_pairs(case: Case) -> None:
    """Let valid teach requests on FUZZ_SESSIONS reach training and adapter versions.

    The server rejects a blank ``instruction``/``output`` (a validator the spec cannot express), and
    nearly every generated list of pairs holds one; free cases still send them as generated.
    """
    body = case.body
    if not case.operation.path.endswith("/memories") or case.path_parameters.get("session_id") not in FUZZ_SESSIONS:
        return
    generated = body.get("pairs") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(generated, list):
        pairs = [
            {k: (v if not isinstance(v, str) or v.strip() else f"{k} {i}") for k, v in pair.items()}
            if isinstance(pair, dict) else pair
            for i, pair in enumerate(generated)
        ]
        case.body = {**body, "pairs": pairs}


def _number(value: Any) -> float:
    """A JSON number as a float; anything else as 0 (the server rejects it before waiting)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def cases(operation: Any, mode: GenerationMode) -> st.SearchStrategy[Case]:
    """Free cases, and as many whose session id (path or X-Session-ID) is one of FUZZ_SESSIONS."""
    free = operation.as_strategy(mode)
    if "{session_id}" in operation.path:
        pinned = [operation.as_strategy(mode, path_parameters={"session_id": sid}) for sid in FUZZ_SESSIONS]
    elif operation.path == "/v1/chat/completions":
        pinned = [operation.as_strategy(mode, headers={"X-Session-ID": sid}) for sid in FUZZ_SESSIONS]
    else:
        return free
    return st.one_of(free, st.one_of(pinned))


@pytest.mark.parametrize(("label", "mode", "examples"), RUNS)
def test_every_response_keeps_the_contract(
    label: str, mode: GenerationMode, examples: int, api_schema: Any, fuzz_record: FuzzRecord
) -> None:
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]

    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=cases(operation, mode))
    def fuzz(case: Case) -> None:
        cap_slow_work(case)
        if mode is GenerationMode.POSITIVE:
            fill_blank_pairs(case)
        sent = _sent_session_ids(case)
        fuzz_record.sent_ids.update(sent)
        response = case.call_and_validate(checks=CHECKS, timeout=60)
        fuzz_record.statuses[label][response.status_code] += 1
        fuzz_record.slowest_s[label] = max(fuzz_record.slowest_s[label], response.elapsed)
        session_ids_create_no_files(fuzz_record, sent)

    fuzz()


def test_fuzzing_reached_the_success_paths(fuzz_record: FuzzRecord) -> None:
    """The caps above must not turn every request into a 400: the operations that can succeed did."""
    table = "\n".join(
        f"{label:42} slowest {fuzz_record.slowest_s[label]:6.2f} s  {dict(sorted(counts.items()))}"
        for label, counts in fuzz_record.statuses.items()
    )
    print(f"\nstatus codes per fuzzed operation:\n{table}")
    # An adapter exists only once the worker has trained a taught session, which may take longer than the run.
    for label in set(OPERATIONS) - {"GET /v1/sessions/{session_id}/adapter"}:
        assert fuzz_record.statuses[label][200] > 0, f"{label} never succeeded:\n{table}"


# Ids the fuzzer is unlikely to hit, as they appear in the URL: (case id, path segment).
HOSTILE_PATH_IDS = [
    ("traversal", "..%2F..%2Fetc%2Fpasswd"),
    ("encoded dot dot", "%2E%2E"),
    ("hidden file", ".env"),
    ("trailing newline", "fuzz-nl%0A"),
    ("trailing CRLF", "fuzz-crlf%0D%0A"),
    ("NUL", "fuzz%00nul"),
    ("space", "fuzz%20space"),
    ("backslash", "..%5C..%5Cboot.ini"),
    ("fullwidth solidus", "fuzz%EF%BC%8Fx"),
    ("accented", "caf%C3%A9"),
    ("129 chars", "s" * 129),
]


@pytest.mark.parametrize("segment", [c[1] for c in HOSTILE_PATH_IDS], ids=[c[0] for c in HOSTILE_PATH_IDS])
def test_hostile_path_session_ids_are_refused(server: ServerProcess, fuzz_record: FuzzRecord, segment: str) -> None:
    """An id outside the contract is a 400 invalid_session_id (or an unknown URL), creates nothing."""
    sid = unquote(segment)
    fuzz_record.sent_ids.add(sid)
    body = {"messages": [{"role": "user", "content": "hello"}]}
    for method, suffix, payload in (("POST", "/messages", body), ("GET", "", None), ("GET", "/adapter", None)):
        response = httpx.request(method, f"{server.url}/v1/sessions/{segment}{suffix}", json=payload, timeout=30)
        where = f"{method} /v1/sessions/{segment}{suffix} -> {response.status_code} {response.text}"
        assert response.status_code in (400, 404), where
        error = _error_object(Response.from_any(response))
        assert (response.status_code, error["code"]) in ((400, "invalid_session_id"), (404, "unknown_url")), where
        assert response.headers.get("x-request-id")
    session_ids_create_no_files(fuzz_record, [sid])


@pytest.mark.parametrize("sid", ["../x", "a b", "caf\u00e9", "s" * 129, ".", ""], ids=repr)
def test_hostile_header_session_ids_are_refused(server: ServerProcess, fuzz_record: FuzzRecord, sid: str) -> None:
    fuzz_record.sent_ids.add(sid)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30,
                          headers=[(b"X-Session-ID", sid.encode("latin-1"))])
    assert response.status_code == 400, response.text
    error = _error_object(Response.from_any(response))
    assert (error["code"], error["param"]) == ("invalid_session_id", "X-Session-ID"), response.text
    session_ids_create_no_files(fuzz_record, [sid])


def test_server_survives_the_fuzzing(server: ServerProcess) -> None:
    assert server.proc is not None and server.proc.poll() is None, server.log_tail()
    health = httpx.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 2, "temperature": 0},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] >= 1


def test_openapi_spec_is_valid_and_lists_chat_completions(server: ServerProcess) -> None:
    loaded = load_schema(server)
    loaded.validate()  # raises on a spec that breaks the OpenAPI meta-schema
    operations = [result.ok() for result in loaded.get_all_operations()]  # .ok() raises on a malformed operation
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert labels == set(OPERATIONS), f"the spec changed: {sorted(labels ^ set(OPERATIONS))} (update OPERATIONS)"
    spec = loaded.raw_schema
    assert spec["openapi"].startswith("3.")
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert "requestBody" in chat and chat["requestBody"]["required"] is True
    body_schema = chat["requestBody"]["content"]["application/json"]["schema"]
    ref = body_schema["$ref"].rsplit("/", 1)[-1]
    assert {"messages"} <= set(spec["components"]["schemas"][ref]["properties"])
