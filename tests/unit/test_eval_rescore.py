"""The harness's LoCoMo scores agree with an independent re-scoring (LoCoMo's rules over nltk's stemmer).

Predictions are made from real LoCoMo golds (the shared data), bent the ways model answers are: the gold
itself, inflected words, extra words, only part of a multi-hop list, an abstention, nothing at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tmem.bench.eval.datasets import load_locomo
from tmem.bench.eval.report import build_results, score_table
from tmem.bench.eval.rescore import main as rescore_main
from tmem.bench.eval.runner import score_answer

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "locomo10.json"


def variants(gold: str) -> list[str]:
    words = gold.split()
    half = " ".join(words[: max(1, len(words) // 2)])
    return [gold, f"I think {gold}, probably", " ".join(w + "s" for w in words), half, gold.split(",")[0],
            "No information available.", "", f"{gold.upper()}!", "running studies happily"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DATA.exists():
        pytest.fail(f"the shared LoCoMo data is missing: {DATA}")
    out = tmp_path_factory.mktemp("eval")
    records = []
    for conv in load_locomo(DATA, conversations=2, questions=60):
        for question in conv.questions:
            for k, prediction in enumerate(variants(str(question.answer))):
                records.append({"mode": f"m{k % 3}", "qid": f"{question.qid}-{k}", "category": question.category,
                                "gold": question.answer, "prediction": prediction,
                                "scores": score_answer("locomo", question, prediction)})
    (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    keys = {(r["mode"], r["qid"]) for r in records}
    results = build_results(score_table(records, keys, ["m0", "m1", "m2"]), {"benchmark": "locomo"})
    (out / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return out


def test_harness_scores_agree_with_an_independent_rescoring(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rescore_main([str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert "largest |harness - rescored|" in table and table.count("\n") > 10  # every mode and category listed


def test_a_score_off_by_a_little_is_caught(run_dir: Path, tmp_path: Path) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    results["scores"]["modes"]["m1"]["all"]["f1"] += 0.001
    (tmp_path / "results.json").write_text(json.dumps(results))
    (tmp_path / "answers.jsonl").write_text((run_dir / "answers.jsonl").read_text())
    assert rescore_main([str(tmp_path)]) == 1
