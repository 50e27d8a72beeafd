"""The prompts that turn conversation text into memory: QA-pair extraction and the running summary.

Written for weak models first (a 135M model must follow them): few words of instruction, one short
worked example as a prior chat exchange (small models copy a demonstrated format far better than
they follow a described one), and a JSON schema whose array and strings are bounded, so structured
generation always closes the array inside the token budget. What works on a 135M model works on a
4B one. The summary reply is checked too: an empty summary, or one that echoes the prompt, is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tmem.adapters.extraction import QAPair


@dataclass(frozen=True)
class ExtractionFormat:
    """Bounds of one extraction reply: how many pairs, how long each question and answer may be."""

    max_pairs: int = 4
    max_question_chars: int = 80
    max_answer_chars: int = 48

    def schema(self) -> dict[str, Any]:
        """The JSON schema handed to structured generation: bounded array, bounded strings."""
        def text(limit: int) -> dict[str, Any]:
            return {"type": "string", "minLength": 1, "maxLength": limit}

        return {
            "type": "array",
            "maxItems": self.max_pairs,
            "items": {
                "type": "object",
                "properties": {"instruction": text(self.max_question_chars), "output": text(self.max_answer_chars)},
                "required": ["instruction", "output"],
                "additionalProperties": False,
            },
        }

    def token_budget(self, chars_per_token: float = 2.5) -> int:
        """Tokens that always cover a full reply (a deliberately low chars/token: JSON punctuation is dense)."""
        per_pair = (self.max_question_chars + self.max_answer_chars + len('{"instruction":"","output":""},'))
        return int(self.max_pairs * per_pair / chars_per_token) + 8


# The worked examples: chat turns and the pairs they yield. Questions are asked the way the user will
# later ask them ("my"), answers are the shortest words of the text that answer them. Two examples,
# measured on SmolLM2-135M over 20 one-fact turns: the fact's pair survived the grounding filter for
# 8/20 turns with the first example alone, 14/20 with both.
EXAMPLES: tuple[tuple[str, tuple[QAPair, ...]], ...] = (
    ("user: Hi, I'm Dana. I moved to Berlin in May and I work as a nurse.",
     (QAPair(instruction="What is my name?", output="Dana"),
      QAPair(instruction="Where did I move in May?", output="Berlin"),
      QAPair(instruction="What is my job?", output="nurse"))),
    ("user: My brother Tom gave me a red bike for my birthday.",
     (QAPair(instruction="Who is my brother?", output="Tom"),
      QAPair(instruction="What did Tom give me?", output="a red bike"))),
)
EXAMPLE_PAIRS: tuple[QAPair, ...] = tuple(pair for _, pairs in EXAMPLES for pair in pairs)
_EXTRACTION_ASK = "Write questions and short answers about what this text says, as JSON."
_KNOWN_INTRO = "Already known (do not repeat):"
TEXT_OPEN, TEXT_CLOSE = "<<<", ">>>"


def pairs_json(pairs: Sequence[QAPair]) -> str:
    """Pairs as the compact JSON array the model is asked to write."""
    return json.dumps([{"instruction": p.instruction, "output": p.output} for p in pairs],
                      ensure_ascii=False, separators=(",", ":"))


def extraction_user_message(text: str, known: Sequence[QAPair] = ()) -> str:
    """The user turn asking for pairs about `text`, listing the pairs already known (if any)."""
    head = f"{_KNOWN_INTRO}\n{pairs_json(known)}\n\n" if known else ""
    return f"{head}Text:\n{TEXT_OPEN}\n{text}\n{TEXT_CLOSE}\n{_EXTRACTION_ASK}"


def build_extraction_messages(new_text: str, known_pairs: Sequence[QAPair] = (),
                              max_known: int = 8) -> list[dict[str, str]]:
    """The worked examples as prior exchanges, then the request for `new_text` (with the newest known pairs)."""
    known = list(known_pairs)[-max_known:] if max_known > 0 else []
    messages: list[dict[str, str]] = []
    for text, pairs in EXAMPLES:
        messages += [{"role": "user", "content": extraction_user_message(text)},
                     {"role": "assistant", "content": pairs_json(pairs)}]
    return [*messages, {"role": "user", "content": extraction_user_message(new_text, known)}]


# Second person → first person, word by word: the model asks "What is your job?", the user will ask
# "What is my job?". "you" closing a clause is an object ("give you?" → "give me?"); verb agreement
# after the swap is mended by the second table.
_POINT_OF_VIEW = {"your": "my", "yours": "mine", "yourself": "myself"}
_AGREEMENT = (("are I", "am I"), ("are me", "am I"), ("I are", "I am"), ("were I", "was I"), ("I were", "I was"))
_SECOND_PERSON = re.compile(r"\b(your|yours|yourself|you)\b(\s*[?.!,;]|\s*$)?", re.IGNORECASE)


def as_user_question(question: str) -> str:
    """The question as the user would ask it about themselves ("your" → "my", "you" → "I"/"me")."""
    def swap(match: re.Match[str]) -> str:
        word, tail = match.group(1).casefold(), match.group(2) or ""
        if word == "you":
            return ("me" if tail else "I") + tail
        return _POINT_OF_VIEW[word] + tail

    text = _SECOND_PERSON.sub(swap, question)
    for wrong, right in _AGREEMENT:
        text = re.sub(rf"\b{wrong}\b", right, text, flags=re.IGNORECASE)
    return text[:1].upper() + text[1:]


_SUMMARY_ASK = "Update the notes with the new text. Reply with the notes only, in at most {words} words."


def build_summary_messages(previous_summary: str, new_text: str, max_words: int = 80) -> list[dict[str, str]]:
    """Chat messages asking to fold `new_text` into the running notes about the user."""
    previous = previous_summary.strip() or "(none yet)"
    user = (f"Notes about the user:\n{previous}\n\nNew text:\n{TEXT_OPEN}\n{new_text}\n{TEXT_CLOSE}\n"
            + _SUMMARY_ASK.format(words=max_words))
    return [{"role": "user", "content": user}]


# Pieces of the prompts that a real summary never contains: their presence means an echo.
_ECHO_MARKERS = (TEXT_OPEN, TEXT_CLOSE, "New text:", "Notes about the user:", "(none yet)", _KNOWN_INTRO,
                 "Reply with the notes only", _EXTRACTION_ASK)


def summary_refusal(summary: str) -> str | None:
    """Why a parsed summary must not replace the previous one, or None when it may."""
    text = summary.strip()
    if not text:
        return "empty summary"
    if any(marker.casefold() in text.casefold() for marker in _ECHO_MARKERS):
        return "summary echoes the prompt"
    return None
