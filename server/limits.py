"""Request limits, each a setting, each refused with a clear error in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.errors import InvalidRequest, PayloadTooLarge
from server.settings import Settings


def check_messages(messages: Sequence[dict[str, str]], settings: Settings, param: str = "messages") -> None:
    """Refuse too many messages, or a message longer than `max_message_chars`."""
    if len(messages) > settings.max_messages_per_request:
        raise InvalidRequest(f"at most {settings.max_messages_per_request} messages per request, got {len(messages)}",
                             param=param, code="array_above_max_length")
    for index, message in enumerate(messages):
        size = len(message.get("content", ""))
        if size > settings.max_message_chars:
            raise InvalidRequest(
                f"message {index} has {size} characters; the limit is {settings.max_message_chars}",
                param=f"{param}[{index}].content", code="string_above_max_length")


def check_max_tokens(requested: int | None, settings: Settings) -> None:
    """Refuse a completion longer than `max_completion_tokens`, whatever the context window allows."""
    if requested is not None and requested > settings.max_completion_tokens:
        raise InvalidRequest(f"max_tokens is {requested}; this server allows at most {settings.max_completion_tokens}",
                             param="max_tokens", code="max_tokens_too_large")


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` (by Content-Length, or while streaming in)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message: dict[str, Any] = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        error = PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")
        await error.to_response()(scope, receive, send)
