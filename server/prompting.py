"""The working context: the client's system text, the session's memory, and the newest turns that fit.

A stateless request is rendered exactly as the model's chat template renders the messages it was
sent (what `vllm serve` does): no system text is injected. A session adds its memory (the summary)
as a system message only when it has one; a template without a system role gets it at the start of
the first user turn (`tmem.adapters.supervision.render_chat_ids` decides).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tmem.adapters.supervision import render_chat_ids, template_default_system

Message = dict[str, str]
# A stored turn: role and content, and since issue 12 `tokens`, its content's token count.
StoredMessage = dict[str, Any]
# Role markers and separators a chat template adds per message; a safe over-estimate.
_PER_MESSAGE_OVERHEAD = 8
MEMORY_HEADER = "What you remember from earlier in this conversation:"


def system_text(system_prompt: str | None, summary: str, template_default: str | None = None) -> str | None:
    """The system message of a request: the client's (or operator's) system text plus the memory, if any.

    When the memory is added to a request without system text, the template's own default system
    text (SmolLM2's "You are a helpful AI assistant named SmolLM...") is kept in front of it: a small
    model answers far worse once the only system text it knows is replaced by an unfamiliar one.
    """
    memory = f"{MEMORY_HEADER}\n{summary.strip()}" if summary.strip() else ""
    base = (system_prompt or "").strip() or (template_default if memory else "") or ""
    text = "\n\n".join(part for part in (base, memory) if part)
    return text or None


def session_system(tokenizer: Any, system_prompt: str | None, summary: str) -> str | None:
    """The system message a session's request is served with (and its pairs are trained under)."""
    return system_text(system_prompt, summary, template_default_system(tokenizer))


def render_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation with the assistant's generation prompt appended."""
    return render_chat_ids(tokenizer, messages, add_generation_prompt=True)


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of a message's content alone: what a stored turn's `tokens` field holds."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def with_token_counts(tokenizer: Any, messages: Sequence[StoredMessage]) -> list[StoredMessage]:
    """The messages with their `tokens` field, counted only where missing (turns stored before it existed).

    Tokenizes: call it off the event loop when any count is missing.
    """
    return [m if has_token_count(m) else {**m, "tokens": count_tokens(tokenizer, m["content"])} for m in messages]


def has_token_count(message: StoredMessage) -> bool:
    return isinstance(message.get("tokens"), int)


class TailFit:
    """Which of the newest turns fit a token budget, walked newest first: the one rule of the estimate.

    Each turn costs its stored token count plus the template's per-message overhead. The newest turn is
    always taken; the walk stops for good at the first turn that does not fit, so the kept turns are
    always a suffix of the conversation. `fit_turns` and the chat's paged history reader both walk with it.
    """

    def __init__(self, system_count: int | None, budget: int) -> None:
        self.used = system_count + _PER_MESSAGE_OVERHEAD if system_count is not None else 0
        self.budget = budget
        self.kept = 0
        self.full = False

    def take(self, turns_newest_first: Iterable[StoredMessage]) -> bool:
        """Take turns while they fit; False once one did not (that one and all older ones are left out)."""
        if self.full:
            return False
        for turn in turns_newest_first:
            cost = int(turn["tokens"]) + _PER_MESSAGE_OVERHEAD
            if self.kept > 0 and self.used + cost > self.budget:
                self.full = True
                return False
            self.used += cost
            self.kept += 1
        return True


def system_tokens(tokenizer: Any, system: str | None) -> int | None:
    """Tokens of the system text, None without one (TailFit then charges nothing for it)."""
    return count_tokens(tokenizer, system) if system else None


def fit_turns(tokenizer: Any, system: str | None, turns: Sequence[StoredMessage],
              budget: int) -> tuple[list[int], int]:
    """Prompt ids holding the system text (if any) and as many of the newest turns as fit `budget` tokens.

    Returns (ids, number of turns kept). The newest turn is always kept: if even it does not fit,
    the caller's length check reports the overflow rather than silently dropping the question.
    Stored `tokens` counts are used where present. Tokenizes: call it off the event loop.
    """
    counted = with_token_counts(tokenizer, turns)
    fit = TailFit(system_tokens(tokenizer, system), budget)
    fit.take(reversed(counted))
    kept = list(turns[len(turns) - fit.kept :])
    return render_fitting(tokenizer, system, kept, budget)


def render_fitting(tokenizer: Any, system: str | None, kept: Sequence[StoredMessage],
                   budget: int) -> tuple[list[int], int]:
    """Render the system text and the turns a TailFit kept; drop the oldest while the exact ids exceed `budget`.

    Returns (ids, number of turns kept). Tokenizes: call it off the event loop.
    """
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    turns: list[Message] = [{"role": m["role"], "content": m["content"]} for m in kept]  # no `tokens` field
    ids = render_ids(tokenizer, head + turns)
    while len(ids) > budget and len(turns) > 1:  # the estimate was low: trim exactly
        turns = turns[1:]
        ids = render_ids(tokenizer, head + turns)
    return ids, len(turns)


def new_suffix(stored: Sequence[Message], sent: Sequence[Message]) -> list[Message]:
    """What a request adds to the stored history.

    A plain OpenAI client resends the whole conversation: when the stored history is a prefix of
    what was sent, only the rest is new. Otherwise everything sent is new.
    """
    sent = list(sent)
    if stored and len(sent) > len(stored) and all(_same(a, b) for a, b in zip(stored, sent, strict=False)):
        return sent[len(stored) :]
    return sent


def _same(a: Message, b: Message) -> bool:
    return a.get("role") == b.get("role") and a.get("content", "").strip() == b.get("content", "").strip()
