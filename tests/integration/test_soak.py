"""The one-minute soak (`python -m tmem.bench.soak`): session load while the worker is SIGKILLed twice and Redis
restarts once; afterwards Redis holds every acknowledged turn exactly once and only verified checkpoints.

It starts its own redis-server, `tmem serve --worker off` and `tmem worker` processes, so it needs no fixture
but the tiny model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_one_minute_soak_with_worker_kills_and_a_redis_restart_loses_nothing(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "soak"
    cmd = [sys.executable, "-m", "tmem.bench.soak", "--out", str(out), "--minutes", "1", "--sessions", "4",
           "--concurrency", "2", "--max-tokens", "16", "--model", str(tiny_model_dir), "--flush-timeout", "120"]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=480)
    took = time.monotonic() - started
    output = f"{done.stdout[-6000:]}\n--- stderr ---\n{done.stderr[-4000:]}"
    assert done.returncode == 0, output
    verdict = json.loads(done.stdout.strip().splitlines()[-1])  # the last line is the verdict
    assert verdict["bench"] == "soak" and verdict["minutes"] == 1
    assert verdict["ok"] is True, output
    assert verdict["turns_sent"] == verdict["turns_stored"] > 0
    assert verdict["turns_lost"] == verdict["turns_duplicated"] == 0
    assert verdict["checksum_failures"] == 0 and verdict["unexpected_5xx"] == 0
    assert verdict["worker_kills"] == 2 and verdict["redis_restarts"] == 1
    assert verdict["versions_written"] >= 1  # the taught pairs were trained into real, verified versions
    assert "turns stored" in done.stdout and "faults:" in done.stdout

    doc = json.loads((out / "report.json").read_text())
    assert doc["verdict"] == verdict
    audit = doc["audit"]
    assert audit["found"] == verdict["turns_sent"] and audit["unacked_stored"] == 0
    assert audit["reply_mismatches"] == 0 and audit["pending_after_flush"] == 0
    assert set(doc["flush_status"].values()) == {200}
    kinds = [e["kind"] for e in doc["events"]]
    assert kinds.count("worker_kill") == kinds.count("worker_ready") == 2
    assert kinds.index("redis_stop") < kinds.index("redis_start")
    assert (out / "soak.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "loadtest" / "report.json").is_file()
    print(f"soak test took {took:.0f}s: {verdict}")
