"""Server-sent-event decoding for streamed chat completions, shared by the sync and async streams.

The decoders are fed one text line at a time and never touch the network, so the two stream
classes differ only in how they pull lines (``iter_lines`` vs ``aiter_lines``).
"""

from __future__ import annotations

import json

from .errors import APIResponseValidationError, status_error
from .types import ChatCompletionChunk

DONE = "[DONE]"


class SSEDecoder:
    """Assemble SSE lines into event payloads (the joined ``data:`` fields of one event)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its newline); return the event's data when ``line`` ends an event."""
        if not line:
            return self.flush()
        if line.startswith(":"):  # a comment, e.g. a keep-alive ping
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # "event", "id" and "retry" carry nothing this API uses

    def flush(self) -> str | None:
        """Return the pending event's data (``None`` if there is none) and start a new event."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


class ChunkDecoder:
    """Turn the lines of a chat-completion stream into chunks; raise on an error event.

    ``done`` becomes true at ``data: [DONE]`` or after an error, and the caller stops reading.
    """

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.done = False
        self._sse = SSEDecoder()

    def feed(self, line: str) -> ChatCompletionChunk | None:
        """Take one line; return a chunk when it completes one."""
        data = self._sse.feed(line)
        return None if data is None else self._event(data)

    def finish(self) -> ChatCompletionChunk | None:
        """Decode an event left without its closing blank line when the body ends."""
        data = self._sse.flush()
        return None if data is None or self.done else self._event(data)

    def _event(self, data: str) -> ChatCompletionChunk | None:
        if data.strip() == DONE:
            self.done = True
            return None
        try:
            payload = json.loads(data)
            if not (isinstance(payload, dict) and "error" in payload):
                return ChatCompletionChunk.model_validate(payload)
        except ValueError as exc:  # also pydantic's ValidationError
            self.done = True
            raise APIResponseValidationError(
                f"Malformed stream event: {data[:200]!r}", request_id=self.request_id, body=data
            ) from exc
        self.done = True
        raise status_error(None, payload, self.request_id)
