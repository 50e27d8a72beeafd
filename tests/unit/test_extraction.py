"""The tolerant parser for what models actually write back."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tmem.adapters.extraction import (
    ExtractionLimits,
    ParseReport,
    QAPair,
    normalize_question,
    parse_pairs,
    parse_summary,
)
from tmem.adapters.memory_prompts import ExtractionFormat

ANN = ("Where does Ann live?", "Lisbon")
BOB = ("Who is Bob?", "Ann's brother")
TWO = '[{"instruction": "Where does Ann live?", "output": "Lisbon"}, {"instruction": "Who is Bob?", "output": "Ann\'s brother"}]'  # noqa: E501

# (case id, raw model reply, the exact pairs expected, how many items are dropped)
PARSE_CASES: list[tuple[str, str, list[tuple[str, str]], int]] = [
    ("clean array", TWO, [ANN, BOB], 0),
    ("empty array", "[]", [], 0),
    ("empty array in prose", "Nothing new to remember here: []", [], 0),
    ("json fence", f"```json\n{TWO}\n```", [ANN, BOB], 0),
    ("bare fence", f"```\n{TWO}\n```", [ANN, BOB], 0),
    ("prose around", f"Sure! Here are the pairs:\n{TWO}\nLet me know if you need more.", [ANN, BOB], 0),
    ("stray brackets in prose", f"Pairs [as asked] below (see [1]):\n{TWO}", [ANN, BOB], 0),
    ("single object", '{"instruction": "Where does Ann live?", "output": "Lisbon"}', [ANN], 0),
    ("wrapped in pairs", f'{{"pairs": {TWO}}}', [ANN, BOB], 0),
    ("wrapped in qa", f'{{"qa": {TWO}, "count": 2}}', [ANN, BOB], 0),
    ("wrapped twice", f'{{"result": {{"items": {TWO}}}}}', [ANN, BOB], 0),
    (
        "trailing commas",
        '[{"instruction": "Where does Ann live?", "output": "Lisbon",},\n {"instruction": "Who is Bob?", '
        '"output": "Ann\'s brother",},\n]',
        [ANN, BOB],
        0,
    ),
    (
        "python literal",
        "[{'instruction': 'Where does Ann live?', 'output': 'Lisbon'}, "
        "{'instruction': 'Does Ann own a dog?', 'output': True}]",
        [ANN, ("Does Ann own a dog?", "yes")],
        0,
    ),
    (
        "smart quotes",
        "[{“instruction”: “Where does Ann live?”, “output”: “Lisbon”}]",
        [ANN],
        0,
    ),
    (
        "smart quotes inside valid json are kept",
        '[{"instruction": "What did Ann say?", "output": "“See you Friday”"}]',
        [("What did Ann say?", "“See you Friday”")],
        0,
    ),
    (
        "cut off mid-object",
        TWO[:-1] + ', {"instruction": "When is the trip?", "outp',
        [ANN, BOB],
        0,
    ),
    (
        "cut off inside an unterminated fence and a wrapper",
        '```json\n{"pairs": [{"instruction": "Where does Ann live?", "output": "Lisbon"}, {"instr',
        [ANN],
        0,
    ),
    (
        "question and answer keys",
        '[{"question": "Where does Ann live?", "answer": "Lisbon"}]',
        [ANN],
        0,
    ),
    ("short keys in upper case", '[{"Q": "Where does Ann live?", "A": "Lisbon"}]', [ANN], 0),
    (
        "prompt/response and input/completion keys",
        '[{"Prompt": "Where does Ann live?", "Response": "Lisbon"}, '
        '{"INPUT": "Who is Bob?", "Completion": "Ann\'s brother"}]',
        [ANN, BOB],
        0,
    ),
    (
        "numbers and bools become text",
        '[{"instruction": "How old is Ann?", "output": 34}, {"instruction": "Is Ann vegan?", "output": false},'
        ' {"instruction": "How tall is Ann in metres?", "output": 1.7}, {"instruction": 2024, "output": 3.0}]',
        [("How old is Ann?", "34"), ("Is Ann vegan?", "no"), ("How tall is Ann in metres?", "1.7"), ("2024", "3")],
        0,
    ),
    (
        "list of strings is joined",
        '[{"instruction": "Which cities has Ann visited?", "output": ["Porto", " Paris ", "", "Rome"]}]',
        [("Which cities has Ann visited?", "Porto, Paris, Rome")],
        0,
    ),
    (
        "objects, null, nested lists and NaN are dropped",
        '[{"instruction": "Who is Ann?", "output": {"name": "Ann"}}, {"instruction": "Who?", "output": null},'
        ' {"instruction": "Why?", "output": [["a"]]}, {"instruction": "How much?", "output": NaN}, '
        '{"instruction": "Where does Ann live?", "output": "Lisbon"}]',
        [ANN],
        4,
    ),
    (
        "empty and whitespace values are dropped",
        '[{"instruction": "  ", "output": "x"}, {"instruction": "Who is Bob?", "output": "\\n\\t"}, '
        '{"instruction": "?!", "output": "x"}, {"instruction": " Where does Ann live? ", "output": " Lisbon "}]',
        [ANN],
        3,
    ),
    (
        "missing keys and non-objects are dropped",
        '["Where does Ann live?", 7, {"instruction": "Who is Bob?"}, {"output": "Lisbon"}, '
        '{"instruction": "Where does Ann live?", "output": "Lisbon", "confidence": 0.9}]',
        [ANN],
        4,
    ),
    (
        "duplicates within the reply",
        '[{"instruction": "Where does Ann live?", "output": "Lisbon"}, '
        '{"instruction": "where  does ANN live", "output": "Porto"}, '
        '{"instruction": "Where does Ann live?!", "output": "Lisbon"}]',
        [ANN],
        2,
    ),
    (
        "think block with a draft array is ignored",
        '<think>Maybe [{"instruction": "Draft?", "output": "no"}]</think>\n'
        '[{"instruction": "Where does Ann live?", "output": "Lisbon"}]',
        [ANN],
        0,
    ),
    ("unfinished think block holds nothing", '<think>I will write [{"instruction": "Draft?", "output": "no"}]', [], 0),
    ("no json at all", "I could not find anything worth remembering.", [], 0),
    ("empty reply", "", [], 0),
    (
        "a list value does not hide the object holding it",
        '{"instruction": "Which cities has Ann visited?", "output": ["Porto", "Rome"]}',
        [("Which cities has Ann visited?", "Porto, Rome")],
        0,
    ),
]


@pytest.mark.parametrize(
    ("raw", "expected", "dropped"), [case[1:] for case in PARSE_CASES], ids=[case[0] for case in PARSE_CASES]
)
def test_parse_pairs_handles_malformed_replies(raw: str, expected: list[tuple[str, str]], dropped: int) -> None:
    report = parse_pairs(raw)
    assert [(pair.instruction, pair.output) for pair in report.pairs] == expected
    assert report.dropped == dropped
    assert len(report.problems) >= dropped  # every dropped item says why


def test_report_says_why_items_were_dropped() -> None:
    raw = (
        '[{"instruction": "Where does Ann live?", "output": "Lisbon"}, "oops", '
        '{"instruction": "Who is Bob?"}, {"instruction": "Who?", "output": null}]'
    )
    report = parse_pairs(raw)
    assert report.ok
    assert report.problems == ["item 2: not an object", "item 3: missing 'output'", "item 4: 'output' is not text"]


def test_ok_distinguishes_an_empty_array_from_no_array() -> None:
    empty = parse_pairs("```json\n[]\n```")
    assert empty.ok and empty.pairs == [] and empty.problems == []
    nothing = parse_pairs("Sorry, I cannot help with that.")
    assert not nothing.ok
    assert nothing.problems == ["no JSON array found"]


def test_salvage_and_python_fallback_are_reported() -> None:
    cut = parse_pairs('[{"instruction": "Where does Ann live?", "output": "Lisbon"}, {"instruction": "Wh')
    assert cut.problems == ["array was cut off: kept its 1 complete items"]
    literal = parse_pairs("[{'instruction': 'Where does Ann live?', 'output': 'Lisbon'}]")
    assert literal.problems == ["read as a Python literal, not JSON"]


def _items(count: int, start: int = 0) -> list[dict[str, str]]:
    return [{"instruction": f"What is fact number {i}?", "output": f"Fact {i}"} for i in range(start, start + count)]


def test_keeps_only_the_first_max_pairs() -> None:
    report = parse_pairs(json.dumps(_items(70)))
    assert [pair.output for pair in report.pairs] == [f"Fact {i}" for i in range(64)]
    assert report.dropped == 6
    assert report.problems == ["kept the first 64 pairs: dropped 6 more items"]


def test_invalid_items_do_not_use_up_the_pair_budget() -> None:
    items: list[Any] = [{"instruction": "no answer"}, *_items(3)]
    report = parse_pairs(json.dumps(items), limits=ExtractionLimits(max_pairs=2))
    assert [pair.output for pair in report.pairs] == ["Fact 0", "Fact 1"]
    assert report.dropped == 2  # the invalid item and the surplus one


@pytest.mark.parametrize("field", ["instruction", "output"])
def test_items_over_the_length_limit_are_dropped_not_cut(field: str) -> None:
    limits = ExtractionLimits(max_instruction_chars=20, max_output_chars=10)
    limit = 20 if field == "instruction" else 10
    at_limit = {"instruction": "Q" * 20, "output": "A" * 10}
    over = {**at_limit, field: "x" * (limit + 1)}
    report = parse_pairs(json.dumps([over, at_limit]), limits=limits)
    assert report.pairs == [QAPair(instruction="Q" * 20, output="A" * 10)]
    assert report.dropped == 1
    assert report.problems == [f"item 1: {field!r} longer than {limit} characters"]


def test_length_limit_counts_the_stripped_text() -> None:
    limits = ExtractionLimits(max_output_chars=5)
    report = parse_pairs('[{"instruction": "Who?", "output": "   Lisbon   "}]', limits=limits)
    assert report.pairs == [] and report.dropped == 1
    report = parse_pairs('[{"instruction": "Who?", "output": "   Porto   "}]', limits=limits)
    assert report.pairs == [QAPair(instruction="Who?", output="Porto")]


def test_reply_is_cut_to_max_raw_chars_before_parsing() -> None:
    raw = json.dumps(_items(10))
    limits = ExtractionLimits(max_raw_chars=len(json.dumps(_items(3))) + 5)
    report = parse_pairs(raw, limits=limits)
    assert [pair.output for pair in report.pairs] == ["Fact 0", "Fact 1", "Fact 2"]
    assert report.problems[0] == f"reply cut to its first {limits.max_raw_chars} characters"


def test_dedupes_against_known_pairs() -> None:
    known = [QAPair(instruction="Where does Ann live?", output="Lisbon")]
    raw = (
        '[{"instruction": "where does ann  LIVE", "output": "Lisbon, Portugal"}, '
        '{"instruction": "Who is Bob?", "output": "Ann\'s brother"}]'
    )
    report = parse_pairs(raw, known=known)
    assert [pair.instruction for pair in report.pairs] == ["Who is Bob?"]
    assert report.dropped == 1
    assert report.problems == ["item 1: repeats a known pair"]


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("Where does Ann live?", "  where DOES ann\tlive ", True),
        ("Where does Ann live?", "Where does Ann live?!…", True),
        ("Where does Ann live?", "Where did Ann live?", False),
        ("What is 2+2?", "What is 2+2", True),
    ],
)
def test_normalize_question(a: str, b: str, same: bool) -> None:
    assert (normalize_question(a) == normalize_question(b)) is same


def test_qapair_strips_and_refuses_empty_or_non_text() -> None:
    assert QAPair(instruction=" Who? ", output=" Bob\n").model_dump() == {"instruction": "Who?", "output": "Bob"}
    for bad in ({"instruction": " ", "output": "x"}, {"instruction": "Who?", "output": 3}):
        with pytest.raises(ValidationError):
            QAPair.model_validate(bad)
    pair = QAPair(instruction="Who?", output="Bob")
    with pytest.raises(ValidationError):
        pair.output = "Ann"  # type: ignore[misc]


def test_schema_accepts_what_the_parser_returns_and_refuses_bad_items() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = ExtractionFormat().schema()
    report = parse_pairs(TWO)
    jsonschema.validate([pair.model_dump() for pair in report.pairs], schema)
    jsonschema.validate([], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"instruction": "Who?"}], schema)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Ann lives in Lisbon.", "Ann lives in Lisbon."),
        ("  Summary: Ann lives in Lisbon.\n", "Ann lives in Lisbon."),
        ("**Updated summary:** Ann lives in Lisbon.", "Ann lives in Lisbon."),
        ("## Memory\nAnn lives in Lisbon.", "Ann lives in Lisbon."),
        ('"Ann lives in Lisbon."', "Ann lives in Lisbon."),
        ("```text\nSummary: Ann lives in Lisbon.\n```", "Ann lives in Lisbon."),
        ("<think>what changed?</think>\n“Ann lives in Lisbon.”", "Ann lives in Lisbon."),
        ("Summary of events: Ann moved.", "Summary of events: Ann moved."),
        ("", ""),
    ],
)
def test_parse_summary(raw: str, expected: str) -> None:
    assert parse_summary(raw) == expected


def test_parse_summary_caps_length_on_a_word_boundary() -> None:
    text = parse_summary("word " * 100, max_chars=42)
    assert len(text) <= 42
    assert text.split() == ["word"] * len(text.split())


# --- property tests: the parser never raises and what it returns is always clean -------------------------

KEYS = ["instruction", "output", "question", "Answer", "q", "A", "pairs", "qa", "x"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=25,
)
WRAPPERS = ["{}", "```json\n{}\n```", "Here you go:\n{}\nDone.", "<think>hmm</think>{}", "```\n{}"]
SMALL = ExtractionLimits(max_pairs=3, max_instruction_chars=12, max_output_chars=12, max_raw_chars=400)
KNOWN = [QAPair(instruction="q", output="a")]


def assert_clean(report: ParseReport, limits: ExtractionLimits, known: list[QAPair]) -> None:
    assert len(report.pairs) <= limits.max_pairs
    keys = [normalize_question(pair.instruction) for pair in report.pairs]
    assert all(keys), "every question has words"
    assert len(set(keys)) == len(keys), "no duplicate questions"
    assert not set(keys) & {normalize_question(pair.instruction) for pair in known}
    for pair in report.pairs:
        assert pair.instruction == pair.instruction.strip() and pair.output == pair.output.strip()
        assert 0 < len(pair.instruction) <= limits.max_instruction_chars
        assert 0 < len(pair.output) <= limits.max_output_chars
    # Every dropped item says why: one "item N: ..." problem each, or its share of the surplus line.
    assert report.dropped == dropped_in_problems(report.problems), report.problems
    assert report.ok or (not report.pairs and report.dropped == 0)


def dropped_in_problems(problems: list[str]) -> int:
    """How many dropped items the problems account for."""
    surplus = [int(m[1]) for p in problems if (m := re.search(r"dropped (\d+) more items", p))]
    return sum(p.startswith("item ") for p in problems) + sum(surplus)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.text(), small=st.booleans())
def test_any_text_parses_to_clean_pairs(raw: str, small: bool) -> None:
    limits = SMALL if small else ExtractionLimits()
    report = parse_pairs(raw, known=KNOWN, limits=limits)
    assert_clean(report, limits, KNOWN)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values, wrapper=st.sampled_from(WRAPPERS), cut=st.none() | st.integers(0, 400), small=st.booleans())
def test_any_json_parses_to_clean_pairs(value: Any, wrapper: str, cut: int | None, small: bool) -> None:
    raw = wrapper.replace("{}", json.dumps(value))[:cut]
    limits = SMALL if small else ExtractionLimits()
    report = parse_pairs(raw, known=KNOWN, limits=limits)
    assert_clean(report, limits, KNOWN)
    whole = cut is None and wrapper == "{}" and len(raw) <= limits.max_raw_chars
    if whole and isinstance(value, list) and any(isinstance(item, dict) for item in value):
        # The outer array is the first candidate holding an object, so every item is accounted for.
        assert report.ok and len(report.pairs) + report.dropped == len(value)


@settings(max_examples=100)
@given(raw=st.text())
def test_any_text_gives_a_bounded_summary(raw: str) -> None:
    summary = parse_summary(raw, max_chars=50)
    assert len(summary) <= 50 and summary == summary.strip()
