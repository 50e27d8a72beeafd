"""Settings fields as command-line flags: each command offers the fields it reads, and no others."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from tmem.server.settings import Settings


def add_settings_flags(parser: argparse.ArgumentParser, fields: Iterable[str] | None = None) -> None:
    """One --flag per Settings field (all, or `fields`); unset flags leave TMEM_* and the defaults in charge."""
    names = set(Settings.model_fields) if fields is None else set(fields)
    for name, field in Settings.model_fields.items():
        if name not in names:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = field.description or f"(env TMEM_{name.upper()}, default {field.default!r})"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        parser.add_argument(flag, dest=name, default=None, choices=_literal_choices(field.annotation), help=help_text)


def _literal_choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _literal_choices(arg)
            if found:
                return found
    return None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags win over the environment (read by pydantic-settings for the fields no flag set).

    Never through os.environ: child processes (redis-server, vLLM's engine core) would inherit --api-keys.
    Raises pydantic's ValidationError, which names fields but never echoes their values.
    """
    overrides = {name: value for name in Settings.model_fields if (value := getattr(args, name, None)) is not None}
    return Settings(**overrides)
