"""What an evaluation run answered and how it scored: the resumable answer log, results.json, the chart.

``answers.jsonl`` holds one JSON object per (mode, question) answered, appended as soon as it is
scored, so an interrupted run loses at most the answer in flight.  Everything here is pure file and
number work (no HTTP), so the resume bookkeeping is unit-tested without a server.
"""

from __future__ import annotations

import json
from collections.abc import Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tmem.bench.eval.datasets import Conversation, Question
from tmem.bench.eval.scoring import ScoreTable
from tmem.bench.harness import pyplot, save_figure

ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"
CHART_FILE = "f1_by_category.png"
TINY_MODEL_NOTE = (
    "NOTE: scores are only as meaningful as the served model. On the random-weight tiny test model they "
    "mean nothing: such a run checks the harness (ingest, flush, ask, score, resume), not memory."
)

AnswerKey = tuple[str, str]  # (mode, question id)


def answer_key(record: Mapping[str, Any]) -> AnswerKey:
    """The (mode, qid) a record answers."""
    return str(record["mode"]), str(record["qid"])


def parse_answer_lines(lines: Iterable[str]) -> dict[AnswerKey, dict[str, Any]]:
    """Records by (mode, qid), first one kept.

    Blank lines and lines that are not a JSON object with ``mode`` and ``qid`` are skipped: a run
    killed mid-write leaves a truncated last line, and that answer is simply asked again.
    """
    records: dict[AnswerKey, dict[str, Any]] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "mode" in record and "qid" in record:
            records.setdefault(answer_key(record), record)
    return records


class AnswerLog:
    """``answers.jsonl``: loaded once at start, then appended to one flushed line per answer."""

    def __init__(self, path: Path) -> None:
        self.path = path
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        self.records = parse_answer_lines(text.splitlines())
        # A killed run can leave a last line without its newline; the next record must not be glued on.
        self._needs_newline = bool(text) and not text.endswith("\n")

    def __contains__(self, key: object) -> bool:
        return key in self.records

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line now (flushed), and remember it as answered."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            if self._needs_newline:
                out.write("\n")
                self._needs_newline = False
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.records.setdefault(answer_key(record), record)


def pending_questions(
    conversation: Conversation, modes: Sequence[str], answered: Container[AnswerKey]
) -> dict[str, list[Question]]:
    """For each mode, the conversation's questions not answered yet (file order); modes with none are left out."""
    todo = {mode: [q for q in conversation.questions if (mode, q.qid) not in answered] for mode in modes}
    return {mode: questions for mode, questions in todo.items() if questions}


def selection_keys(conversations: Iterable[Conversation], modes: Sequence[str]) -> set[AnswerKey]:
    """Every (mode, qid) this run is asked to report on."""
    return {(mode, q.qid) for conv in conversations for q in conv.questions for mode in modes}


def score_table(records: Iterable[Mapping[str, Any]], keys: set[AnswerKey], modes: Sequence[str]) -> ScoreTable:
    """A table of the records in ``keys``, modes in the order given (the log may also hold other runs' answers)."""
    chosen = [r for r in records if answer_key(r) in keys]
    table = ScoreTable()
    for mode in modes:
        for record in (r for r in chosen if r["mode"] == mode):
            table.add(mode, record["category"], **record["scores"])
    return table


def build_results(table: ScoreTable, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The results.json object: run metadata, then ``scores`` as :meth:`ScoreTable.to_dict` gives it,
    plus per-mode answer counts and the tiny-model caveat."""
    scores = table.to_dict()
    answered = {mode: cells["all"]["n"] for mode, cells in scores["modes"].items()}
    return {**meta, "answered": answered, "scores": scores, "note": TINY_MODEL_NOTE}


def write_results(out_dir: Path, results: Mapping[str, Any]) -> Path:
    """Write ``results.json`` (pretty-printed) and return its path."""
    path = out_dir / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def plot_f1(table: ScoreTable, path: Path, title: str) -> Path:
    """A grouped bar chart: one group per category (and "all"), one bar per mode, height = mean F1."""
    plt = pyplot()

    modes = table.modes()
    categories: list[str] = list(dict.fromkeys(c for mode in modes for c, _ in table.rows(mode)))
    categories = [c for c in categories if c != "all"] + ["all"]  # "all" last, after every mode's categories
    f1 = {(mode, c): cell.means().get("f1", 0.0) for mode in modes for c, cell in table.rows(mode)}
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(categories) * max(1, len(modes)) ** 0.5), 4.0))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [f1.get((mode, c), 0.0) for c in categories], width, label=mode)
    counts = {c: max(cell.n for mode in modes for c2, cell in table.rows(mode) if c2 == c) for c in categories}
    ax.set_xticks(range(len(categories)), [f"{c}\n(n={counts[c]})" for c in categories])
    ax.set_xlabel("category")
    ax.set_ylabel("mean token F1")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend()
    return save_figure(fig, path)
