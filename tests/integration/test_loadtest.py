"""`tmem loadtest` against the shared server: the report's figures add up, plots are written, errors are counted.

Exit status (the choice these tests pin down): 0 when every run's error rate is at most --max-error-rate
(default 0), else 1; report.json says the same in `passed`, per run and overall.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tmem.bench import loadtest
from tmem.server.redis_proc import free_port

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "report.json").read_text()))


def assert_ordered(figures: dict[str, Any]) -> None:
    assert figures["n"] > 0
    assert 0 < figures["p50"] <= figures["p95"] <= figures["p99"]


def test_session_load_report_table_and_plots(server, tmp_path: Path) -> None:
    out = tmp_path / "lt"
    cmd = [sys.executable, "-m", "tmem.server.cli", "loadtest", "--url", server.url, "--sessions", "4", "--turns", "3",
           "--concurrency", "2", "--max-tokens", "16", "--duration", "45", "--lag-timeout", "60",
           "--no-progress", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    assert "requests: sent 12  ok 12  errors 0" in done.stdout
    assert "TTFT ms" in done.stdout and "update lag s: p50" in done.stdout
    doc = read_report(out)
    req = doc["requests"]
    assert req["sent"] == req["ok"] + req["errors"] == len(doc["rows"]) == 12
    assert req["by_status"] == {"200": 12} and req["errors_by_kind"] == {}
    assert doc["passed"] is True and doc["compare"] is None and doc["sessions"] is True
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        assert_ordered(doc[key])
    assert doc["ttft_s"]["p50"] <= doc["e2e_s"]["p50"]

    rows = doc["rows"]
    assert {(r["session"], r["turn"]) for r in rows} == {(s, t) for s in range(4) for t in range(3)}
    assert all(r["session_id"] == f"lt-{doc['run_id']}-{r['session']}" for r in rows)
    assert all(0 < r["output_tokens"] <= 16 for r in rows)
    for s in range(4):  # a session is served its adapter versions in order, never an older one after a newer
        served = [r["adapter_version"] for r in sorted(rows, key=lambda r: r["turn"]) if r["session"] == s]
        assert served == sorted(served) and len(served) == 3, served
    assert all(r["ttft"] <= r["e2e"] for r in rows)
    assert doc["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert doc["duration_s"] >= max(r["e2e"] for r in rows)  # the run holds its slowest request
    assert doc["output_tok_per_s"] == pytest.approx(doc["output_tokens"] / doc["duration_s"])
    timeline_tokens = sum(tokens_per_s for _, tokens_per_s in doc["throughput_timeline"])  # 1 s buckets
    assert timeline_tokens == pytest.approx(doc["output_tokens"])

    lag = doc["update_lag_s"]
    assert lag["measured"] >= 1
    assert_ordered(lag)
    assert lag["measured"] + lag["timed_out"] == 12  # every stored turn is watched to an end
    assert doc["server_metrics"]["update_lag"]["count"] >= 1

    for name in ("latency_cdf.png", "throughput.png", "update_lag.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # the load-test sessions are deleted at the end
    for session in range(4):
        assert httpx.get(f"{server.url}/v1/sessions/lt-{doc['run_id']}-{session}", timeout=30).status_code == 404


def test_comparison_against_a_closed_port_counts_connection_errors(server, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    closed = f"http://127.0.0.1:{free_port()}"
    code = loadtest.main(["--url", server.url, "--no-sessions", "--sessions", "2", "--turns", "3",
                          "--max-requests", "3", "--max-tokens", "8", "--compare-url", closed,
                          "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out

    assert code == 1  # the compare run failed every request: not hidden behind ours succeeding
    doc = read_report(out)
    assert doc["requests"]["ok"] == 3 and doc["passed"] is False
    theirs = doc["compare"]
    assert theirs["requests"] == {"sent": 3, "ok": 0, "errors": 3, "by_status": {"no_response": 3},
                                  "errors_by_kind": {"connect": 3}}
    assert theirs["error_rate"] == 1.0 and theirs["passed"] is False
    assert theirs["ttft_s"]["p50"] is None and theirs["output_tok_per_s"] == 0
    assert doc["ratios"]["ttft_p50"] is None and doc["ratios"]["output_tok_per_s"] is None
    assert all(r["error"] == "connect" and r["status"] is None for r in theirs["rows"])
    assert "errors by kind: connect=3" in printed and "ours/theirs" in printed
    assert (out / "latency_cdf.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(("max_error_rate", "expected_code"), [("0", 1), ("1", 0)])
def test_unreachable_server_errors_are_counted_and_set_the_exit_code(
    tmp_path: Path, capsys, max_error_rate: str, expected_code: int
) -> None:
    out = tmp_path / "down"
    code = loadtest.main(["--url", f"http://127.0.0.1:{free_port()}", "--sessions", "2", "--turns", "3",
                          "--max-requests", "3", "--max-error-rate", max_error_rate, "--no-progress",
                          "--out", str(out)])
    capsys.readouterr()

    assert code == expected_code
    doc = read_report(out)
    assert doc["requests"]["sent"] == 3 and doc["requests"]["errors_by_kind"] == {"connect": 3}
    assert doc["update_lag_s"]["measured"] == 0 and doc["cleanup_errors"] == 0  # nothing stored, nothing deleted
    assert doc["passed"] is (expected_code == 0)
