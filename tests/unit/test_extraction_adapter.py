"""`--extraction-adapter`: which weights write a session's extraction replies (the session's, or the base model's)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tmem.server.generation import EngineGenerator
from tmem.server.settings import Settings
from tmem.server.store import Job, UpdateSnapshot
from tmem.server.update_prep import UpdatePreparer
from tmem.server.worker_main import HttpGenerator

ASYNC = pytest.mark.asyncio(loop_scope="session")

JOB = Job(stream_id="0-1", job_id="j", tenant="acme", sid="s1", reason="turn", force=False, enqueued_at=0.0)
SNAPSHOT = UpdateSnapshot(version=3, generation=3, absorbed_turns=0, turns_total=2)
REPLY = '[{"instruction": "What is my cat called?", "output": "Your cat is called Miso."}]'


class RecordingGenerator:
    def __init__(self) -> None:
        self.versions: list[int | None] = []

    async def generate(self, tenant: str, sid: str, version: int | None, messages: list[dict[str, str]],
                       max_tokens: int, json_schema: dict[str, Any] | None = None) -> str:
        self.versions.append(version)
        return REPLY


@ASYNC
@pytest.mark.parametrize(("mode", "expected"), [("session", 3), ("base", None)])
async def test_extraction_runs_on_the_weights_the_setting_names(mode: str, expected: int | None) -> None:
    generator = RecordingGenerator()
    preparer = UpdatePreparer(None, None, generator, Settings(extraction_adapter=mode))  # type: ignore[arg-type]
    parsed, pairs = await preparer._extract(JOB, SNAPSHOT, "user: My cat is called Miso.", [])
    assert generator.versions == [expected]
    assert parsed and [p.output for p in pairs] == ["Your cat is called Miso."]


def test_the_base_model_extracts_unless_told_otherwise() -> None:
    assert Settings(_env_file=None).extraction_adapter == "base"  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="extraction_adapter"):
        Settings(extraction_adapter="other")  # type: ignore[arg-type]


class RefusingPool:
    async def lease(self, tenant: str, sid: str, version: int) -> Any:
        raise AssertionError("the base model needs no adapter lease")


class OneShotEngine:
    tokenizer = SimpleNamespace(apply_chat_template=lambda messages, **kw: [1, 2, 3])
    max_model_len = 64

    def __init__(self) -> None:
        self.loras: list[Any] = []

    async def generate(self, ids: list[int], params: Any, request_id: str, lora: Any) -> Any:
        self.loras.append(lora)
        yield SimpleNamespace(outputs=[SimpleNamespace(text="[]")])


@ASYNC
async def test_the_engine_generator_serves_the_base_model_without_touching_the_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import tmem.server.generation as generation

    monkeypatch.setattr(generation, "render_ids", lambda tokenizer, messages: [1, 2, 3])
    engine = OneShotEngine()
    generator = EngineGenerator(engine, RefusingPool(), structured=False)  # type: ignore[arg-type]
    assert await generator.generate("acme", "s1", None, [{"role": "user", "content": "hi"}], 8) == "[]"
    assert engine.loras == [None]  # no LoRARequest: the bare base model


@ASYNC
@pytest.mark.parametrize(("version", "session_header"), [(4, "s1"), (None, None)])
async def test_the_http_generator_names_the_session_only_for_its_adapter(
        version: int | None, session_header: str | None) -> None:
    seen: list[httpx.Request] = []

    def reply(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "[]"}}]})

    generator = HttpGenerator("http://api:8000", None)
    generator.client = httpx.AsyncClient(base_url="http://api:8000", transport=httpx.MockTransport(reply))
    try:
        assert await generator.generate("acme", "s1", version, [{"role": "user", "content": "hi"}], 8) == "[]"
    finally:
        await generator.aclose()
    (request,) = seen
    assert request.headers.get("X-Session-ID") == session_header
    assert request.headers["X-TMEM-Record"] == "false" and request.headers["X-TMEM-Tenant"] == "acme"
    assert json.loads(request.content)["temperature"] == 0
