"""`tmem eval` against the shared real server (vLLM tiny model, Redis, inline worker) on the real LoCoMo file.

The tiny model is random, so nothing here looks at score values: the tests check that every (mode,
question) is answered exactly once, that counts and categories add up, that an interrupted run resumes
without repeating itself, and that `X-TMEM-Adapter: off` serves a session on the base model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import greedy, teach_and_flush

from tmem.bench.eval.datasets import load_locomo
from tmem.server.cli import main as tmem_main

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCOMO_PATH = REPO_ROOT.parent / "shared/data/locomo10.json"
LONGMEMEVAL_TINY = REPO_ROOT / "tests/data/longmemeval_tiny.json"
MODES = ("window", "tmem")


@pytest.fixture(scope="module")
def locomo_path() -> Path:
    if not LOCOMO_PATH.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO_PATH}; put locomo10.json there to run these tests")
    return LOCOMO_PATH


def tmem_eval(url: str, out: Path, data: Path, *flags: str, benchmark: str = "locomo") -> dict[str, Any]:
    """Run `tmem eval <benchmark>` in-process and return the results.json it wrote."""
    argv = ["eval", benchmark, "--data", str(data), "--url", url, "--out", str(out), "--max-tokens", "8", *flags]
    assert tmem_main(argv) == 0
    results: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return results


def answer_lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]


def category_counts(results: dict[str, Any], mode: str) -> dict[str, int]:
    return {c: cell["n"] for c, cell in results["scores"]["modes"][mode].items()}


@pytest.fixture(scope="module")
def full_run(server: Any, locomo_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One conversation, its first 20 questions, window + tmem, in one go."""
    out = tmp_path_factory.mktemp("eval-full")
    results = tmem_eval(server.url, out, locomo_path, "--mode", ",".join(MODES), "--conversations", "1",
                        "--questions", "20")  # fmt: skip
    return out, results


def test_adapter_off_header_serves_a_session_on_the_base_model(server: Any, sid: str) -> None:
    question = "Which city did I move to in 2021?"
    version = teach_and_flush(server.url, sid, [(question, "You moved to Porto in 2021.")])
    assert version >= 1
    taught = greedy(server.url, question, sid)
    assert taught[1] == version
    off = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0},
        headers={"X-Session-ID": sid, "X-TMEM-Record": "false", "X-TMEM-Adapter": "off", "X-TMEM-Context": "none"},
        timeout=120,
    )
    assert off.status_code == 200, off.text
    assert off.headers["X-TMEM-Adapter-Version"] == "0"
    # Without its adapter and its context (the taught pair is also in its `pairs` summary) it is the base model.
    assert off.json()["choices"][0]["message"]["content"] == greedy(server.url, question)[0] != taught[0]
    assert greedy(server.url, question, sid) == taught  # the header changed nothing for later requests


def test_full_run_answers_every_mode_and_question_once(
    full_run: tuple[Path, dict[str, Any]], locomo_path: Path, capsys: pytest.CaptureFixture[str], server: Any
) -> None:
    out, results = full_run
    lines = answer_lines(out)
    assert len(lines) == 40 and len({(r["mode"], r["qid"]) for r in lines}) == 40
    (conv,) = load_locomo(locomo_path, conversations=1, questions=20)
    expected = Counter(str(q.category) for q in conv.questions)
    assert results["answered"] == {"window": 20, "tmem": 20}
    for mode in MODES:
        counts = category_counts(results, mode)
        assert counts.pop("all") == 20
        assert counts == expected
        assert set(results["scores"]["modes"][mode]["all"]) == {"n", "f1", "em"}
    (session,) = results["last_run"]["sessions"]
    assert session["sample_id"] == conv.sample_id and session["session_id"].endswith(conv.sample_id)
    assert session["messages"] == len(conv.history_messages())  # every history message ingested once
    assert {r["adapter_version"] for r in lines if r["mode"] == "window"} == {0}  # stateless
    assert {r["adapter_version"] for r in lines if r["mode"] == "tmem"} == {session["adapter_version"]}
    assert all("error" not in r for r in lines)
    assert (out / "f1_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the eval session is cleaned up afterwards
    assert httpx.get(f"{server.url}/v1/sessions/{session['session_id']}", timeout=30).status_code == 404


def test_an_interrupted_run_resumes_without_repeating_and_matches_a_full_run(
    server: Any, locomo_path: Path, tmp_path: Path, full_run: tuple[Path, dict[str, Any]]
) -> None:
    flags = ["--mode", ",".join(MODES), "--conversations", "1"]
    # "Killed halfway": the first run got through 10 of the 20 questions.
    first = tmem_eval(server.url, tmp_path, locomo_path, *flags, "--questions", "10")
    assert first["answered"] == {"window": 10, "tmem": 10}
    first_keys = {(r["mode"], r["qid"]) for r in answer_lines(tmp_path)}

    second = tmem_eval(server.url, tmp_path, locomo_path, *flags, "--questions", "20")
    assert second["last_run"]["answered"] == {"window": 10, "tmem": 10}
    assert second["last_run"]["skipped_already_answered"] == 20
    lines = answer_lines(tmp_path)
    keys = [(r["mode"], r["qid"]) for r in lines]
    assert len(keys) == 40 and len(set(keys)) == 40  # no (mode, qid) asked twice
    assert set(keys[:20]) == first_keys  # earlier answers kept as they were, new ones appended
    assert {int(qid.split(":")[1]) for _, qid in keys[20:]} == set(range(10, 20))
    # questions were still missing, so the conversation was ingested again, in a fresh session
    (session,) = second["last_run"]["sessions"]
    assert session["session_id"] != first["last_run"]["sessions"][0]["session_id"]
    _, direct = full_run
    assert second["answered"] == direct["answered"]
    assert {m: category_counts(second, m) for m in MODES} == {m: category_counts(direct, m) for m in MODES}


def test_longmemeval_runs_every_mode_on_the_synthetic_fixture(server: Any, tmp_path: Path) -> None:
    results = tmem_eval(server.url, tmp_path, LONGMEMEVAL_TINY, "--mode", "full-context,window,summary,tmem",
                        benchmark="longmemeval")  # fmt: skip
    raw = json.loads(LONGMEMEVAL_TINY.read_text(encoding="utf-8"))
    expected = Counter(item["question_type"] for item in raw)
    assert results["answered"] == dict.fromkeys(("full-context", "window", "summary", "tmem"), len(raw))
    for mode in results["modes"]:
        counts = category_counts(results, mode)
        assert counts.pop("all") == len(raw) and counts == expected
    summary_lines = [r for r in answer_lines(tmp_path) if r["mode"] == "summary"]
    assert {r["adapter_version"] for r in summary_lines} == {0}  # X-TMEM-Adapter: off
    assert len(results["last_run"]["sessions"]) == len(raw)  # one session per instance, shared by two modes
