"""Issue 13: what `pip install tmem` puts on a user's machine.

One wheel is built from this checkout; its file list is checked, and it is installed without extras
into a fresh virtual environment, where the SDK must import with nothing heavy and `tmem` must say
what to install instead of failing with a traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ROOMS = {"server": "tmem/server", "adapters": "tmem/adapters", "client": "tmem/client", "bench": "tmem/bench"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # The build tools of this environment, not a fresh download per test run.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, timeout=300)
    return next(out.glob("tmem-*.whl"))


@pytest.fixture(scope="module")
def base_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with `pip install tmem` (no extras): the SDK alone."""
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, with_pip=True)
    subprocess.run([env / "bin" / "python", "-m", "pip", "install", "-q", str(wheel)], check=True, timeout=600)
    return env


def test_the_wheel_installs_one_import_package_with_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"tmem"}  # nothing named bare server, client, adapters or bench
    assert {"tmem/py.typed", "tmem/bench/prompts.json", "tmem/__init__.py"} <= set(names)
    # Every package of the checkout is in the wheel (the package list in pyproject.toml is explicit).
    packages = {ROOMS[p.parent.relative_to(ROOT).parts[0]] + "/" + "/".join(p.parent.relative_to(ROOT).parts[1:])
                for room in ROOMS for p in (ROOT / room).rglob("__init__.py")}
    assert {p.rstrip("/") + "/__init__.py" for p in packages} <= set(names)


def test_the_base_install_is_the_sdk_and_nothing_heavy(base_env: Path, wheel: Path) -> None:
    probe = ("import json, sys, tmem, tmem.client\nfrom tmem import Client\n"
             "print(json.dumps([tmem.__version__, sorted(m for m in ('torch', 'vllm', 'fastapi', 'transformers',"
             " 'redis', 'tmem.server') if m in sys.modules), Client.__name__]))")
    out = subprocess.run([base_env / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=base_env)  # not the checkout: the installed package alone
    assert out.returncode == 0, out.stderr
    version, heavy, client = json.loads(out.stdout)
    assert (heavy, client) == ([], "TMEMClient")
    assert wheel.name.startswith(f"tmem-{version}-")  # the one version string, as the metadata has it


def test_the_base_install_lists_no_bare_top_level_modules(base_env: Path) -> None:
    shown = subprocess.run([base_env / "bin" / "python", "-m", "pip", "show", "-f", "tmem"], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    files = [line.strip() for line in shown.split("Files:", 1)[1].splitlines() if line.strip()]
    tops = {f.split("/")[0] for f in files if not f.startswith(("..", "tmem-"))}
    assert tops == {"tmem"}


def test_the_command_on_a_base_install_says_what_to_install(base_env: Path) -> None:
    out = subprocess.run([base_env / "bin" / "tmem", "--help"], capture_output=True, text=True, timeout=120,
                         cwd=base_env)
    assert out.returncode == 2
    assert "pip install 'tmem[cpu]'" in out.stderr and "Traceback" not in out.stderr

