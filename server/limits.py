"""Request limits, each a setting, each refused with a clear error in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import InvalidRequest
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
