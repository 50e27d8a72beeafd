"""The evaluation runner without a server: resume bookkeeping, results.json shape, request limits, modes,
and one whole run against an in-process fake of the HTTP API (httpx.MockTransport)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tmem.bench.eval.datasets import Conversation, HistorySession, Question, Turn
from tmem.bench.eval.report import (
    AnswerLog,
    build_results,
    parse_answer_lines,
    pending_questions,
    plot_f1,
    score_table,
    selection_keys,
)
from tmem.bench.eval.runner import (
    EvalConfig,
    EvalRunner,
    Judge,
    full_context_history,
    parse_modes,
    question_prompt,
    score_answer,
    session_id_for,
    split_for_limits,
    window_history,
)
from tmem.bench.eval.scoring import ScoreTable


def conversation(sample_id: str = "conv-1", n_questions: int = 3, n_sessions: int = 2) -> Conversation:
    sessions = [
        HistorySession(f"day {s}", [Turn("Ann", "user", f"s{s} hello"), Turn("Bob", "assistant", f"s{s} hi")])
        for s in range(n_sessions)
    ]
    questions = [Question(f"{sample_id}:{i}", f"question {i}?", f"answer {i}", category=1 + i % 5)
                 for i in range(n_questions)]  # fmt: skip
    return Conversation(sample_id, sessions, questions, ("Ann", "Bob"))


def record(mode: str, qid: str, category: int = 1, f1: float = 0.5) -> dict[str, Any]:
    return {"mode": mode, "qid": qid, "category": category, "prediction": "x", "scores": {"f1": f1, "em": 0.0}}


# --- resume bookkeeping ---


def test_answer_lines_skip_blank_and_truncated_lines_and_keep_the_first_duplicate() -> None:
    lines = [
        json.dumps(record("tmem", "c:0", f1=1.0)),
        "",
        json.dumps(record("tmem", "c:0", f1=0.0)),  # a duplicate must not count twice
        json.dumps(record("window", "c:0")),
        '{"mode": "tmem", "qid": "c:1", "scor',  # killed mid-write
        json.dumps({"note": "not an answer"}),
    ]
    records = parse_answer_lines(lines)
    assert set(records) == {("tmem", "c:0"), ("window", "c:0")}
    assert records[("tmem", "c:0")]["scores"]["f1"] == 1.0


def test_pending_questions_are_those_missing_per_mode(tmp_path: Path) -> None:
    conv = conversation(n_questions=3)
    answered = parse_answer_lines([json.dumps(record("window", "conv-1:0")), json.dumps(record("tmem", "conv-1:0")),
                                   json.dumps(record("tmem", "conv-1:1"))])  # fmt: skip
    todo = pending_questions(conv, ["window", "tmem"], answered)
    assert {m: [q.qid for q in qs] for m, qs in todo.items()} == {
        "window": ["conv-1:1", "conv-1:2"],
        "tmem": ["conv-1:2"],
    }
    # every question answered in the needed modes: nothing to do, so nothing is ingested
    assert pending_questions(conv, ["tmem"], {("tmem", f"conv-1:{i}") for i in range(3)}) == {}


def test_answer_log_resumes_after_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(record("tmem", "c:0")) + "\n" + '{"mode": "tmem", "qid": "c:1"', encoding="utf-8")
    log = AnswerLog(path)
    assert ("tmem", "c:0") in log and ("tmem", "c:1") not in log
    log.append(record("tmem", "c:1"))
    reloaded = AnswerLog(path)
    assert set(reloaded.records) == {("tmem", "c:0"), ("tmem", "c:1")}
    assert path.read_text(encoding="utf-8").count("\n") == 3  # the broken line stays on its own line


def test_score_table_covers_only_the_selection_and_results_json_has_its_shape() -> None:
    convs = [conversation(n_questions=2)]
    keys = selection_keys(convs, ["window", "tmem"])
    records = [record("window", "conv-1:0", 1, 1.0), record("window", "conv-1:1", 2, 0.0),
               record("tmem", "conv-1:0", 1, 0.5), record("tmem", "other:9", 3, 0.5)]  # fmt: skip
    table = score_table(records, keys, ["window", "tmem"])
    results = build_results(table, {"benchmark": "locomo", "modes": ["window", "tmem"]})
    assert results["benchmark"] == "locomo" and "random" in results["note"]
    assert results["answered"] == {"window": 2, "tmem": 1}
    assert results["scores"]["metrics"] == ["f1", "em"]
    window = results["scores"]["modes"]["window"]
    assert list(window) == ["1", "2", "all"]
    assert window["1"] == {"n": 1, "f1": 1.0, "em": 0.0}
    assert window["all"] == {"n": 2, "f1": 0.5, "em": 0.0}
    assert results["scores"]["modes"]["tmem"]["all"]["n"] == 1
    json.dumps(results)  # JSON-able as written


def test_plot_writes_a_png(tmp_path: Path) -> None:
    table = ScoreTable()
    table.add("window", 1, f1=0.2, em=0.0)
    table.add("tmem", 2, f1=0.4, em=1.0)
    path = plot_f1(table, tmp_path / "chart.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- request shaping ---


def test_split_for_limits_keeps_order_and_text_within_both_limits() -> None:
    messages = [{"role": "user" if i % 2 else "assistant", "content": f"m{i}"} for i in range(600)]
    messages[10]["content"] = "x" * 70_000
    chunks = split_for_limits(messages, max_messages=256, max_chars=32_000)
    assert all(len(c) <= 256 for c in chunks) and len(chunks) == 3
    flat = [m for c in chunks for m in c]
    assert all(len(m["content"]) <= 32_000 for m in flat)
    assert [m["content"] for m in flat[10:13]] == ["x" * 32_000, "x" * 32_000, "x" * 6_000]
    assert {m["role"] for m in flat[10:13]} == {messages[10]["role"]}
    assert "".join(m["content"] for m in flat) == "".join(m["content"] for m in messages)
    assert split_for_limits([{"role": "user", "content": ""}], 256, 10) == [[{"role": "user", "content": ""}]]


def test_full_context_keeps_the_newest_within_the_budget_and_window_keeps_k() -> None:
    history = [{"role": "user", "content": f"{i:03d}" + "." * 7} for i in range(400)]  # 10 chars each
    cfg = EvalConfig(url="http://x", modes=("full-context",), context_chars=95, window_turns=3)
    kept = full_context_history(history, cfg)
    assert [m["content"] for m in kept[1:]] == [m["content"] for m in history[-9:]]
    assert kept[0]["content"] == history[-10]["content"][-5:]  # the oldest kept one, cut to its tail
    assert len(full_context_history(history, EvalConfig(url="x", modes=(), context_chars=10**6))) == 255
    assert window_history(history, cfg) == history[-3:]


def test_modes_prompt_and_session_ids() -> None:
    assert parse_modes("window, tmem,window") == ("window", "tmem")
    with pytest.raises(ValueError, match="unknown mode"):
        parse_modes("window,memory")
    dated = Question("q", "When?", "May", "temporal-reasoning", question_date="2023/05/30")
    assert question_prompt(dated).endswith("(question date: 2023/05/30) Question: When?")
    assert "no information available" in question_prompt(dated)
    assert session_id_for("ab12", "gpt4/2655 b836") == "eval-ab12-gpt4-2655-b836"


def test_scoring_rules_per_benchmark() -> None:
    adversarial = Question("c:1", "Q?", "trap", 5, is_adversarial=True, is_abstention=True)
    assert score_answer("locomo", adversarial, "No information available.") == {"f1": 1.0, "em": 1.0}
    abstain = Question("x_abs", "Q?", "You did not say.", "multi-session", is_abstention=True)
    assert score_answer("longmemeval", abstain, "Not mentioned.") == {"f1": 1.0, "em": 1.0}
    plain = Question("y", "Q?", "green tea", "single-session-user")
    assert score_answer("longmemeval", plain, "Green tea") == {"f1": 1.0, "em": 1.0}


# --- a whole run against a fake API ---


class FakeServer:
    """Enough of the TMEM API for the runner: sessions, ingest, flush, info, delete, chat."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[dict[str, str]]] = {}
        self.chats: list[tuple[dict[str, str], list[dict[str, str]]]] = []
        self.deleted: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/chat/completions":
            self.chats.append((dict(request.headers), body["messages"]))
            version = "0" if request.headers.get("x-tmem-adapter") == "off" else "3"
            reply = {"id": "c", "choices": [{"message": {"role": "assistant", "content": "answer 0"}}]}
            return httpx.Response(200, json=reply, headers={"X-TMEM-Adapter-Version": version})
        sid = path.split("/")[3]
        if path.endswith("/messages"):
            assert len(body["messages"]) <= 256
            self.sessions.setdefault(sid, []).extend(body["messages"])
        elif path.endswith("/flush"):
            return httpx.Response(200, json={"id": sid, "adapter_version": 3})
        elif request.method == "DELETE":
            self.deleted.append(sid)
            return httpx.Response(200, json={"id": sid, "deleted": True})
        info = {"id": sid, "adapter_version": 3, "turns": len(self.sessions[sid]), "summary": "s", "pending_updates": 0}
        return httpx.Response(200, json=info)


def run_fake(tmp_path: Path, server: FakeServer, convs: list[Conversation], modes: tuple[str, ...]) -> Any:
    runner = EvalRunner(
        EvalConfig(url="http://fake", modes=modes), "locomo", tmp_path, transport=httpx.MockTransport(server)
    )
    try:
        return runner.run(convs)
    finally:
        runner.close()


def test_a_run_asks_each_mode_once_and_a_rerun_asks_nothing(tmp_path: Path) -> None:
    server = FakeServer()
    convs = [conversation("conv-1", 2), conversation("conv-2", 2)]
    modes = ("window", "summary", "tmem")
    first = run_fake(tmp_path, server, convs, modes)
    assert dict(first.answered_now) == {"window": 4, "summary": 4, "tmem": 4} and first.skipped == 0
    assert len(server.sessions) == 2 and sorted(server.deleted) == sorted(server.sessions)  # one session each
    assert all(len(turns) == 4 for turns in server.sessions.values())  # 2 history sessions x 2 turns
    session_chats = [(h, m) for h, m in server.chats if "x-session-id" in h]
    assert len(session_chats) == 8 and all(h["x-tmem-record"] == "false" for h, _ in session_chats)
    assert sum(h.get("x-tmem-adapter") == "off" for h, _ in session_chats) == 4  # the summary mode
    window_chat = next(m for h, m in server.chats if "x-session-id" not in h)
    assert [m["content"] for m in window_chat[:-1]] == [m["content"] for m in convs[0].history_messages()]
    lines = (tmp_path / "answers.jsonl").read_text().splitlines()
    assert len(lines) == 12
    assert {json.loads(line)["adapter_version"] for line in lines if '"tmem"' in line} == {3}
    assert first.table.to_dict()["modes"]["tmem"]["all"]["n"] == 4

    chats_before = len(server.chats)
    again = run_fake(tmp_path, server, convs, modes)
    assert sum(again.answered_now.values()) == 0 and again.skipped == 12
    assert len(server.chats) == chats_before and len(server.sessions) == 2  # no ingest either
    assert again.table.to_dict() == first.table.to_dict()


def test_more_questions_later_are_asked_in_a_fresh_session(tmp_path: Path) -> None:
    server = FakeServer()
    run_fake(tmp_path, server, [conversation("conv-1", 2)], ("tmem",))
    grown = run_fake(tmp_path, server, [conversation("conv-1", 5)], ("tmem",))
    assert dict(grown.answered_now) == {"tmem": 3} and grown.skipped == 2
    assert len(server.sessions) == 2  # re-ingested under a new run id
    assert grown.table.to_dict()["modes"]["tmem"]["all"]["n"] == 5


def test_judge_sends_the_judge_prompt_without_the_tmem_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMEM_API_KEY", "sk-tmem-secret")
    seen: list[httpx.Request] = []

    def judge_api(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "judge-model"}]})
        return httpx.Response(200, json={"id": "j", "choices": [{"message": {"role": "assistant", "content": "Yes."}}]})

    judge = Judge("http://judge/v1", transport=httpx.MockTransport(judge_api))
    question = Question("q", "What tea?", "green tea", "single-session-user")
    assert judge(question, "green") == 1.0
    body = json.loads(seen[-1].content)
    assert body["model"] == "judge-model" and "Correct Answer: green tea" in body["messages"][0]["content"]
    assert all("authorization" not in r.headers for r in seen)
    judge.close()
