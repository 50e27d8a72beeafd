"""Redis replies as Python values: the client runs with decode_responses=False, as checkpoints are bytes."""

from __future__ import annotations


def as_str(value: bytes | str | None, default: str = "") -> str:
    """A reply value as text (`default` for a missing one)."""
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else value


def as_bytes(value: bytes | str) -> bytes:
    """A reply value as bytes."""
    return value if isinstance(value, bytes) else value.encode()
