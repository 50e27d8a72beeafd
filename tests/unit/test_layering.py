"""Issue 13: the rooms' imports point one way, and the light entry points stay light.

The import graph is read from the source (ast), so a new `import` that breaks a rule fails here before
anyone notices a slow `tmem --help` or a client that drags torch in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tmem.server.settings import WORKER_FIELDS, Settings

ROOT = Path(__file__).resolve().parents[2]
ROOMS = {"server": "tmem.server", "adapters": "tmem.adapters", "client": "tmem.client", "bench": "tmem.bench"}
HEAVY = ("torch", "vllm", "transformers", "fastapi", "peft", "numpy", "redis", "tmem.server", "tmem.adapters")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [ROOMS[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_files() -> Iterator[Path]:
    for room in ROOMS:
        yield from sorted((ROOT / room).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Modules `path` imports at run time, inside functions too; never those under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    guarded = {id(n) for g in ast.walk(tree) if isinstance(g, ast.If) and "TYPE_CHECKING" in ast.unparse(g.test)
               for n in ast.walk(g)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, lazily inside functions too: a lazy cycle is still a cycle."""
    modules = {module_name(p): p for p in room_files()}
    return {name: {m for m in imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycles_among_the_modules() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(name):], name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert "tmem.server.worker_main" in done and "tmem.server.cli" in done  # the graph really was walked


@pytest.mark.parametrize(("room", "forbidden"), [
    ("server", ("tmem.bench",)),
    ("adapters", ("tmem.server", "tmem.bench", "fastapi", "redis", "vllm", "httpx")),
    ("client", ("tmem.server", "tmem.adapters", "tmem.bench", "torch", "vllm", "fastapi", "transformers")),
])
def test_each_room_never_imports_what_it_must_not(room: str, forbidden: tuple[str, ...]) -> None:
    broken = sorted(
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / room).rglob("*.py")
        for name in imports(path)
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )
    assert broken == []


def test_vllm_is_imported_by_the_engine_module_alone() -> None:
    importers = sorted(
        str(path.relative_to(ROOT))
        for path in room_files()
        if any(n == "vllm" or n.startswith("vllm.") for n in imports(path))
    )
    assert importers == ["server/engine.py"]


def loaded_after(code: str) -> list[str]:
    """The heavy packages a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_torch_and_no_vllm() -> None:
    assert loaded_after("import tmem.server.cli") == ["tmem.server"]  # the standard library besides


def test_tmem_help_loads_no_torch_and_no_vllm() -> None:
    code = ("import contextlib, io\nfrom tmem.server.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n    main(['--help'])")
    assert [m for m in loaded_after(code) if m in ("torch", "vllm", "transformers", "peft")] == []


def test_the_sdk_loads_nothing_heavy() -> None:
    assert loaded_after("import tmem.client\nfrom tmem import Client\nassert Client is tmem.client.TMEMClient") == []


def _settings_read_by(paths: list[Path]) -> set[str]:
    """Settings fields the code in `paths` reads, through properties and methods of Settings too."""
    fields, members = set(Settings.model_fields), _settings_members()
    read: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value).endswith("settings"):
                read |= {node.attr} & fields | members.get(node.attr, set())
    return read


def _settings_members() -> dict[str, set[str]]:
    tree = ast.parse((ROOT / "server" / "settings.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings")
    return {
        fn.name: {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and ast.unparse(n.value) == "self"}
        for fn in cls.body if isinstance(fn, ast.FunctionDef)
    }


def test_the_worker_offers_a_flag_for_every_setting_it_reads() -> None:
    worker_code = [ROOT / "server" / f for f in ("worker.py", "worker_main.py", "update_prep.py", "trainer_runtime.py")]
    worker_code += sorted((ROOT / "server").glob("store*.py")) + sorted((ROOT / "server" / "store").glob("*.py"))
    read = _settings_read_by(worker_code)
    assert {"update_group_size", "trainer_preset", "rank"} <= read  # the scan finds reads, through methods too
    assert read - WORKER_FIELDS == set()


def test_each_command_offers_only_its_own_flags() -> None:
    from tmem.server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    worker_flags = {o for a in sub.choices["worker"]._actions for o in a.option_strings}  # type: ignore[attr-defined]
    serve_flags = {o for a in sub.choices["serve"]._actions for o in a.option_strings}  # type: ignore[attr-defined]
    assert {"--redis-url", "--rank", "--update-group-size", "--api-url", "--worker-key-file"} <= worker_flags
    assert {"--host", "--port", "--api-keys", "--gpu-memory-utilization", "--rate-limit-rpm"} & worker_flags == set()
    assert {"--host", "--api-keys", "--gpu-memory-utilization", "--rank"} <= serve_flags
    assert "--api-url" not in serve_flags
