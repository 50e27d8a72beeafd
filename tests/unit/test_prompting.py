"""The working context's token budget: stored token counts price the turns, and the window is the old one.

A word-level fake tokenizer counts what it is asked to encode, so a test can tell a turn priced from its
stored `tokens` field from one tokenized again. `fit_turns_before` is the algorithm as it was at 71800ce
(every turn tokenized on each request): the windows chosen now must be identical to its.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import pytest
from fakes import FakeTokenizer

from tmem.server.prompting import (
    TailFit,
    fit_turns,
    render_fitting,
    render_ids,
    with_token_counts,
)

Message = dict[str, Any]


def fit_turns_before(tokenizer: Any, system: str | None, turns: Sequence[Message],
                     budget: int) -> tuple[list[int], int]:
    """tmem.server.prompting.fit_turns at 71800ce, verbatim but for names: the reference window."""
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    estimate = [len(tokenizer.encode(t["content"], add_special_tokens=False)) + 8 for t in turns]
    used = len(tokenizer.encode(system, add_special_tokens=False)) + 8 if system else 0
    keep = 0
    for cost in reversed(estimate):
        if keep > 0 and used + cost > budget:
            break
        used += cost
        keep += 1
    kept = [{"role": t["role"], "content": t["content"]} for t in turns[len(turns) - keep :]]
    ids = render_ids(tokenizer, head + kept)
    while len(ids) > budget and len(kept) > 1:
        kept = kept[1:]
        ids = render_ids(tokenizer, head + kept)
    return ids, len(kept)


def conversation(rng: random.Random, n: int) -> list[Message]:
    words = ["tea", "Lisbon", "harbour", "Sam", "walked", "likes", "the", "old", "friend", "on", "day"]
    return [{"role": "user" if i % 2 == 0 else "assistant",
             "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))} for i in range(n)]


@pytest.mark.parametrize("overhead", [2, 14])  # 14 > the estimate's 8 per message: the exact trim runs
@pytest.mark.parametrize("seed", range(6))
def test_the_window_is_the_one_chosen_before_with_or_without_stored_counts(seed: int, overhead: int) -> None:
    rng = random.Random(seed)
    tokenizer = FakeTokenizer(overhead)
    turns = conversation(rng, rng.randint(1, 120))
    system = rng.choice([None, "You are terse.", "What you remember: " + "fact " * rng.randint(1, 80)])
    budget = rng.choice([64, 200, 700, 5000])
    expected = fit_turns_before(tokenizer, system, turns, budget)
    counted = with_token_counts(tokenizer, turns)
    assert fit_turns(tokenizer, system, turns, budget) == expected  # counts computed on the spot
    assert fit_turns(tokenizer, system, counted, budget) == expected  # counts read from the turns
    legacy_mix = [m if i % 3 else turns[i] for i, m in enumerate(counted)]  # some turns stored before counts
    assert fit_turns(tokenizer, system, legacy_mix, budget) == expected


def test_stored_counts_are_not_tokenized_again() -> None:
    tokenizer = FakeTokenizer()
    counted = with_token_counts(tokenizer, conversation(random.Random(1), 300))
    assert tokenizer.encoded == 300
    assert [m["tokens"] for m in counted] == [len(m["content"].split()) for m in counted]
    tokenizer.encoded = 0
    fit_turns(tokenizer, "system text", counted, budget=400)
    assert tokenizer.encoded == 1  # the system text only; the 300 turns are priced from their counts


def test_counts_are_added_only_where_missing_and_the_input_is_not_changed() -> None:
    tokenizer = FakeTokenizer()
    stored = {"role": "user", "content": "one two three", "tokens": 3}
    legacy = {"role": "assistant", "content": "four five"}
    assert with_token_counts(tokenizer, [stored, legacy]) == [stored, {**legacy, "tokens": 2}]
    assert tokenizer.encoded == 1
    assert "tokens" not in legacy


def test_tail_fit_always_keeps_the_newest_turn_and_stops_for_good_at_the_first_misfit() -> None:
    fit = TailFit(system_count=None, budget=30)
    assert fit.take([{"tokens": 100}]) is True  # the newest turn, even over budget
    assert fit.kept == 1
    fit = TailFit(system_count=2, budget=40)  # 10 used by the system text
    assert fit.take([{"tokens": 2}, {"tokens": 30}, {"tokens": 1}]) is False  # 10+10 fits, +38 does not
    assert fit.kept == 1
    assert fit.take([{"tokens": 0}]) is False  # an older, smaller turn is never taken after a gap
    assert fit.kept == 1


def test_render_fitting_gives_the_template_role_and_content_only() -> None:
    tokenizer = FakeTokenizer()
    kept = [{"role": "user", "content": "hello there", "tokens": 2}]
    ids, n = render_fitting(tokenizer, None, kept, budget=100)
    assert n == 1
    assert ids == render_ids(tokenizer, [{"role": "user", "content": "hello there"}])
