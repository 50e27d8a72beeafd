"""Issue 3 acceptance on the shared server: the official openai client, sessions, updates, bad input."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers import greedy, session_info, teach_and_flush

pytestmark = pytest.mark.engine


def chat(client, sid: str | None, text: str, **kw):
    headers = {"X-Session-ID": sid} if sid else {}
    return client.chat.completions.with_raw_response.create(
        model=kw.pop("model", None) or client.models.list().data[0].id,
        messages=[{"role": "user", "content": text}], temperature=0, max_tokens=kw.pop("max_tokens", 12),
        extra_headers=headers, **kw)


def test_models_and_health(openai_client, server) -> None:
    models = openai_client.models.list()
    assert len(models.data) == 1
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["redis"] is True


def test_stateless_request_is_a_plain_openai_endpoint(openai_client, tiny_model_dir) -> None:
    from transformers import AutoTokenizer

    raw = chat(openai_client, None, "Hello!")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    # The prompt is the model's own chat template of the messages sent, nothing injected (what `vllm serve` does).
    template = AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(
        [{"role": "user", "content": "Hello!"}], add_generation_prompt=True, tokenize=True, return_dict=False)
    usage = completion.usage
    assert usage.prompt_tokens == len(template)
    assert 1 <= usage.completion_tokens <= 12 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert (completion.choices[0].finish_reason == "length") == (usage.completion_tokens == 12)
    assert raw.headers["X-TMEM-Adapter-Version"] == "0"


def test_streaming_with_usage_matches_non_streaming(openai_client) -> None:
    model = openai_client.models.list().data[0].id
    stream = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0, max_tokens=16,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    plain = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], temperature=0, max_tokens=16)
    assert text == plain.choices[0].message.content


def test_teach_flush_then_answer_without_history_and_version_bumps_by_one(server, sid) -> None:
    pairs = [("Which city did I move to in 2021?", "You moved to Porto in 2021.")]
    assert teach_and_flush(server.url, sid, pairs) == 1
    assert greedy(server.url, pairs[0][0], sid) == (pairs[0][1], 1)
    assert teach_and_flush(server.url, sid, [("What is my cat called?", "Your cat is called Miso.")]) == 2
    info = session_info(server.url, sid)
    assert info["adapter_version"] == 2 and info["pending_updates"] == 0 and info["turns"] == 0


def test_each_turn_is_stored_once_and_queues_an_update(openai_client, server, sid) -> None:
    versions = []
    for i in range(3):
        raw = chat(openai_client, sid, f"Turn {i}: I went hiking on Saturday with Anna.")
        versions.append(int(raw.headers["X-TMEM-Adapter-Version"]))
    info = session_info(server.url, sid)
    assert info["turns"] == 6  # 3 user messages + 3 replies, each once
    flushed = httpx.post(f"{server.url}/v1/sessions/{sid}/flush", json={"timeout": 180}, timeout=200).json()
    assert versions == sorted(versions)
    # At least one update went live, at most one per turn, and none was lost after a turn had been served with it.
    assert max(1, versions[-1]) <= flushed["adapter_version"] <= 3
    assert session_info(server.url, sid)["pending_updates"] == 0


def test_a_client_resending_the_whole_conversation_appends_only_the_new_suffix(openai_client, server, sid) -> None:
    model = openai_client.models.list().data[0].id
    first = openai_client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "My name is Ana."}], temperature=0, max_tokens=8,
        extra_headers={"X-Session-ID": sid})
    history = [{"role": "user", "content": "My name is Ana."},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "What is my name?"}]
    openai_client.chat.completions.create(model=model, messages=history, temperature=0, max_tokens=8,
                                          extra_headers={"X-Session-ID": sid})
    assert session_info(server.url, sid)["turns"] == 4


def test_a_reply_is_not_delayed_until_a_running_update_finishes(server, sid, openai_client) -> None:
    pairs = [{"instruction": f"Question number {i} about my week?", "output": f"Answer {i}: I was busy."}
             for i in range(48)]
    httpx.post(f"{server.url}/v1/sessions/{sid}/memories", json={"pairs": pairs}, timeout=30).raise_for_status()
    raw = chat(openai_client, sid, "Quick question while you learn.")
    assert raw.parse().choices[0].finish_reason in ("stop", "length")  # a whole reply
    # The reply came back while the update was still pending, served without it: it never waited for the trainer.
    assert raw.headers["X-TMEM-Adapter-Version"] == "0"
    assert session_info(server.url, sid)["pending_updates"] > 0
    httpx.post(f"{server.url}/v1/sessions/{sid}/flush", json={"timeout": 300}, timeout=320).raise_for_status()


def test_ingest_then_flush_absorbs_messages(server, sid) -> None:
    msgs = [{"role": "user", "content": "I started a pottery class on Tuesday."},
            {"role": "assistant", "content": "That sounds fun!"}]
    info = httpx.post(f"{server.url}/v1/sessions/{sid}/messages", json={"messages": msgs}, timeout=30).json()
    assert info["turns"] == 2 and info["pending_updates"] == 2
    httpx.post(f"{server.url}/v1/sessions/{sid}/flush", json={"timeout": 180}, timeout=200).raise_for_status()
    after = session_info(server.url, sid)
    assert (after["pending_updates"], after["adapter_version"], after["turns"]) == (0, 1, 2)
    report = after["last_update"]
    assert report["chunks"] == 1 and report["examples"] > 0
    assert report["pairs_kept"] > 0 or report["raw_chunks"] == 1  # learned as pairs, or as the text itself
    assert (report["summary"] == "updated") == (after["summary"] != "")  # the report says whether memory changed


def test_delete_forgets_everything(server, sid, redis_main) -> None:
    teach_and_flush(server.url, sid, [("Who is my manager?", "Your manager is Rita.")])
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}").json() == {"id": sid, "object": "session.deleted",
                                                                      "deleted": True}
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").status_code == 404
    import redis

    leftovers = list(redis.Redis.from_url(redis_main.url).scan_iter(match=f"*{sid}*"))
    assert leftovers == []
    assert greedy(server.url, "Who is my manager?", sid)[1] == 0  # back to the base model


# ---- bad input: each error asserted, in OpenAI's shape ---------------------------------------------------

def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def post(server, body, headers=None, raw: bytes | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", **(headers or {})}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, headers=headers, timeout=60)


USER = [{"role": "user", "content": "hi"}]


def test_malformed_json_is_400(server) -> None:
    assert_error(post(server, None, raw=b'{"messages": [}'), 400, code="invalid_json")


def test_unknown_model_is_404(server) -> None:
    assert_error(post(server, {"model": "gpt-17", "messages": USER}), 404, code="model_not_found", param="model")


@pytest.mark.parametrize("bad_id", ["", "x" * 200, "../etc/passwd", "a/b", "a b", ".hidden"])
def test_invalid_session_ids_are_400(server, bad_id: str) -> None:
    assert_error(post(server, {"messages": USER}, headers={"X-Session-ID": bad_id}), 400, code="invalid_session_id")
    if bad_id and "/" not in bad_id:
        assert_error(httpx.get(f"{server.url}/v1/sessions/{bad_id}"), 400, code="invalid_session_id")


def test_oversized_message_is_400_and_nothing_is_stored(server, sid) -> None:
    big = [{"role": "user", "content": "x" * 40_000}]
    assert_error(post(server, {"messages": big}, headers={"X-Session-ID": sid}), 400,
                 code="string_above_max_length", param="messages[0].content")
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").status_code == 404


def test_max_tokens_beyond_the_context_is_400(server) -> None:
    # Within the server's max_completion_tokens (4096) but beyond the 2048-token window.
    error = assert_error(post(server, {"messages": USER, "max_tokens": 3000}), 400, code="context_length_exceeded")
    assert "maximum context length" in error["message"]


def test_unsupported_field_is_a_clear_400(server) -> None:
    assert_error(post(server, {"messages": USER, "tools": [{"type": "function"}]}), 400, param="tools")


def test_unknown_session_is_404_for_session_endpoints(server, sid) -> None:
    for method, path in [("GET", ""), ("POST", "/flush"), ("GET", "/adapter"), ("DELETE", "")]:
        assert_error(httpx.request(method, f"{server.url}/v1/sessions/{sid}{path}"), 404, code="session_not_found")


def test_openai_client_raises_its_own_errors(openai_client) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=openai_client.models.list().data[0].id, messages=USER,
                                              max_tokens=10**6)


def test_metrics_expose_the_promised_series(server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["tmem_time_to_first_token_seconds", "tmem_update_lag_seconds", "tmem_extraction_failures_total",
                 "tmem_training_loss", "tmem_adapters_resident", "tmem_update_queue_depth", "tmem_updates_total",
                 "tmem_completion_tokens_total", "tmem_requests_total"]:
        assert name in text
    assert 'tmem_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "s-" not in text.split("tmem_requests_total", 1)[1].split("\n# ", 1)[0]  # no session ids as labels


def test_concurrent_updates_of_two_sessions_never_mix(server, sid) -> None:
    import threading

    a, b = f"{sid}-a", f"{sid}-b"
    taught = {a: [("What is my favorite fruit?", "Your favorite fruit is mango.")],
              b: [("What is my favorite fruit?", "Your favorite fruit is a pear.")]}
    versions: dict[str, int] = {}
    threads = [threading.Thread(target=lambda s=s: versions.__setitem__(s, teach_and_flush(server.url, s, taught[s])))
               for s in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert versions == {a: 1, b: 1}
    assert greedy(server.url, "What is my favorite fruit?", a)[0] == "Your favorite fruit is mango."
    assert greedy(server.url, "What is my favorite fruit?", b)[0] == "Your favorite fruit is a pear."


def test_worker_trains_pending_sessions_together_and_says_so_in_metrics(server, sid) -> None:
    import threading

    def metric(name: str) -> float:
        for line in httpx.get(f"{server.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    before = metric("tmem_batched_update_passes_total")
    sessions = [f"{sid}-{i}" for i in range(6)]
    for s in sessions:  # queued faster than one update takes, so the worker finds several pending
        body = {"pairs": [{"instruction": f"What is code {s}?", "output": f"The code is {s[-1]}."}]}
        httpx.post(f"{server.url}/v1/sessions/{s}/memories", json=body, timeout=30).raise_for_status()
    flushed: dict[str, int] = {}
    threads = [threading.Thread(target=lambda s=s: flushed.__setitem__(s, httpx.post(
        f"{server.url}/v1/sessions/{s}/flush", json={"timeout": 180}, timeout=200).json()["adapter_version"]))
        for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert flushed == {s: 1 for s in sessions}  # each session updated exactly once
    assert metric("tmem_batched_update_passes_total") >= before + 1
    for s in sessions:
        assert greedy(server.url, f"What is code {s}?", s) == (f"The code is {s[-1]}.", 1)


def test_delete_while_a_request_uses_the_adapter_keeps_the_engine_alive(server, sid) -> None:
    import threading

    teach_and_flush(server.url, sid, [("Where is my passport?", "Your passport is in the drawer.")])
    base_reply = greedy(server.url, "still alive?")
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 400,
            "temperature": 0, "stream": True}
    streamed: list[bytes] = []
    served_version: list[str] = []
    generating = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body,
                          headers={"X-Session-ID": sid}, timeout=120) as response:
            served_version.append(response.headers["X-TMEM-Adapter-Version"])
            for chunk in response.iter_bytes():
                streamed.append(chunk)
                generating.set()
        generating.set()

    reader = threading.Thread(target=stream)
    reader.start()
    # Deleted only once tokens flow: a delete that won the race to the handler would test a fresh session.
    assert generating.wait(timeout=120)
    assert httpx.delete(f"{server.url}/v1/sessions/{sid}").status_code == 200
    reader.join(timeout=120)
    assert served_version == ["1"]  # the request was served with the session's adapter
    assert b"data: [DONE]" in b"".join(streamed)  # the in-flight request finished with its adapter
    # Its turn was not stored: a reply that ends after the delete does not bring the session back.
    assert httpx.get(f"{server.url}/v1/sessions/{sid}").status_code == 404
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert greedy(server.url, "still alive?") == base_reply  # the base model serves as before, unharmed


def test_a_reused_session_id_never_serves_the_deleted_sessions_weights(server, sid) -> None:
    question = "What is my locker number?"
    teach_and_flush(server.url, sid, [(question, "Your locker number is 12.")])
    assert greedy(server.url, question, sid) == ("Your locker number is 12.", 1)
    httpx.delete(f"{server.url}/v1/sessions/{sid}").raise_for_status()
    teach_and_flush(server.url, sid, [(question, "Your locker number is 97.")])
    assert greedy(server.url, question, sid) == ("Your locker number is 97.", 1)
