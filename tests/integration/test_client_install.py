"""`pip install ./` of the base distribution gives a working client without torch (issue 4)."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "vllm", "fastapi", "transformers", "numpy", "peft", "redis"]


@pytest.mark.slow
def test_base_install_is_the_client_alone(tmp_path: Path, server) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # Installs httpx + pydantic (and their few dependencies) from the configured index, nothing else.
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(REPO)], check=True, timeout=600)
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True,
                               capture_output=True, text=True).stdout.lower()
    assert not [pkg for pkg in HEAVY if f"\n{pkg}==" in f"\n{installed}"]
    script = (
        "import sys\n"
        "from tmem.client import TMEMClient\n"
        f"with TMEMClient({server.url!r}) as tmem:\n"
        "    assert tmem.health().status == 'ok'\n"
        "    reply = tmem.chat('hello', max_tokens=4)\n"
        "    print(reply.usage.completion_tokens <= 4 and reply.choices[0].finish_reason in ('stop', 'length'))\n"
        f"assert not [m for m in {HEAVY!r} if m in sys.modules]\n"
    )
    out = subprocess.run([str(python), "-c", script], check=True, capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.stdout.strip() == "True"
