"""Extraction replies → pairs: the tolerant parsers for what the model wrote (prompts: `memory_prompts`).

The worker sends the extraction messages through the engine and hands the raw reply to `parse_pairs`. That
parser never raises: a malformed reply should cost one update its supervision, not crash the worker.
It knows nothing of torch, HTTP, Redis or vLLM.
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from pydantic import BaseModel, ConfigDict, Field


class QAPair(BaseModel):
    """One supervision pair: the question becomes the user turn, the answer the assistant turn."""

    # strict: a number must be turned into text on purpose (parse_pairs does), not by accident.
    model_config = ConfigDict(frozen=True, str_strip_whitespace=True, strict=True)

    instruction: str = Field(min_length=1)
    output: str = Field(min_length=1)


@dataclass(frozen=True)
class ExtractionLimits:
    """Bounds on what `parse_pairs` accepts from one model reply."""

    max_pairs: int = 64
    max_instruction_chars: int = 500
    max_output_chars: int = 1000
    max_raw_chars: int = 200_000  # a longer reply is cut to this before parsing


@dataclass
class ParseReport:
    """What `parse_pairs` made of a reply: the usable pairs, how many items it dropped, and why."""

    pairs: list[QAPair] = field(default_factory=list)
    dropped: int = 0
    problems: list[str] = field(default_factory=list)
    found: bool = False  # a JSON array (or an object standing in for one) was found

    @property
    def ok(self) -> bool:
        """True when the reply held an array of pairs, even an empty one."""
        return self.found


def normalize_question(text: str) -> str:
    """The key two questions share when they ask the same thing: casefolded, one space, no end punctuation."""
    collapsed = " ".join(text.casefold().split())
    end = len(collapsed)
    while end and unicodedata.category(collapsed[end - 1]).startswith("P"):
        end -= 1
    return collapsed[:end].rstrip()


# Case-insensitive key names, in order of preference, that models use for the two fields.
_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "question", "q", "prompt", "input"),
    "output": ("output", "answer", "a", "response", "completion"),
}
_WRAPPER_KEYS = ("pairs", "qa", "qa_pairs", "items", "data", "results")
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL | re.IGNORECASE)  # reasoning models
_FENCE = re.compile(r"```[\w+-]*")
_TRAILING_COMMA = re.compile(r",(\s*[\]}])")
_SMART_QUOTES = str.maketrans({"“": '"', "”": '"', "„": '"', "‟": '"', "‘": "'", "’": "'", "‚": "'"})
_SPACE = re.compile(r"\s*")
_MAX_STARTS = 32  # bracket positions tried per variant: bounds the work on bracket-heavy prose
_DECODER = json.JSONDecoder()
_DECODE_ERRORS = (ValueError, RecursionError)  # RecursionError: absurdly deep nesting
_LITERAL_ERRORS = (ValueError, TypeError, SyntaxError, MemoryError, RecursionError)

_Found: TypeAlias = tuple[list[Any], str | None]  # items, and a note for the report


def parse_pairs(raw: str, known: Sequence[QAPair] = (), limits: ExtractionLimits = ExtractionLimits()) -> ParseReport:
    """Turn a model reply into clean, deduplicated pairs; never raises on any string."""
    report = ParseReport()
    text = raw if isinstance(raw, str) else ""  # a failed generation may hand us None
    if len(text) > limits.max_raw_chars:
        text = text[: limits.max_raw_chars]
        report.problems.append(f"reply cut to its first {limits.max_raw_chars} characters")
    found = _locate(_variants(text))
    if found is None:
        report.problems.append("no JSON array found")
        return report
    items, note = found
    report.found = True
    if note:
        report.problems.append(note)
    _collect(items, known, limits, report)
    return report


def _variants(text: str) -> list[str]:
    """The reply as written, then repaired (they can corrupt valid strings); fences hold no brackets."""
    plain = _THINK.sub("", text)
    repaired = _TRAILING_COMMA.sub(r"\1", plain.translate(_SMART_QUOTES))
    return [plain] if repaired == plain else [plain, repaired]


def _locate(variants: list[str]) -> _Found | None:
    """The first candidate holding at least one object; else the first candidate at all."""
    fallback: _Found | None = None
    for value, note in _candidates(variants):
        items = _items_from(value)
        if items is None:
            continue
        if any(isinstance(item, dict) for item in items):
            return items, note
        fallback = fallback or (items, note)
    return fallback


def _candidates(variants: list[str]) -> Iterator[tuple[Any, str | None]]:
    """Decoded values in order of trust: whole arrays, cut-off arrays, then lone objects.

    Arrays go before objects because the objects inside a broken array decode on their own.
    """
    yield from _arrays(variants, closed=True)
    yield from _literals(variants, "[", "]")
    yield from _arrays(variants, closed=False)
    for text in variants:
        for start in _starts(text, "{"):
            try:
                yield _DECODER.raw_decode(text, start)[0], None
            except _DECODE_ERRORS:
                continue
    yield from _literals(variants, "{", "}")


def _arrays(variants: list[str], closed: bool) -> Iterator[tuple[list[Any], str | None]]:
    """The arrays starting at each `[`: whole ones, or else the complete head of cut-off ones."""
    for text in variants:
        for start in _starts(text, "["):
            items, complete = _walk_array(text, start)
            if closed and complete:
                yield items, None
            elif not closed and items and not complete:
                yield items, f"array was cut off: kept its {len(items)} complete items"


def _starts(text: str, char: str) -> Iterator[int]:
    """The first `_MAX_STARTS` positions of `char` in `text`."""
    start = text.find(char)
    for _ in range(_MAX_STARTS):
        if start < 0:
            return
        yield start
        start = text.find(char, start + 1)


def _walk_array(text: str, start: int) -> tuple[list[Any], bool]:
    """The elements of the array at `start`, and whether its `]` was reached (a trailing comma is fine).

    Element by element, so that a cut-off array still yields its complete head.
    """
    items: list[Any] = []
    pos = start + 1
    while True:
        pos = _skip_space(text, pos)
        if text.startswith("]", pos):
            return items, True
        try:
            item, pos = _DECODER.raw_decode(text, pos)
        except _DECODE_ERRORS:
            return items, False
        items.append(item)
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            return items, False


def _skip_space(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not whitespace."""
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def _literals(variants: list[str], opening: str, closing: str) -> Iterator[tuple[Any, str]]:
    """Python-literal readings (single quotes, True/None) of the widest bracketed span."""
    for text in variants:
        start, end = text.find(opening), text.rfind(closing)
        if not 0 <= start < end:
            continue
        try:  # literal_eval evaluates no code; it only builds containers and constants
            with warnings.catch_warnings():  # e.g. invalid escape sequences in model text
                warnings.simplefilter("ignore")
                value = ast.literal_eval(text[start : end + 1])
        except _LITERAL_ERRORS:
            continue
        yield value, "read as a Python literal, not JSON"


def _items_from(value: Any, depth: int = 0) -> list[Any] | None:
    """The list of would-be pairs in `value`: the array itself, a lone pair, or a wrapped array."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, dict) or depth > 2:
        return None
    if _pair_fields(value):
        return [value]
    wrapped = sorted(value.items(), key=lambda kv: str(kv[0]).casefold() not in _WRAPPER_KEYS)
    for _, inner in wrapped:
        items = _items_from(inner, depth + 1)
        if items is not None:
            return items
    return None


def _collect(items: list[Any], known: Sequence[QAPair], limits: ExtractionLimits, report: ParseReport) -> None:
    """Validate items in order into `report`, dropping bad, duplicate and surplus ones."""
    known_keys = {normalize_question(pair.instruction) for pair in known}
    seen: set[str] = set()
    for index, item in enumerate(items, start=1):
        if len(report.pairs) >= limits.max_pairs:
            surplus = len(items) - index + 1
            report.dropped += surplus
            report.problems.append(f"kept the first {limits.max_pairs} pairs: dropped {surplus} more items")
            return
        pair, problem = _to_pair(item, limits)
        key = normalize_question(pair.instruction) if pair else ""
        if pair is not None and key in known_keys:
            pair, problem = None, "repeats a known pair"
        elif pair is not None and key in seen:
            pair, problem = None, "repeats an earlier item"
        if pair is None:
            report.dropped += 1
            report.problems.append(f"item {index}: {problem}")
        else:
            seen.add(key)
            report.pairs.append(pair)


def _to_pair(item: Any, limits: ExtractionLimits) -> tuple[QAPair | None, str]:
    """One item as a pair, or None and the reason it is unusable."""
    if not isinstance(item, dict):
        return None, "not an object"
    fields = _pair_fields(item)
    texts: dict[str, str] = {}
    for name, limit in (("instruction", limits.max_instruction_chars), ("output", limits.max_output_chars)):
        if name not in fields:
            return None, f"missing {name!r}"
        text = _as_text(fields[name])
        if text is None:
            return None, f"{name!r} is not text"
        if not text:
            return None, f"empty {name!r}"
        if len(text) > limit:
            # Dropped, not cut: a cut answer would teach the model a wrong fact.
            return None, f"{name!r} longer than {limit} characters"
        texts[name] = text
    if not normalize_question(texts["instruction"]):
        return None, "'instruction' is only punctuation"
    return QAPair(instruction=texts["instruction"], output=texts["output"]), ""


def _pair_fields(item: dict[Any, Any]) -> dict[str, Any]:
    """The instruction and output values of `item`, found under any alias, in any case."""
    lowered = {str(key).strip().casefold(): value for key, value in item.items()}
    fields: dict[str, Any] = {}
    for name, aliases in _ALIASES.items():
        for alias in aliases:
            if alias in lowered:
                fields[name] = lowered[alias]
                break
    return fields


def _as_text(value: Any) -> str | None:
    """Stripped text for a scalar or a list of scalars; None for objects, null and NaN."""
    if isinstance(value, (list, tuple)):
        parts = [_scalar_text(part) for part in value]
        if any(part is None for part in parts):
            return None
        return ", ".join(part for part in parts if part)
    return _scalar_text(value)


def _scalar_text(value: Any) -> str | None:
    """Stripped text for a string, number or bool; None for anything else."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):  # before int: bool is an int; "yes" reads as an answer, "True" does not
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return None


_SUMMARY_LABEL = re.compile(
    r"^[\s*#_>]*(?:(?:updated|new|revised|rewritten|running|current)\s+)?"
    r"(?:summary|memory)(?:\s+(?:memory|summary))?[*_]*\s*(?::|\n)[*_]*\s*",
    re.IGNORECASE,
)
_QUOTE_PAIRS = {'"': '"', "'": "'", "“": "”", "‘": "’"}


def parse_summary(raw: str, max_chars: int = 4000) -> str:
    """The summary text in a model reply, without fences, a "Summary:" label or wrapping quotes."""
    text = _FENCE.sub("", _THINK.sub("", raw if isinstance(raw, str) else "")).strip()
    text = _SUMMARY_LABEL.sub("", text, count=1).strip()
    if len(text) >= 2 and _QUOTE_PAIRS.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        # End on a word boundary unless that would throw away most of the text.
        text = (cut[:space] if space > max_chars // 2 else cut).rstrip()
    return text
