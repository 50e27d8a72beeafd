"""Request limits, each a setting, each refused with a clear error in OpenAI's shape."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from tmem.server.errors import InvalidRequest, PayloadTooLarge
from tmem.server.settings import Settings

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


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


def completion_budget(body: object, settings: Settings) -> int:
    """The tokens a chat body may generate (its max_tokens, else the default), read before it is validated."""
    asked = None
    if isinstance(body, dict):
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        asked = settings.default_max_tokens
    return min(asked, settings.max_completion_tokens)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1); a name or 0.0.0.0 is reachable."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(settings: Settings) -> tuple[str, ...]:
    """--allowed-hosts, else the loopback names when bound to loopback (DNS rebinding), else any host."""
    if settings.allowed_hosts:
        return settings.allowed_hosts
    if is_loopback(settings.host):
        return (*LOOPBACK_NAMES, settings.host)
    return ("*",)


def host_of(header: str) -> str:
    """`example.com:8000` → `example.com`, `[::1]:8000` → `::1`, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name, _, _ = header.partition(":") if header.count(":") == 1 else (header, "", "")
    return name


def host_matches(host: str, patterns: Sequence[str]) -> bool:
    for pattern in patterns:
        pattern = pattern.strip().lower().strip("[]")
        if pattern == "*" or pattern == host or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


class HostAllowList:
    """ASGI middleware: answer only requests whose Host header is allowed; a rebound DNS name gets a 400."""

    def __init__(self, app: Any, hosts: Sequence[str]) -> None:
        self.app, self.hosts = app, tuple(hosts)
        self.any = "*" in self.hosts

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_matches(host_of(header), self.hosts):
            await self.app(scope, receive, send)
            return
        error = InvalidRequest("Invalid Host header: this server does not answer for that name "
                               "(see --allowed-hosts)", param="Host", code="invalid_host")
        await error.to_response()(scope, receive, send)


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
