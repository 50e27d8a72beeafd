"""Loaders that turn LoCoMo and LongMemEval files into one shape: conversations of dated sessions + questions.

Both benchmarks become a list of :class:`Conversation`.  A LoCoMo conversation has many sessions and
many questions; a LongMemEval instance becomes one conversation (its haystack sessions) with one question.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATE_PREFIX = "(session date: {}) "
"""Put in front of a session's first message.  A prefix rather than a system message, because many
chat templates (Llama 3, Mistral, Gemma) accept a system message only at the very start of a chat, and
sessions are replayed one after another into the same conversation."""

_SESSION_KEY = re.compile(r"session_(\d+)")


@dataclass(frozen=True)
class Turn:
    """One utterance in a session."""

    speaker: str  # LoCoMo: the person's name; LongMemEval: the role ("user" / "assistant")
    role: str  # the chat role the turn is replayed under
    text: str
    turn_id: str | None = None  # LoCoMo's dia_id ("D1:3"), which question evidence refers to
    has_answer: bool = False  # LongMemEval marks the turns that hold the answer

    def content(self) -> str:
        """The message text; prefixed with the speaker's name where the role alone does not say who
        spoke (LoCoMo's questions name people: "What did Caroline research?")."""
        return self.text if self.speaker == self.role else f"{self.speaker}: {self.text}"


@dataclass
class HistorySession:
    """A dated stretch of conversation."""

    date: str
    turns: list[Turn]
    session_id: str = ""

    def as_messages(self, with_date: bool = True) -> list[dict[str, str]]:
        """OpenAI-style ``{"role", "content"}`` messages; the date is prefixed to the first one
        (see :data:`DATE_PREFIX`)."""
        messages = [{"role": turn.role, "content": turn.content()} for turn in self.turns]
        if with_date and messages and self.date:
            messages[0]["content"] = DATE_PREFIX.format(self.date) + messages[0]["content"]
        return messages


@dataclass(frozen=True)
class Question:
    """A question about a conversation, with its gold answer."""

    qid: str
    question: str
    answer: str
    category: str | int  # LoCoMo: 1..5; LongMemEval: the question_type
    evidence: tuple[str, ...] = ()  # LoCoMo dia_ids; LongMemEval answer_session_ids
    is_adversarial: bool = False  # LoCoMo category 5: asks about something never said
    is_abstention: bool = False  # the right output declines (LongMemEval "_abs", LoCoMo category 5)
    question_date: str | None = None  # LongMemEval: when the question is asked


@dataclass
class Conversation:
    """The history a model must remember and the questions asked after it."""

    sample_id: str
    sessions: list[HistorySession]
    questions: list[Question]
    speakers: tuple[str, ...] = field(default=())

    def history_messages(self, with_date: bool = True) -> list[dict[str, str]]:
        """All sessions' messages in order, as one chat (for full-context baselines)."""
        return [message for session in self.sessions for message in session.as_messages(with_date)]


# --- LoCoMo ---


def load_locomo(path: str | Path, conversations: int | None = None, questions: int | None = None) -> list[Conversation]:
    """Load ``locomo10.json``.

    ``conversations`` keeps the first N conversations; ``questions`` keeps the first N questions of each
    conversation (file order).  ``speaker_a`` is replayed as ``user`` and ``speaker_b`` as ``assistant``.
    """
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return [_locomo_conversation(item, questions) for item in raw[:conversations]]


def _locomo_conversation(item: dict[str, Any], questions: int | None) -> Conversation:
    conv = item["conversation"]
    speakers = (conv["speaker_a"], conv["speaker_b"])
    roles = {speakers[0]: "user", speakers[1]: "assistant"}
    sample_id = item["sample_id"]
    qa = [_locomo_question(f"{sample_id}:{i}", q) for i, q in enumerate(item["qa"])]
    return Conversation(sample_id, _locomo_sessions(conv, roles), qa[:questions], speakers)


def _locomo_sessions(conv: dict[str, Any], roles: dict[str, str]) -> list[HistorySession]:
    # Keys are "session_<n>" and "session_<n>_date_time"; sort by n, as "session_10" < "session_2".
    numbers = sorted(int(m.group(1)) for key in conv if (m := _SESSION_KEY.fullmatch(key)))
    sessions = []
    for n in numbers:
        turns = [_locomo_turn(turn, roles) for turn in conv[f"session_{n}"]]
        # An empty session would carry its date on no message, so it is dropped.
        if turns:
            sessions.append(HistorySession(conv.get(f"session_{n}_date_time", ""), turns, f"session_{n}"))
    return sessions


def _locomo_turn(turn: dict[str, Any], roles: dict[str, str]) -> Turn:
    speaker = turn["speaker"]
    if speaker not in roles:
        raise ValueError(f"turn {turn.get('dia_id')} is spoken by {speaker!r}, not one of {list(roles)}")
    text = turn.get("text", "").strip()  # some texts carry stray leading/trailing spaces
    # The image itself is not in the data; its caption is what a text model can be told.
    if turn.get("blip_caption"):
        text = f"{text} [shares a photo: {turn['blip_caption']}]".lstrip()
    return Turn(speaker, roles[speaker], text, turn_id=turn.get("dia_id"))


def _locomo_question(qid: str, q: dict[str, Any]) -> Question:
    category = int(q["category"])
    adversarial = category == 5
    # Category 5 has no real answer (scoring looks for a refusal); its adversarial_answer, the trap a
    # careless model falls into, is kept as the reference text.
    gold = q.get("adversarial_answer", q.get("answer")) if adversarial else q["answer"]
    return Question(
        qid=qid,
        question=q["question"],
        answer=str(gold),
        category=category,
        evidence=tuple(q.get("evidence", ())),
        is_adversarial=adversarial,
        is_abstention=adversarial,
    )


# --- LongMemEval ---


def is_abstention_id(question_id: str) -> bool:
    """LongMemEval marks unanswerable questions by an id ending in ``_abs``."""
    return question_id.endswith("_abs")


def load_longmemeval(
    path: str | Path, conversations: int | None = None, question_types: Collection[str] | None = None
) -> list[Conversation]:
    """Load a LongMemEval file (``longmemeval_s.json``, ``_m``, ``_oracle``): one conversation per instance.

    ``question_types`` keeps only those types; ``conversations`` then keeps the first N instances.
    Sessions keep the file's (chronological) order and turns keep their own roles.
    """
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    wanted = [item for item in raw if question_types is None or item["question_type"] in question_types]
    return [_longmemeval_conversation(item) for item in wanted[:conversations]]


def _longmemeval_conversation(item: dict[str, Any]) -> Conversation:
    qid = item["question_id"]
    sessions = [
        HistorySession(date, [_longmemeval_turn(turn) for turn in turns], str(session_id))
        for session_id, date, turns in zip(
            item["haystack_session_ids"], item["haystack_dates"], item["haystack_sessions"], strict=True
        )
    ]
    question = Question(
        qid=qid,
        question=item["question"],
        answer=str(item["answer"]),
        category=item["question_type"],
        evidence=tuple(str(s) for s in item.get("answer_session_ids", ())),
        is_abstention=is_abstention_id(qid),
        question_date=item.get("question_date"),
    )
    return Conversation(qid, sessions, [question], ("user", "assistant"))


def _longmemeval_turn(turn: dict[str, Any]) -> Turn:
    role = turn["role"]
    return Turn(role, role, turn["content"], has_answer=bool(turn.get("has_answer", False)))
