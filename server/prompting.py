"""The working context: system text + summary memory + the newest turns that fit the token budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]
# Role markers and separators a chat template adds per message; a safe over-estimate.
_PER_MESSAGE_OVERHEAD = 8


def system_text(system_prompt: str, summary: str) -> str:
    if not summary.strip():
        return system_prompt
    return f"{system_prompt}\n\nWhat you remember from earlier in this conversation:\n{summary.strip()}"


def render_ids(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of the conversation with the assistant's generation prompt appended."""
    rendered = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(rendered, "keys"):
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]


def fit_turns(tokenizer: Any, system: str, turns: Sequence[Message], budget: int) -> tuple[list[int], int]:
    """Prompt ids holding the system text and as many of the newest turns as fit `budget` tokens.

    Returns (ids, number of turns kept). The newest turn is always kept: if even it does not fit,
    the caller's length check reports the overflow rather than silently dropping the question.
    """
    head: list[Message] = [{"role": "system", "content": system}]
    estimate = [len(tokenizer.encode(t["content"], add_special_tokens=False)) + _PER_MESSAGE_OVERHEAD for t in turns]
    used = len(tokenizer.encode(system, add_special_tokens=False)) + _PER_MESSAGE_OVERHEAD
    keep = 0
    for cost in reversed(estimate):
        if keep > 0 and used + cost > budget:
            break
        used += cost
        keep += 1
    kept = list(turns[len(turns) - keep :])
    ids = render_ids(tokenizer, head + kept)
    while len(ids) > budget and len(kept) > 1:  # the estimate was low: trim exactly
        kept = kept[1:]
        ids = render_ids(tokenizer, head + kept)
    return ids, len(kept)


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
