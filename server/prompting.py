"""The working context: the client's system text, the session's memory, and the newest turns that fit.

A stateless request is rendered exactly as the model's chat template renders the messages it was
sent (what `vllm serve` does): no system text is injected. A session adds its memory (the summary)
as a system message only when it has one; a template without a system role gets it at the start of
the first user turn (`adapters.supervision.render_chat_ids` decides).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adapters.supervision import render_chat_ids, template_default_system

Message = dict[str, str]
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


def fit_turns(tokenizer: Any, system: str | None, turns: Sequence[Message], budget: int) -> tuple[list[int], int]:
    """Prompt ids holding the system text (if any) and as many of the newest turns as fit `budget` tokens.

    Returns (ids, number of turns kept). The newest turn is always kept: if even it does not fit,
    the caller's length check reports the overflow rather than silently dropping the question.
    """
    head: list[Message] = [{"role": "system", "content": system}] if system else []
    estimate = [len(tokenizer.encode(t["content"], add_special_tokens=False)) + _PER_MESSAGE_OVERHEAD for t in turns]
    used = len(tokenizer.encode(system, add_special_tokens=False)) + _PER_MESSAGE_OVERHEAD if system else 0
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
