"""Which extracted pairs may be learned: grounded in the source text, not echoes of the prompt, not repeats.

A weak model's extraction reply parses (structured output sees to that) but can still be wrong: it
copies the worked example, writes placeholder text, or answers from outside knowledge. Training on
such a pair teaches the session a falsehood, so every pair passes `filter_pairs` first: an answer's
content words must all appear in what the text says, not only in its speaker labels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tmem.adapters.extraction import QAPair, normalize_question

# Words that carry no fact: an answer made only of these says nothing the text must contain.
_STOPWORDS = frozenset(
    "a an the and or but of to in on at by for with from as is are was were be been being am do does did "
    "i me my mine you your yours he him his she her hers it its we us our they them their this that these those "
    "there here what who whom which when where why how not no yes so very just also too than then".split()
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Text of the prompts themselves: a pair holding it was copied from the instructions, not the conversation.
_PLACEHOLDERS = ("<question>", "<answer>", "instruction", "output", "json", "<<<", ">>>")
# One label candidate at the start of a transcript line: one to four words and a colon ("Bob Smith: ").
_LABEL = re.compile(r"[ \t]*([^\W\d_][\w'.-]*(?:[ \t]+[\w'.-]+){0,3}):[ \t]+")


@dataclass
class FilterReport:
    """The pairs kept, and each dropped pair with the reason (the table tests and session info show)."""

    kept: list[QAPair] = field(default_factory=list)
    dropped: list[tuple[QAPair, str]] = field(default_factory=list)


def content_words(text: str) -> list[str]:
    """The casefolded words of `text` that can carry a fact (no stopwords)."""
    return [w for w in _WORD.findall(text.casefold()) if w not in _STOPWORDS]


# Words of a question that name no topic: "What is my favourite food?" is about food, not "favourite".
_GENERIC = frozenset("name called favourite favorite kind type thing things like likes love best one ones "
                     "many much long often old new".split())


def _stem(word: str) -> str:
    """A light suffix fold, enough to match "tulips"/"tulip", "ann's"/"ann" and "moved"/"move"."""
    for suffix in ("'s", "ing", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


def _stems(text: str) -> set[str]:
    return {_stem(w) for w in content_words(text)}


def grounded(answer: str, source: str) -> bool:
    """True when every content word of `answer` (at least one) appears in `source`."""
    words = content_words(answer)
    if not words:
        return False
    available = _stems(source)
    return all(_stem(w) in available for w in words)


def _is_label(words: Sequence[str], first: bool) -> bool:
    """A role ("user", one word, first on the line) or a speaker's name (every word capitalized).

    "user: I moved to Lisbon: it is sunny" keeps "I moved to Lisbon" as speech: a label is a name.
    """
    return (first and len(words) == 1) or all(w[0].isupper() for w in words)


def _split_line(line: str) -> tuple[list[str], str]:
    """The labels that open `line` ("user: Caroline: ..." → ["user", "Caroline"]) and what follows them."""
    labels: list[str] = []
    rest = line
    while (match := _LABEL.match(rest)) and _is_label(match.group(1).split(), first=not labels):
        labels.append(match.group(1))
        rest = rest[match.end():]
    return labels, rest


@dataclass(frozen=True)
class _Chunk:
    """A source text split once into what was said and who said it (the stems of its line labels)."""

    text: str
    said: str
    speakers: frozenset[str]

    @classmethod
    def read(cls, source: str) -> _Chunk:
        lines = [_split_line(line) for line in source.split("\n")]
        speakers = frozenset(_stem(w) for labels, _ in lines for label in labels for w in content_words(label))
        return cls(source, "\n".join(rest for _, rest in lines), speakers)

    def only_speakers(self, answer: str) -> bool:
        """True when every content word of `answer` (at least one) is a speaker's name.

        Every chunk of a transcript names its speakers ("user: Caroline: I went ..."), and they name each
        other in what they say ("Hey Caroline!"), so a speaker's name is "in the text" of every chunk. On
        LoCoMo, SmolLM2-135M answered "Caroline" to most questions it extracted ("What's my job?", "What's
        my dream?"), the filter kept them, rehearsal replayed them, and the adapter began 20 of 20 answers
        with the speaker's name. A speaker's name alone is never learned; "a counselor" still is.
        """
        answer_stems = _stems(answer)
        return bool(answer_stems) and answer_stems <= self.speakers


def spoken(source: str) -> str:
    """`source` without its line labels: what the speakers said, not who said it."""
    return _Chunk.read(source).said


def on_topic(question: str, source: str) -> bool:
    """True when the question names something the source talks about (one topic word is enough).

    A weak model pairs a grounded answer with an unrelated question ("What is my favourite food?" →
    "Finnish" from "I started learning Finnish"); the question's topic words tell it apart.
    """
    topics = {_stem(w) for w in content_words(question) if w not in _GENERIC}
    return not topics or bool(topics & _stems(source))


def pair_key(pair: QAPair) -> tuple[str, str]:
    """The identity of a pair for deduplication: normalized question and answer."""
    return normalize_question(pair.instruction), normalize_question(pair.output)


# How many of a session's questions may share one answer. On LoCoMo, SmolLM2-135M gave "family" to
# question after question ("What's important to me?", "What keeps me going?"), each grounded in its
# chunk; rehearsal replayed them and the adapter answered "family" to 19 of 20 questions. Two still lets
# one place be where I live and where I was born.
MAX_QUESTIONS_PER_ANSWER = 2


def answer_key(pair: QAPair) -> frozenset[str]:
    """The answer's identity across phrasings: its content-word stems ("Family." = "my family")."""
    return frozenset(_stems(pair.output))


def filter_pairs(pairs: Iterable[QAPair], source: str, *, known: Sequence[QAPair] = (),
                 examples: Sequence[QAPair] = ()) -> FilterReport:
    """Keep the pairs that are grounded in `source`, not copied from the prompt, and not repeats."""
    report = FilterReport()
    chunk = _Chunk.read(source)
    seen = {pair_key(p) for p in known}
    copied = {pair_key(p) for p in examples}
    answers = Counter(answer_key(p) for p in known)
    for pair in pairs:
        reason = _rejection(pair, chunk, seen, copied, answers)
        if reason:
            report.dropped.append((pair, reason))
            continue
        seen.add(pair_key(pair))
        answers[answer_key(pair)] += 1
        report.kept.append(pair)
    return report


def _rejection(pair: QAPair, chunk: _Chunk, seen: set[tuple[str, str]], copied: set[tuple[str, str]],
               answers: Counter[frozenset[str]]) -> str | None:
    key = pair_key(pair)
    if key in copied:
        return "copies the worked example"
    text = f"{pair.instruction} {pair.output}".casefold()
    if any(marker in text for marker in _PLACEHOLDERS):
        return "placeholder or prompt text"
    if key in seen:
        return "duplicate"
    answer = _stems(pair.output)
    if answer and answer <= _stems(pair.instruction):
        return "answer repeats the question"
    if chunk.only_speakers(pair.output):
        return "only a speaker's name"
    if not grounded(pair.output, chunk.said):
        return "answer not in the text"
    if not on_topic(pair.instruction, chunk.text):
        return "question not about the text"
    if answers[answer_key(pair)] >= MAX_QUESTIONS_PER_ANSWER:
        return f"answer already learned for {MAX_QUESTIONS_PER_ANSWER} questions"
    return None
