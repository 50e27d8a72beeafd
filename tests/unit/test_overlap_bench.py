"""The overlap benchmark's pure parts: quantiles, overlap counting, ratios, metrics parsing and the report."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import pytest

from tmem.bench.overlap_bench import (
    N_VALUES,
    PLOT_FILE,
    format_table,
    headline,
    phase_summary,
    report,
    stats_delta,
    teach_pairs,
    train_stats,
    with_ratios,
)
from tmem.server.metrics import Metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_TRAINING = {"train_s": 0.0, "train_passes": 0.0, "batched_passes": 0.0}


def row(start: float, ttft: float | None, error: str | None = None, chunks: int = 16, e2e: float = 0.2
        ) -> dict[str, Any]:
    return {"start": start, "end": start + e2e, "ttft": ttft, "e2e": e2e, "tokens": 16, "chunks": chunks,
            "error": error}


def fake_runs(ttft_by_n: dict[int, float], threads: int = 1) -> list[dict[str, Any]]:
    """One server run whose requests at N all have the same TTFT and an e2e of 0.1 s + N·10 ms;
    every request overlaps when N > 0."""
    phases = []
    for n in N_VALUES:
        rows = [row(0.1 * i, ttft_by_n[n], e2e=0.1 + n / 100) for i in range(10)]
        phases.append(phase_summary(n, rows, 5.0 if n else None, {**NO_TRAINING, "train_s": float(n)}))
    return [{"worker_threads": threads, "one_session_train_s": 1.0, "phases": with_ratios(phases)}]


def test_teach_pairs_are_distinct_per_session() -> None:
    first, second = teach_pairs(0, 16), teach_pairs(1, 16)
    assert len(first) == 16 and set(first[0]) == {"instruction", "output"}
    assert len({p["instruction"] for p in first + second}) == 32


def test_phase_summary_percentiles_skip_errors() -> None:
    rows = [row(float(i), (i + 1) / 100) for i in range(20)] + [row(30.0, None, "timeout")]
    phase = phase_summary(4, rows, updates_done=10.0, train=NO_TRAINING)
    assert phase["requests"] == 21 and phase["errors"] == 1
    assert phase["ttft_s"]["n"] == 20
    assert phase["ttft_s"]["p50"] == pytest.approx(0.105)  # numpy's linear interpolation of 0.01..0.20
    assert phase["ttft_s"]["p95"] == pytest.approx(0.1905)
    assert phase["sessions_per_s"] == pytest.approx(0.4)


def test_single_chunk_replies_are_counted() -> None:
    rows = [row(0.0, 0.2, chunks=1), row(1.0, 0.05), row(2.0, 0.2, chunks=1), row(3.0, None, "timeout", chunks=1)]
    assert phase_summary(0, rows, None, NO_TRAINING)["single_chunk"] == 2  # the failed one is not a reply


def test_overlap_counts_requests_started_before_the_last_flush() -> None:
    rows = [row(1.0, 0.05), row(2.9, 0.05), row(3.0, 0.05), row(4.0, 0.05)]
    phase = phase_summary(16, rows, updates_done=3.0, train=NO_TRAINING)
    assert phase["overlapped"] == 2
    assert phase["ttft_overlapped_s"]["n"] == 2
    baseline = phase_summary(0, rows, updates_done=None, train=NO_TRAINING)
    assert baseline["overlapped"] == 0 and baseline["sessions_per_s"] is None


def test_ratios_are_relative_to_n0() -> None:
    phases = with_ratios(fake_runs({0: 0.05, 4: 0.06, 16: 0.1})[0]["phases"])
    assert [p["ratio_p50"] for p in phases] == pytest.approx([1.0, 1.2, 2.0])
    assert phases[2]["ratio_p95"] == pytest.approx(2.0)
    assert phases[2]["e2e_ratio_p50"] == pytest.approx(0.26 / 0.1)


def test_ratios_without_a_baseline_are_none() -> None:
    phase = phase_summary(4, [row(0.0, 0.05)], 1.0, NO_TRAINING)
    assert with_ratios([phase])[0]["ratio_p50"] is None
    assert phase["e2e_ratio_p50"] is None


def test_train_stats_reads_the_train_stage_and_batched_passes() -> None:
    metrics = Metrics()
    before = train_stats(metrics.render().decode())
    metrics.update_seconds.labels("extract").observe(9.0)  # not training: must not count
    metrics.update_seconds.labels("train").observe(1.5)
    metrics.update_seconds.labels("train").observe(2.0)
    metrics.batched_passes.inc()
    delta = stats_delta(before, train_stats(metrics.render().decode()))
    assert delta == {"train_s": pytest.approx(3.5), "train_passes": 2.0, "batched_passes": 1.0}


def test_headline_has_the_requested_keys() -> None:
    figures = headline(fake_runs({0: 0.05, 4: 0.06, 16: 0.1}) + fake_runs({0: 1.0, 4: 1.0, 16: 1.0}, threads=2))
    assert figures["bench"] == "overlap" and figures["worker_threads"] == 1  # the first run's figures
    assert figures["ttft_p50_n0"] == 0.05 and figures["ttft_p50_n16"] == 0.1
    assert figures["ratio_n4"] == pytest.approx(1.2) and figures["ratio_n16"] == pytest.approx(2.0)
    assert figures["overlapped_requests_n16"] == 10
    assert figures["sessions_per_s_n16"] == pytest.approx(3.2)
    assert figures["e2e_ratio_n16"] == pytest.approx(2.6)


def test_table_has_a_row_per_threads_and_n() -> None:
    table = format_table(fake_runs({0: 0.05, 4: 0.06, 16: 0.1}) + fake_runs({0: 0.05, 4: 0.05, 16: 0.05}, 2))
    rows = [line.split() for line in table.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [(r[0], r[1]) for r in rows] == [(t, str(n)) for t in ("1", "2") for n in N_VALUES]
    # N=16: TTFT p50 in ms, its ratio to N=0, replies in one chunk, e2e p50 in ms and its ratio
    assert (rows[2][5], rows[2][7], rows[2][9], rows[2][10], rows[2][11]) == ("100.0", "2.00", "0", "260.0", "2.60")


def test_report_ends_with_the_json_line(tmp_path: Path) -> None:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        figures = report(tmp_path, fake_runs({0: 0.05, 4: 0.06, 16: 0.1}), {"requests": 10})
    lines = stdout.getvalue().strip().splitlines()
    assert json.loads(lines[-1]) == figures
    assert not any(line.startswith("{") for line in lines[:-1])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["headline"] == figures and saved["meta"] == {"requests": 10}
    assert len(saved["runs"][0]["phases"]) == len(N_VALUES)
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)
