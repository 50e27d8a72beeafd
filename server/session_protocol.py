"""Pydantic models of TMEM's session API (/v1/sessions/...): ingest, teach, flush, memories, info.

The chat completion protocol, and the request base both share, are in :mod:`tmem.server.protocol`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tmem.server.protocol import ChatMessage, RequestModel


class SessionMessagesRequest(RequestModel):
    """Messages to add to a session's history (and learn from) without generating a reply."""

    messages: list[ChatMessage] = Field(min_length=1)


# A taught pair is one fact: a question and its answer, each a sentence or a short paragraph at most.
MAX_TEACH_INSTRUCTION_CHARS = 1000
MAX_TEACH_OUTPUT_CHARS = 2000


class QAPairIn(RequestModel):
    """A question-answer pair to teach a session directly."""

    instruction: str = Field(max_length=MAX_TEACH_INSTRUCTION_CHARS)
    output: str = Field(max_length=MAX_TEACH_OUTPUT_CHARS)

    @field_validator("instruction", "output")
    @classmethod
    def _not_blank(cls, text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty")
        return text


class TeachRequest(RequestModel):
    """Pairs to train into a session's adapter."""

    pairs: list[QAPairIn] = Field(min_length=1)


class FlushRequest(RequestModel):
    """Wait until a session's pending updates are live; ``timeout`` in seconds, server default if unset."""

    timeout: float | None = Field(None, gt=0, le=600)


class SessionInfo(BaseModel):
    """State of one session."""

    id: str
    object: Literal["session"] = "session"
    adapter_version: int
    turns: int
    summary: str
    pending_updates: int
    created_at: int
    # Why the last update was rejected (e.g. a NaN loss); cleared by the next committed update.
    last_error: str | None = None
    # What the last committed update did: chunks, pairs extracted and kept, raw-text fallback, summary.
    last_update: dict[str, Any] | None = None


class Memory(BaseModel):
    """One pair a session learned from, and the adapter version it went into."""

    instruction: str
    output: str
    source: Literal["taught", "extracted"]
    version: int


class MemoryList(BaseModel):
    """The pairs a session learned from, oldest first; a newer answer to the same question replaces an older one."""

    object: Literal["list"] = "list"
    data: list[Memory]


class FlushResponse(BaseModel):
    """Answer of a flush: the adapter version now live."""

    id: str
    object: Literal["session.flush"] = "session.flush"
    adapter_version: int


class DeleteResponse(BaseModel):
    """Answer of a session delete."""

    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True
