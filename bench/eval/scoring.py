"""Answer scoring for LoCoMo and LongMemEval: token F1 / EM, per-category rules, LLM-judge prompts.

Standard library only, so the harness scores results without nltk or numpy.  The text rules follow
LoCoMo's own ``task_eval/evaluation.py``: lowercase, drop punctuation (commas included), drop the words
a/an/the/and, Porter-stem each word, then compare bags of tokens.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# --- Porter stemmer, NLTK_EXTENSIONS mode (NLTK's default, which LoCoMo's scorer uses).
# Differences from Porter (1980), all taken from NLTK: an irregular-forms table; words of <= 2 letters
# are left alone; 4-letter "-ies"/"-ied" keep "ie" (dies -> die); step 1c turns y into i only after a
# consonant that is not the first letter (happy -> happi, enjoy -> enjoy); "-alli" is reduced first and
# re-run through step 2; step 2 has "bli" -> "ble" instead of "abli" -> "able", plus "fulli" -> "ful"
# and "logi" -> "log"; the *o test also accepts a two-letter vowel-consonant stem.

_IRREGULAR = {
    "sky": "sky", "skies": "sky", "dying": "die", "lying": "lie", "tying": "tie", "news": "news",
    "innings": "inning", "inning": "inning", "outings": "outing", "outing": "outing",
    "cannings": "canning", "canning": "canning", "howe": "howe",
    "proceed": "proceed", "exceed": "exceed", "succeed": "succeed",
}  # fmt: skip
_STEP2 = (
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"), ("anci", "ance"), ("izer", "ize"),
    ("bli", "ble"), ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
    ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"), ("fulness", "ful"),
    ("ousness", "ous"), ("aliti", "al"), ("iviti", "ive"), ("biliti", "ble"), ("fulli", "ful"),
)  # fmt: skip
_STEP3 = (
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"), ("ical", "ic"), ("ful", ""),
    ("ness", ""),
)  # fmt: skip
_STEP4 = (
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou",
    "ism", "ate", "iti", "ous", "ive", "ize",
)  # fmt: skip


def _is_consonant(word: str, i: int) -> bool:
    if word[i] in "aeiou":
        return False
    # "y" is a vowel after a consonant (syzygy: s, z, g are the consonants).
    return word[i] != "y" or i == 0 or not _is_consonant(word, i - 1)


def _measure(stem: str) -> int:
    """Porter's m: the number of vowel-run/consonant-run pairs in ``stem``."""
    pattern = "".join("c" if _is_consonant(stem, i) else "v" for i in range(len(stem)))
    return pattern.count("vc")


def _has_vowel(stem: str) -> bool:
    return any(not _is_consonant(stem, i) for i in range(len(stem)))


def _ends_double_consonant(word: str) -> bool:
    return len(word) >= 2 and word[-1] == word[-2] and _is_consonant(word, len(word) - 1)


def _ends_cvc(word: str) -> bool:
    """Porter's *o: consonant-vowel-consonant, the last not w/x/y (hop, wil); NLTK adds a bare "vc"."""
    if len(word) == 2:
        return not _is_consonant(word, 0) and _is_consonant(word, 1)
    shape = [_is_consonant(word, len(word) - k) for k in (3, 2, 1)] if len(word) >= 3 else []
    return shape == [True, False, True] and word[-1] not in "wxy"


def _apply_first(word: str, rules: tuple[tuple[str, str], ...], min_measure: int) -> str:
    # Only the first matching suffix is tried: if its condition fails the word is left alone.
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[: -len(suffix)]
            return stem + replacement if _measure(stem) >= min_measure else word
    return word


def _step1a(word: str) -> str:
    if word.endswith("ies") and len(word) == 4:
        return word[:-1]
    return _apply_first(word, (("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")), 0)


def _step1b(word: str) -> str:
    if word.endswith("ied"):
        return word[:-1] if len(word) == 4 else word[:-2]
    if word.endswith("eed"):
        return word[:-1] if _measure(word[:-3]) > 0 else word
    for suffix in ("ed", "ing"):
        if word.endswith(suffix) and _has_vowel(word[: -len(suffix)]):
            return _step1b_repair(word[: -len(suffix)])
    return word


def _step1b_repair(stem: str) -> str:
    """Put back what stripping -ed/-ing took too far: conflat -> conflate, hopp -> hop, fil -> file."""
    if stem.endswith(("at", "bl", "iz")):
        return stem + "e"
    if _ends_double_consonant(stem):
        return stem if stem[-1] in "lsz" else stem[:-1]
    return stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem


def _step1c(word: str) -> str:
    if word.endswith("y") and len(word) > 2 and _is_consonant(word, len(word) - 2):
        return word[:-1] + "i"
    return word


def _step2(word: str) -> str:
    if word.endswith("alli"):
        return _step2(word[:-2]) if _measure(word[:-4]) > 0 else word
    if word.endswith("logi"):
        # The "l" counts towards the stem so that short stems (geo-, theo-) are reduced too.
        return word[:-1] if _measure(word[:-3]) > 0 else word
    return _apply_first(word, _STEP2, 1)


def _step4(word: str) -> str:
    for suffix in _STEP4:
        if word.endswith(suffix):
            stem = word[: -len(suffix)]
            ok = _measure(stem) > 1 and (suffix != "ion" or stem[-1] in "st")
            return stem if ok else word
    return word


def _step5(word: str) -> str:
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word


def porter_stem(word: str) -> str:
    """Stem one word as ``nltk.stem.PorterStemmer().stem`` does in its default mode."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    word = _step2(_step1c(_step1b(_step1a(word))))
    return _step5(_step4(_apply_first(word, _STEP3, 1)))


# --- Token F1 / EM and LoCoMo's per-category rules ---

_ARTICLES = re.compile(r"\b(a|an|the|and)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
ABSTENTION_PHRASES = ("no information available", "not mentioned")


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the words a/an/the/and, collapse whitespace."""
    # Punctuation goes before articles so that "the," and "(a)" are recognised as words.
    text = s.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(s: str) -> list[str]:
    """Normalized, Porter-stemmed words of ``s``."""
    return [porter_stem(word) for word in normalize_answer(s).split()]


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall over bags of stemmed tokens; 0.0 if none shared."""
    predicted, expected = tokens(prediction), tokens(gold)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when both sides have the same set of stemmed tokens (LoCoMo compares sets, so order and
    repeats do not matter), else 0.0."""
    return float(set(tokens(prediction)) == set(tokens(gold)))


def is_abstention(prediction: str) -> bool:
    """Whether the output declines to answer in one of the phrases LoCoMo's category 5 accepts."""
    lowered = prediction.lower()
    return any(phrase in lowered for phrase in ABSTENTION_PHRASES)


def _locomo_score(prediction: str, gold: str | int, category: str | int, metric: Callable[[str, str], float]) -> float:
    cat, answer = int(category), str(gold)
    if cat == 5:
        return float(is_abstention(prediction))
    if cat == 1:
        # Multi-hop golds list several facts; each gold part is credited by its best predicted part.
        predicted = [part.strip() for part in prediction.split(",")]
        parts = [part.strip() for part in answer.split(",")]
        return sum(max(metric(p, g) for p in predicted) for g in parts) / len(parts)
    if cat == 3:
        # Open-domain golds carry a rationale after ";" ("Likely no; she wants to be a counselor").
        answer = answer.split(";")[0].strip()
    if cat in (2, 3, 4):
        return metric(prediction, answer)
    raise ValueError(f"LoCoMo category must be 1..5, got {category!r}")


def locomo_f1(prediction: str, gold: str | int, category: str | int) -> float:
    """Token F1 under LoCoMo's rule for ``category`` (1 multi-hop ... 5 adversarial)."""
    return _locomo_score(prediction, gold, category, token_f1)


def locomo_em(prediction: str, gold: str | int, category: str | int) -> float:
    """Exact match under the same per-category rules as :func:`locomo_f1` (category 1: the share of
    gold parts matched exactly by some predicted part)."""
    return _locomo_score(prediction, gold, category, exact_match)


# --- Aggregation ---


@dataclass
class _Cell:
    """Running sums for one (mode, category); each metric keeps its own count, so a metric recorded
    for only some questions is averaged over those."""

    sums: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    n: int = 0

    def add(self, other: _Cell) -> None:
        self.sums.update(other.sums)
        self.counts.update(other.counts)
        self.n += other.n

    def means(self) -> dict[str, float]:
        return {name: self.sums[name] / count for name, count in self.counts.items()}


def _category_order(category: str) -> tuple[int, int, str]:
    # Numeric categories (LoCoMo's 1..5) sort as numbers, question types alphabetically after them.
    return (0, int(category), "") if category.isdigit() else (1, 0, category)


class ScoreTable:
    """Per-question scores averaged per (mode, category), with an overall (micro-averaged) row per mode."""

    def __init__(self) -> None:
        self._cells: dict[tuple[str, str], _Cell] = {}
        self._metrics: list[str] = []

    def add(self, mode: str, category: str | int, **scores: float) -> None:
        """Record one question's scores, e.g. ``add("tmem", 2, f1=0.5, em=0.0)``."""
        one = _Cell(Counter(scores), Counter(dict.fromkeys(scores, 1)), 1)
        self._cells.setdefault((mode, str(category)), _Cell()).add(one)
        self._metrics += [name for name in scores if name not in self._metrics]

    def add_locomo(self, mode: str, category: str | int, prediction: str, gold: str | int) -> None:
        """Score one LoCoMo answer (F1 and EM) and record it."""
        f1, em = locomo_f1(prediction, gold, category), locomo_em(prediction, gold, category)
        self.add(mode, category, f1=f1, em=em)

    def modes(self) -> list[str]:
        """Modes in the order they were first added."""
        return list(dict.fromkeys(mode for mode, _ in self._cells))

    def rows(self, mode: str) -> list[tuple[str, _Cell]]:
        """(category, cell) for ``mode``, numeric categories first, then ("all", every question pooled)."""
        categories = sorted((c for m, c in self._cells if m == mode), key=_category_order)
        pooled = _Cell()
        for category in categories:
            pooled.add(self._cells[(mode, category)])
        return [*((c, self._cells[(mode, c)]) for c in categories), ("all", pooled)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able counts and means: ``{"metrics": [...], "modes": {mode: {category|"all": {"n", ...}}}}``."""
        modes = {
            mode: {category: {"n": cell.n, **cell.means()} for category, cell in self.rows(mode)}
            for mode in self.modes()
        }
        return {"metrics": list(self._metrics), "modes": modes}

    def render(self) -> str:
        """A plain-text table: one line per (mode, category), then the mode's "all" line."""
        table = [["mode", "category", "n", *self._metrics]]
        for mode in self.modes():
            for category, cell in self.rows(mode):
                means = cell.means()
                scores = [f"{means[m]:.4f}" if m in means else "-" for m in self._metrics]
                table.append([mode, category, str(cell.n), *scores])
        return _format_table(table)


def _format_table(rows: list[list[str]], left: int = 2) -> str:
    """Pad columns to their widest cell: the first ``left`` (names) left-aligned, numbers right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in [rows[0], ["-" * w for w in widths], *rows[1:]]:
        cells = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


# --- LLM judge (LongMemEval's protocol: one yes/no prompt per question-type family) ---

# Wording from LongMemEval's src/evaluation/evaluate_qa.py (MIT licence), kept verbatim so that judge
# accuracies stay comparable with published numbers.
_JUDGE_INTRO = "I will give you a question, a correct answer, and a response from a model. "
_CONTAINS = (
    "Please answer yes if the response contains the correct answer. Otherwise, answer no. "
    "If the response is equivalent to the correct answer or contains all the intermediate steps to "
    "get the correct answer, you should also answer yes. If the response only contains a subset of "
    "the information required by the answer, answer no. "
)
_QA_TAIL = "\n\nQuestion: {}\n\nCorrect Answer: {}\n\nModel Response: {}\n\nIs the model response correct? "
_YES_NO = "Answer yes or no only."
_JUDGE_TEMPLATES = {
    "default": _JUDGE_INTRO + _CONTAINS + _QA_TAIL + _YES_NO,
    "temporal-reasoning": _JUDGE_INTRO + _CONTAINS + (
        "In addition, do not penalize off-by-one errors for the number of days. If the question asks "
        "for the number of days/weeks/months, etc., and the model makes off-by-one errors (e.g., "
        "predicting 19 days when the answer is 18), the model's response is still correct. "
    ) + _QA_TAIL + _YES_NO,
    "knowledge-update": _JUDGE_INTRO + (
        "Please answer yes if the response contains the correct answer. Otherwise, answer no. If the "
        "response contains some previous information along with an updated answer, the response should "
        "be considered as correct as long as the updated answer is the required answer."
    ) + _QA_TAIL + _YES_NO,
    "single-session-preference": (
        "I will give you a question, a rubric for desired personalized response, and a response from a "
        "model. Please answer yes if the response satisfies the desired response. Otherwise, answer no. "
        "The model does not need to reflect all the points in the rubric. The response is correct as "
        "long as it recalls and utilizes the user's personal information correctly."
        "\n\nQuestion: {}\n\nRubric: {}\n\nModel Response: {}\n\nIs the model response correct? " + _YES_NO
    ),
    "abstention": (
        "I will give you an unanswerable question, an explanation, and a response from a model. Please "
        "answer yes if the model correctly identifies the question as unanswerable. The model could say "
        "that the information is incomplete, or some other information is given but the asked "
        "information is not.\n\nQuestion: {}\n\nExplanation: {}\n\nModel Response: {}\n\n"
        "Does the model correctly identify the question as unanswerable? " + _YES_NO
    ),
}  # fmt: skip


def judge_messages(
    question: str, gold: str | int, prediction: str, question_type: str | int, abstention: bool = False
) -> list[dict[str, str]]:
    """Chat messages asking a judge model whether ``prediction`` answers ``question``.

    ``abstention`` (LongMemEval ids ending in ``_abs``) selects the "did it refuse?" prompt.  Question
    types other than LongMemEval's temporal/knowledge-update/preference families, LoCoMo categories
    included, get the plain "contains the correct answer" prompt.
    """
    key = "abstention" if abstention else str(question_type)
    template = _JUDGE_TEMPLATES.get(key, _JUDGE_TEMPLATES["default"])
    return [{"role": "user", "content": template.format(question, gold, prediction)}]


def parse_judge(text: str) -> bool:
    """Whether a judge's reply says yes.

    A leading yes/no decides; otherwise any whole word "yes" counts, as in LongMemEval's substring test
    but without its false positives ("eyes").
    """
    words = re.findall(r"[a-z]+", text.lower())
    if words and words[0] in ("yes", "no"):
        return words[0] == "yes"
    return "yes" in words
