"""Response and request models of the TMEM API.

They mirror OpenAI's field names and accept fields they do not know, so a newer server does not
break an older client.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ChatChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatMessage",
    "ChunkChoice",
    "ChunkDelta",
    "DeleteResult",
    "FlushResult",
    "HealthStatus",
    "Memory",
    "MemoryList",
    "Model",
    "ModelList",
    "QAPair",
    "SessionInfo",
    "Usage",
]


class _Lenient(BaseModel):
    """Base of every model: unknown fields are kept, not rejected."""

    model_config = ConfigDict(extra="allow")


class ChatMessage(_Lenient):
    """One chat message, e.g. ``ChatMessage(role="user", content="Hi")``."""

    role: str
    content: str | None = None


class Usage(_Lenient):
    """Token counts of one completion."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatChoice(_Lenient):
    """One alternative of a non-streamed completion."""

    index: int = 0
    message: ChatMessage
    finish_reason: str | None = None


class _Completion(_Lenient):
    """What a chat completion and each of its streamed chunks share (OpenAI's field names)."""

    id: str
    object: str
    created: int = 0
    model: str = ""
    usage: Usage | None = None


class ChatCompletion(_Completion):
    """A non-streamed chat completion (OpenAI's ``chat.completion`` object).

    ``adapter_version`` is the session adapter version that produced it (from the
    ``X-TMEM-Adapter-Version`` header) and ``request_id`` the server's ``x-request-id``.
    """

    object: str = "chat.completion"
    choices: list[ChatChoice]
    adapter_version: int | None = None
    request_id: str | None = None

    @property
    def text(self) -> str:
        """The first choice's message content ("" when there is none)."""
        return (self.choices[0].message.content or "") if self.choices else ""


class ChunkDelta(_Lenient):
    """The new part of a message in a streamed chunk."""

    role: str | None = None
    content: str | None = None


class ChunkChoice(_Lenient):
    """One alternative of a streamed chunk."""

    index: int = 0
    delta: ChunkDelta = ChunkDelta()
    finish_reason: str | None = None


class ChatCompletionChunk(_Completion):
    """One streamed piece of a chat completion (OpenAI's ``chat.completion.chunk``)."""

    object: str = "chat.completion.chunk"
    choices: list[ChunkChoice] = []

    @property
    def delta_text(self) -> str:
        """The text this chunk adds to the first choice ("" for role-only or usage chunks)."""
        return (self.choices[0].delta.content or "") if self.choices else ""


class Model(_Lenient):
    """One entry of ``GET /v1/models``."""

    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""


class ModelList(_Lenient):
    """The ``GET /v1/models`` answer."""

    object: str = "list"
    data: list[Model]


class HealthStatus(_Lenient):
    """The ``GET /health`` answer; other fields the server reports are kept as extras."""

    status: str


class SessionInfo(_Lenient):
    """State of one session: its live adapter version, turn count and summary memory."""

    id: str
    object: str = "session"
    adapter_version: int = 0
    turns: int = 0
    summary: str = ""
    pending_updates: int = 0
    created_at: int = 0
    last_error: str | None = None
    # What the last update did: chunks, pairs extracted and kept, raw-text fallback, summary.
    last_update: dict[str, Any] | None = None


class FlushResult(_Lenient):
    """Answer of a flush: the adapter version that is now live."""

    id: str
    object: str = "session.flush"
    adapter_version: int


class DeleteResult(_Lenient):
    """Answer of a session delete."""

    id: str
    object: str = "session.deleted"
    deleted: bool


class Memory(_Lenient):
    """One pair a session learned from (``source`` ``taught`` or ``extracted``) and its adapter version."""

    instruction: str
    output: str
    source: str
    version: int


class MemoryList(_Lenient):
    """A session's memories, oldest first (the newest answer to a question replaces older ones)."""

    object: str = "list"
    data: list[Memory]


class QAPair(_Lenient):
    """A question-answer pair to teach a session directly."""

    instruction: str
    output: str
