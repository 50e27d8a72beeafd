"""Benchmark loaders: the real LoCoMo file (when present), an invented LoCoMo-shaped sample, and the
synthetic LongMemEval fixture."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tmem.bench.eval.datasets import Conversation, load_locomo, load_longmemeval

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCOMO_PATH = REPO_ROOT.parent / "shared/data/locomo10.json"
LONGMEMEVAL_TINY = REPO_ROOT / "tests/data/longmemeval_tiny.json"


# --- real LoCoMo (CC BY-NC: read in place, never copied into the repo) ---


@pytest.fixture(scope="module")
def locomo_raw() -> list[dict[str, Any]]:
    if not LOCOMO_PATH.exists():
        pytest.skip(f"LoCoMo data not found at {LOCOMO_PATH}; put locomo10.json there to run these tests")
    data: list[dict[str, Any]] = json.loads(LOCOMO_PATH.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def locomo(locomo_raw: list[dict[str, Any]]) -> list[Conversation]:
    return load_locomo(LOCOMO_PATH)


def test_locomo_has_all_conversations_and_questions(locomo: list[Conversation]) -> None:
    assert len(locomo) == 10
    assert sum(len(c.questions) for c in locomo) == 1986
    counts = Counter(q.category for c in locomo for q in c.questions)
    assert counts == {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}


def test_locomo_sessions_are_in_numeric_order_with_dates(locomo: list[Conversation]) -> None:
    assert max(len(c.sessions) for c in locomo) > 10  # so "session_10" < "session_2" would show
    for conv in locomo:
        numbers = [int(s.session_id.removeprefix("session_")) for s in conv.sessions]
        assert numbers == list(range(1, len(conv.sessions) + 1)), conv.sample_id
        assert all(s.date and s.turns for s in conv.sessions)
    first = locomo[0]
    assert first.sample_id == "conv-26"
    assert first.sessions[0].date == "1:56 pm on 8 May, 2023"


def test_locomo_turns_map_speakers_to_roles_and_keep_dia_ids(
    locomo: list[Conversation], locomo_raw: list[dict[str, Any]]
) -> None:
    for conv, raw in zip(locomo, locomo_raw, strict=True):
        speaker_a, speaker_b = raw["conversation"]["speaker_a"], raw["conversation"]["speaker_b"]
        assert conv.speakers == (speaker_a, speaker_b)
        raw_turns = [t for s in conv.sessions for t in raw["conversation"][s.session_id]]
        turns = [t for s in conv.sessions for t in s.turns]
        assert [t.turn_id for t in turns] == [t["dia_id"] for t in raw_turns]
        assert {t.role for t in turns if t.speaker == speaker_a} == {"user"}
        assert {t.role for t in turns if t.speaker == speaker_b} == {"assistant"}


def test_locomo_image_turns_carry_their_caption(locomo: list[Conversation], locomo_raw: list[dict[str, Any]]) -> None:
    captions = {
        (raw["sample_id"], t["dia_id"]): (t["text"], t["blip_caption"])
        for raw in locomo_raw
        for key, session in raw["conversation"].items()
        if isinstance(session, list)
        for t in session
        if t.get("blip_caption")
    }
    assert captions, "the file is expected to contain image turns"
    loaded = {(c.sample_id, t.turn_id): t.text for c in locomo for s in c.sessions for t in s.turns}
    for key, (text, caption) in captions.items():
        assert loaded[key] == f"{text.strip()} [shares a photo: {caption}]".lstrip()


def test_locomo_answers_are_text_and_category_5_is_flagged(
    locomo: list[Conversation], locomo_raw: list[dict[str, Any]]
) -> None:
    for conv, raw in zip(locomo, locomo_raw, strict=True):
        for question, raw_q in zip(conv.questions, raw["qa"], strict=True):
            assert isinstance(question.answer, str)
            assert question.is_adversarial is question.is_abstention is (question.category == 5)
            assert question.evidence == tuple(raw_q["evidence"])
            if question.category == 5:
                assert question.answer == str(raw_q["adversarial_answer"])
            else:
                assert question.answer == str(raw_q["answer"])
    years = [q for c in locomo for q in c.questions if q.answer == "2022"]
    assert years, "integer answers such as 2022 are expected to load as text"


def test_locomo_limits(locomo_raw: list[dict[str, Any]]) -> None:
    [conv] = load_locomo(LOCOMO_PATH, conversations=1, questions=20)
    assert conv.sample_id == locomo_raw[0]["sample_id"]
    assert [q.qid for q in conv.questions] == [f"{conv.sample_id}:{i}" for i in range(20)]
    assert [q.question for q in conv.questions] == [q["question"] for q in locomo_raw[0]["qa"][:20]]
    # The question limit does not cut the history the questions are about.
    assert len(conv.sessions) == len(load_locomo(LOCOMO_PATH, conversations=1)[0].sessions)
    assert [len(c.questions) for c in load_locomo(LOCOMO_PATH, conversations=3, questions=5)] == [5, 5, 5]


def test_locomo_session_messages_start_with_the_date(locomo: list[Conversation]) -> None:
    session = locomo[0].sessions[0]
    messages = session.as_messages()
    assert len(messages) == len(session.turns)
    assert messages[0]["content"] == f"(session date: {session.date}) {session.turns[0].content()}"
    assert session.turns[0].content().startswith(f"{session.turns[0].speaker}: ")
    assert [m["role"] for m in messages] == [t.role for t in session.turns]


# --- an invented LoCoMo-shaped sample, so the loader is covered where the real file is absent ---

INVENTED_LOCOMO = [
    {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "Ada",
            "speaker_b": "Bo",
            "session_10_date_time": "9:00 am on 3 March, 2024",
            "session_10": [{"speaker": "Bo", "dia_id": "D10:1", "text": "Back from the coast."}],
            "session_2_date_time": "8:00 pm on 1 February, 2024",
            "session_2": [
                {"speaker": "Ada", "dia_id": "D2:1", "text": "Look at my garden!", "blip_caption": "a photo of tulips"},
                {"speaker": "Bo", "dia_id": "D2:2", "text": "Lovely."},
            ],
            "session_1_date_time": "7:00 pm on 5 January, 2024",
            "session_1": [{"speaker": "Ada", "dia_id": "D1:1", "text": "I started a garden in 2023."}],
        },
        "qa": [
            {"question": "When did Ada start a garden?", "answer": 2023, "evidence": ["D1:1"], "category": 2},
            {"question": "What did Bo plant?", "adversarial_answer": "tulips", "evidence": ["D2:1"], "category": 5},
            {"question": "Would Ada like a greenhouse?", "answer": "Likely yes; she gardens", "evidence": [],
             "category": 3},
        ],
    }
]  # fmt: skip


def test_invented_locomo_sample_loads_in_order(tmp_path: Path) -> None:
    path = tmp_path / "locomo_invented.json"
    path.write_text(json.dumps(INVENTED_LOCOMO), encoding="utf-8")
    [conv] = load_locomo(path)
    assert [s.session_id for s in conv.sessions] == ["session_1", "session_2", "session_10"]
    assert conv.sessions[1].turns[0].text == "Look at my garden! [shares a photo: a photo of tulips]"
    assert [(q.answer, q.category, q.is_adversarial) for q in conv.questions] == [
        ("2023", 2, False),
        ("tulips", 5, True),
        ("Likely yes; she gardens", 3, False),  # the ";" cut is the scorer's job
    ]
    assert conv.history_messages() == [
        {"role": "user", "content": "(session date: 7:00 pm on 5 January, 2024) Ada: I started a garden in 2023."},
        {
            "role": "user",
            "content": "(session date: 8:00 pm on 1 February, 2024) Ada: Look at my garden! "
            "[shares a photo: a photo of tulips]",
        },
        {"role": "assistant", "content": "Bo: Lovely."},
        {"role": "assistant", "content": "(session date: 9:00 am on 3 March, 2024) Bo: Back from the coast."},
    ]


def test_invented_locomo_rejects_a_third_speaker(tmp_path: Path) -> None:
    broken = json.loads(json.dumps(INVENTED_LOCOMO))
    broken[0]["conversation"]["session_1"][0]["speaker"] = "Cy"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    with pytest.raises(ValueError, match="Cy"):
        load_locomo(path)


# --- synthetic LongMemEval fixture ---


@pytest.fixture(scope="module")
def longmemeval() -> list[Conversation]:
    return load_longmemeval(LONGMEMEVAL_TINY)


def test_longmemeval_one_conversation_per_instance(longmemeval: list[Conversation]) -> None:
    assert [c.sample_id for c in longmemeval] == [
        "synth_user_001",
        "synth_temporal_002",
        "synth_update_003",
        "synth_multi_004_abs",
    ]
    assert all(len(c.questions) == 1 and c.questions[0].qid == c.sample_id for c in longmemeval)
    assert [len(c.sessions) for c in longmemeval] == [2, 3, 2, 2]
    assert [q.category for c in longmemeval for q in c.questions] == [
        "single-session-user",
        "temporal-reasoning",
        "knowledge-update",
        "multi-session",
    ]


def test_longmemeval_question_fields(longmemeval: list[Conversation]) -> None:
    questions = [c.questions[0] for c in longmemeval]
    assert [q.is_abstention for q in questions] == [False, False, False, True]
    assert not any(q.is_adversarial for q in questions)
    assert questions[1].answer == "12"  # integer answers load as text
    assert questions[1].question_date == "2023/04/30 (Sun) 20:00"
    assert questions[2].evidence == ("answer_synth_update_003_a", "answer_synth_update_003_b")
    assert questions[3].evidence == ()


def test_longmemeval_sessions_keep_roles_dates_and_evidence_marks(longmemeval: list[Conversation]) -> None:
    temporal = longmemeval[1]
    assert [s.date for s in temporal.sessions] == [
        "2023/04/03 (Mon) 19:30",
        "2023/04/08 (Sat) 11:00",
        "2023/04/15 (Sat) 08:45",
    ]
    last = temporal.sessions[2]
    assert last.session_id == "answer_synth_temporal_002_b"
    messages = last.as_messages()
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant"]
    assert messages[0]["content"] == "(session date: 2023/04/15 (Sat) 08:45) Welcome back! How can I help this morning?"
    assert messages[1]["content"] == last.turns[1].text  # no speaker-name prefix: the role says it
    assert [t.has_answer for t in last.turns] == [False, True, False]
    assert last.as_messages(with_date=False)[0]["content"] == "Welcome back! How can I help this morning?"
    assert len(temporal.history_messages()) == 7


def test_longmemeval_filters(longmemeval: list[Conversation]) -> None:
    updates = load_longmemeval(LONGMEMEVAL_TINY, question_types={"knowledge-update", "multi-session"})
    assert [c.sample_id for c in updates] == ["synth_update_003", "synth_multi_004_abs"]
    first_two = load_longmemeval(LONGMEMEVAL_TINY, conversations=2)
    assert [c.sample_id for c in first_two] == [c.sample_id for c in longmemeval[:2]]
