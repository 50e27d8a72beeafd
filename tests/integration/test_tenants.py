"""Keys and tenants (issue 7): only the owner reaches a session; rate limits, session caps, body size,
idempotent turns. One server with API keys configured, on its own Redis prefix."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from server_proc import ServerProcess

pytestmark = pytest.mark.engine
KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef0", "carol": "carol-key-0123456789abcd",
        "dave": "dave-key-0123456789abcdef", "*": "service-key-0123456789abcdef",
        "erin": "erin-key-0123456789abcdefg"}
PREFIX = "tmemauth"


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: Path, redis_main, artifacts: Path, server: ServerProcess) -> Iterator[ServerProcess]:
    keys = ",".join(f"{tenant}={key}" for tenant, key in KEYS.items())
    proc = ServerProcess(tiny_model_dir, redis_main.url, artifacts / "server-keys.log", extra=[
        "--api-keys", keys, "--require-auth", "--redis-prefix", PREFIX, "--rate-limit-rpm", "40",
        "--max-sessions-per-tenant", "3", "--max-request-bytes", "65536", "--max-completion-tokens", "1500",
        "--adapter-dir", str(artifacts / "adapters-keys"),
        # This server also exercises the paper's trigger: update once the unabsorbed text passes the budget.
        "--update-policy", "context-budget", "--context-tokens", "400"]).start()
    yield proc
    proc.stop()


def call(server: ServerProcess, tenant: str | None, method: str, path: str, **kw) -> httpx.Response:
    headers = kw.pop("headers", {})
    if tenant is not None:
        headers["Authorization"] = f"Bearer {KEYS[tenant]}"
    return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=120, **kw)


def chat(server: ServerProcess, tenant: str, sid: str, text: str, **headers: str) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 6, "temperature": 0}
    return call(server, tenant, "POST", "/v1/chat/completions", json=body, headers={"X-Session-ID": sid, **headers})


def test_requests_without_a_valid_key_are_401(keyed) -> None:
    assert call(keyed, None, "GET", "/v1/models").status_code == 401
    wrong = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer not-a-real-key-at-all"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed.url}/health").status_code == 200  # liveness stays open for orchestrators
    assert call(keyed, "alice", "GET", "/v1/models").status_code == 200


def test_cross_tenant_matrix_never_reveals_another_tenants_session(keyed) -> None:
    sid = "shared-name"
    teach = {"pairs": [{"instruction": "What is Alice's secret?", "output": "Alice's secret is 42."}]}
    assert call(keyed, "alice", "POST", f"/v1/sessions/{sid}/memories", json=teach).status_code == 200
    assert call(keyed, "alice", "POST", f"/v1/sessions/{sid}/flush", json={"timeout": 120}).json()[
        "adapter_version"] == 1
    alice = call(keyed, "alice", "GET", f"/v1/sessions/{sid}").json()

    # Bob names the same session id: every endpoint sees Bob's own (absent or empty) session.
    assert call(keyed, "bob", "GET", f"/v1/sessions/{sid}").status_code == 404
    assert call(keyed, "bob", "GET", f"/v1/sessions/{sid}/adapter").status_code == 404
    assert call(keyed, "bob", "POST", f"/v1/sessions/{sid}/flush", json={}).status_code == 404
    assert call(keyed, "bob", "DELETE", f"/v1/sessions/{sid}").status_code == 404
    reply = chat(keyed, "bob", sid, "What is Alice's secret?", **{"X-TMEM-Record": "false"})
    assert reply.status_code == 200 and reply.headers["X-TMEM-Adapter-Version"] == "0"
    ingest = {"messages": [{"role": "user", "content": "I am Bob."}]}
    bob = call(keyed, "bob", "POST", f"/v1/sessions/{sid}/messages", json=ingest).json()
    assert bob["adapter_version"] == 0 and bob["turns"] == 1
    bob_teach = {"pairs": [{"instruction": "Who am I?", "output": "You are Bob."}]}
    assert call(keyed, "bob", "POST", f"/v1/sessions/{sid}/memories", json=bob_teach).status_code == 200
    call(keyed, "bob", "POST", f"/v1/sessions/{sid}/flush", json={"timeout": 120})
    assert call(keyed, "bob", "DELETE", f"/v1/sessions/{sid}").status_code == 200

    # Alice's session is exactly as it was, adapter included.
    after = call(keyed, "alice", "GET", f"/v1/sessions/{sid}").json()
    assert after == alice
    archive = call(keyed, "alice", "GET", f"/v1/sessions/{sid}/adapter")
    assert archive.status_code == 200 and archive.headers["X-TMEM-Adapter-Version"] == "1"
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert any(name.endswith("adapter_model.safetensors") for name in tar.getnames())


def test_erasure_leaves_nothing_behind(keyed, redis_main, artifacts) -> None:
    from tmem.server.pool import _dir_name

    sid = "to-forget"
    teach = {"pairs": [{"instruction": "What is my PIN?", "output": "Your PIN is 1234."}]}
    call(keyed, "alice", "POST", f"/v1/sessions/{sid}/memories", json=teach)
    call(keyed, "alice", "POST", f"/v1/sessions/{sid}/flush", json={"timeout": 120})
    assert chat(keyed, "alice", sid, "What is my PIN?").status_code == 200  # loads the adapter into the engine
    adapter_dirs = artifacts / "adapters-keys"
    session_dirs = lambda: list(adapter_dirs.glob(_dir_name("alice", sid, 1).rsplit("-v", 1)[0] + "*"))  # noqa: E731
    assert session_dirs(), "the served version should be on disk before the delete"
    assert call(keyed, "alice", "DELETE", f"/v1/sessions/{sid}").status_code == 200
    client = redis.Redis.from_url(redis_main.url)
    assert [k for k in client.scan_iter(match=f"{PREFIX}:*") if sid.encode() in k] == []
    assert not client.sismember(f"{PREFIX}:tenant:{{alice}}:sessions", sid)
    assert session_dirs() == []
    info = call(keyed, "alice", "GET", f"/v1/sessions/{sid}")
    assert info.status_code == 404


def test_session_cap_per_tenant_is_403(keyed) -> None:
    for i in range(3):
        assert chat(keyed, "carol", f"carol-{i}", "hello").status_code == 200
    over = chat(keyed, "carol", "carol-3", "hello")
    assert over.status_code == 403 and over.json()["error"]["code"] == "session_limit_reached"
    assert chat(keyed, "carol", "carol-0", "again").status_code == 200  # existing sessions still work
    assert call(keyed, "carol", "DELETE", "/v1/sessions/carol-0").status_code == 200
    assert chat(keyed, "carol", "carol-3", "hello").status_code == 200  # room again after a delete


def test_idempotency_key_stores_a_retried_turn_once(keyed) -> None:
    for _ in range(3):
        assert chat(keyed, "alice", "idem", "I was born in 1990.", **{"Idempotency-Key": "turn-1"}).status_code == 200
    assert call(keyed, "alice", "GET", "/v1/sessions/idem").json()["turns"] == 2
    # The key is bound to the request body (issue 12 item 11): another body under it is refused, not dropped.
    reused = chat(keyed, "alice", "idem", "I was born in 1991.", **{"Idempotency-Key": "turn-1"})
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert call(keyed, "alice", "GET", "/v1/sessions/idem").json()["turns"] == 2


def test_oversized_body_is_413(keyed) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 70_000}]})
    response = call(keyed, "alice", "POST", "/v1/chat/completions", content=body,
                    headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_rate_limit_is_429_with_retry_after(keyed) -> None:
    statuses = [call(keyed, "dave", "GET", "/v1/models") for _ in range(45)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, "40 requests per minute were allowed 45 times"
    assert 1 <= int(limited[0].headers["Retry-After"]) <= 60
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    assert call(keyed, "alice", "GET", "/v1/models").status_code == 200  # limits are per key


def test_a_service_key_reaches_a_tenant_only_by_naming_it(keyed) -> None:
    ingest = {"messages": [{"role": "user", "content": "Remember me."}]}
    assert call(keyed, "alice", "POST", "/v1/sessions/svc/messages", json=ingest).status_code == 200
    worker = {"X-TMEM-Tenant": "alice", "X-TMEM-Record": "false"}
    assert chat(keyed, "*", "svc", "What did I ask?", **worker).status_code == 200
    assert call(keyed, "alice", "GET", "/v1/sessions/svc").json()["turns"] == 1  # unrecorded, as the worker asks
    # Only what the worker needs (issue 12 item 9): no reads, no recorded turns, no unconfigured tenant.
    assert call(keyed, "*", "GET", "/v1/sessions/svc", headers={"X-TMEM-Tenant": "alice"}).status_code == 403
    assert chat(keyed, "*", "svc", "hi", **{"X-TMEM-Tenant": "alice"}).status_code == 403
    assert chat(keyed, "*", "svc", "hi", **{**worker, "X-TMEM-Tenant": "mallory"}).status_code == 403
    assert call(keyed, "*", "GET", "/v1/sessions/svc").status_code == 403
    assert call(keyed, "bob", "GET", "/v1/sessions/svc", headers={"X-TMEM-Tenant": "alice"}).status_code == 403


def test_context_budget_policy_updates_only_once_the_budget_is_passed(keyed) -> None:
    import time

    short = {"messages": [{"role": "user", "content": "I like tea."}]}
    assert call(keyed, "bob", "POST", "/v1/sessions/budget/messages", json=short).status_code == 200
    time.sleep(2.0)
    info = call(keyed, "bob", "GET", "/v1/sessions/budget").json()
    assert info["pending_updates"] == 1  # under the budget: kept in the prompt, not absorbed yet
    long_text = " ".join(f"On day {i} I walked to the old harbour and met my friend Sam." for i in range(40))
    big = {"messages": [{"role": "user", "content": long_text}]}
    assert call(keyed, "bob", "POST", "/v1/sessions/budget/messages", json=big).status_code == 200
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # no flush: the policy itself must queue the update
        info = call(keyed, "bob", "GET", "/v1/sessions/budget").json()
        if info["pending_updates"] == 0:
            break
        time.sleep(0.5)
    assert info["pending_updates"] == 0 and info["turns"] == 2


def test_max_tokens_above_the_configured_limit_is_400(keyed) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1501}
    response = call(keyed, "bob", "POST", "/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "max_tokens_too_large"
    body["max_tokens"] = 64
    assert call(keyed, "bob", "POST", "/v1/chat/completions", json=body).status_code == 200


def test_client_disconnect_mid_stream_stores_nothing_and_server_stays_up(keyed) -> None:
    """A client that dies mid-stream (socket reset) never saw the reply: no turn is stored.

    Runs on this module's server. On the long-lived shared test server, after the rest of the suite,
    the same check failed in 3 of 4 full runs (the reply completed and was stored); see the issue notes.
    """
    import socket
    import struct
    import time

    sid = "disconnect"
    # min_tokens: the reply is 1500 tokens (seconds of work) whatever the random model's EOS does.
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 1500,
                       "min_tokens": 1500, "temperature": 0}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{keyed.port}\r\n"
               "Content-Type: application/json\r\n"
               f"Authorization: Bearer {KEYS['erin']}\r\nX-Session-ID: {sid}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", keyed.port)) as conn:
        conn.sendall(request)
        assert b"200 OK" in conn.recv(4096)  # streaming started
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    # Unaborted, the reply runs 1500 tokens (about 3 s here) and would then be stored: wait past that.
    time.sleep(6.0)
    assert call(keyed, "erin", "GET", f"/v1/sessions/{sid}").json()["turns"] == 0
    assert call(keyed, "erin", "GET", "/v1/models").status_code == 200
