"""The working context, case by case: which messages of a request are new, which turns fit the budget, and
the system message that carries the memory.

test_prompting checks the window against the algorithm as it was at 71800ce over random conversations;
these tables pin each rule to numbers worked out by hand, so a rule changed on both sides still fails.
FakeTokenizer: one token per word, and its template adds `overhead` marker tokens per message
("<|role|>" and overhead - 1 separators) and one "<|assistant|>" for the generation prompt.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakes import FakeTokenizer

from tmem.server.prompting import MEMORY_HEADER, fit_turns, new_suffix, render_ids, system_text

Message = dict[str, Any]


def msg(role: str, content: str, **extra: Any) -> Message:
    return {"role": role, "content": content, **extra}


U1, A1, U2, A2 = (msg("user", "My name is Ana."), msg("assistant", "Hello Ana!"),
                  msg("user", "What is my name?"), msg("assistant", "Ana."))

# (stored history, messages the request sent, the messages that are new)
SUFFIX_CASES: dict[str, tuple[list[Message], list[Message], list[Message]]] = {
    "a session's first request": ([], [U1], [U1]),
    "only the new question sent": ([U1, A1], [U2], [U2]),
    "whole conversation resent with a question": ([U1, A1], [U1, A1, U2], [U2]),
    "resent with two new messages": ([U1], [U1, A1, U2], [A1, U2]),
    "resent with spaces around the contents": ([U1, A1], [msg("user", "  My name is Ana.\n"),
                                                          msg("assistant", "Hello Ana! "), U2], [U2]),
    "stored turns carry their token counts": ([{**U1, "tokens": 4}, {**A1, "tokens": 2}], [U1, A1, U2], [U2]),
    "an earlier message edited: all of it is new": ([U1, A1], [msg("user", "My name is Bo."), A1, U2],
                                                    [msg("user", "My name is Bo."), A1, U2]),
    "spacing inside a content differs: new": ([U1, A1], [msg("user", "My name  is Ana."), A1, U2],
                                              [msg("user", "My name  is Ana."), A1, U2]),
    "the same text under another role: new": ([U1, A1], [U1, msg("user", "Hello Ana!"), U2],
                                              [U1, msg("user", "Hello Ana!"), U2]),
    "the stored history itself, nothing after it: new": ([U1, A1], [U1, A1], [U1, A1]),
    "fewer messages than stored: new": ([U1, A1, U2, A2], [U1, A1, msg("user", "Where?")],
                                        [U1, A1, msg("user", "Where?")]),
}


@pytest.mark.parametrize("case", list(SUFFIX_CASES))
def test_which_messages_of_a_request_are_new(case: str) -> None:
    stored, sent, new = SUFFIX_CASES[case]
    before = [dict(m) for m in sent]
    assert new_suffix(stored, sent) == new
    assert sent == before  # the request's messages are not changed


def turn(i: int, words: int = 3) -> Message:
    """The i-th turn of a conversation, `words` tokens long (words distinct per turn)."""
    return msg("user" if i % 2 == 0 else "assistant", " ".join(f"t{i}w{j}" for j in range(words)))


SIX = [turn(i) for i in range(6)]
# (template overhead, system text, turns, budget, turns kept). The estimate prices a turn at its tokens + 8
# and the system text the same way; the newest turn is always kept, and the walk stops at the first misfit.
FIT_CASES: dict[str, tuple[int, str | None, list[Message], int, int]] = {
    "everything fits": (2, None, SIX, 10_000, 6),
    "two turns of 11 fit 30, three do not": (2, None, SIX, 30, 2),
    "the system text's 10 leaves room for one": (2, "be brief", SIX, 30, 1),
    "a budget below one turn keeps the newest": (2, None, SIX, 5, 1),
    "an older small turn is not taken after a misfit": (2, None, [turn(0, 1), turn(1, 40), turn(2, 1)], 30, 1),
    # 17 rendered tokens a message against 11 estimated: the estimate keeps 5 (55 <= 60), the exact
    # render of 5 (86 tokens) and 4 (69) is over, 3 turns (52) fit.
    "the estimate is low: trimmed on the exact render": (14, None, SIX, 60, 3),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_which_turns_fit_the_budget(case: str) -> None:
    overhead, system, turns, budget, kept = FIT_CASES[case]
    tokenizer = FakeTokenizer(overhead)
    ids, n = fit_turns(tokenizer, system, turns, budget)
    head = [msg("system", system)] if system else []
    assert n == kept
    assert ids == render_ids(tokenizer, head + turns[len(turns) - kept :])  # the newest `kept` turns, in order
    assert len(ids) <= budget or kept == 1  # over budget only when the newest turn alone is


DEFAULT = "You are a helpful assistant."
# (client's system text, memory summary, template's default system text, the system message)
SYSTEM_CASES: dict[str, tuple[str | None, str, str | None, str | None]] = {
    "stateless: nothing injected": (None, "", DEFAULT, None),
    "the client's own, without memory": ("Be brief.", "", DEFAULT, "Be brief."),
    "a blank memory is no memory": (None, " \n ", DEFAULT, None),
    "spaces around both are dropped": ("  Be brief.\n", "\n- cat: Miso  ", DEFAULT,
                                       f"Be brief.\n\n{MEMORY_HEADER}\n- cat: Miso"),
    "a blank client text gives way to the template's": ("   ", "- cat: Miso", DEFAULT,
                                                        f"{DEFAULT}\n\n{MEMORY_HEADER}\n- cat: Miso"),
}


@pytest.mark.parametrize("case", list(SYSTEM_CASES))
def test_the_system_message_and_the_memory_in_it(case: str) -> None:
    client, summary, default, expected = SYSTEM_CASES[case]
    assert system_text(client, summary, default) == expected
