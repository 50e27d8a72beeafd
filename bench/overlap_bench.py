"""Does training beside serving hurt chat latency? Streaming TTFT while N other sessions' updates run.

    python -m tmem.bench.overlap_bench --out DIR [--requests 20] [--worker-threads 1 [2 ...]] [--quick]

One `tmem serve` per worker-threads value (tiny model, fp32, inline worker, update group of 16). A
calibration teaches one session alone and reads its training time from /metrics. 16 pairs and 3 epochs
(SGD, the server's lr) were chosen for about 1 s of training: 1.3-1.8 s in-process on one core of a busy
2-core machine; the run prints what it took beside its engine. Then for N in 0, 4, 16: N fresh sessions
are each taught 16 pairs at once, and while their updates run, one other session (which owns an
adapter, and sends X-TMEM-Record: false so it queues no update of its own) sends sequential streaming
chats (max_tokens 16, temperature 0), timing TTFT (first content chunk) and end to end. Measuring stops
when every update is flushed or the requests are used up; a request overlapped if it started before
the last flush returned. A reply streamed as one chunk has TTFT = e2e (its first token waited for the
last), so the table counts those: a change in chunking alone moves TTFT. Progress goes to stderr;
stdout gets the table and, last, one JSON line of headline figures (seconds). results.json and
overlap_bench.png go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tmem.bench.harness import bench_parser, pyplot, save_figure
from tmem.bench.loadtest import send_turn
from tmem.bench.loadtest_report import RequestRecord, quantiles
from tmem.bench.processes import HttpServer
from tmem.bench.serving_bench import ensure_model, ours_command
from tmem.server.redis_proc import free_port

N_VALUES = (0, 4, 16)
PLOT_FILE = "overlap_bench.png"
REQUEST_TIMEOUT_S = 120.0
Row = dict[str, Any]


def teach_pairs(session: int, count: int) -> list[dict[str, str]]:
    """`count` distinct facts for one session: what the worker trains into its adapter."""
    return [{"instruction": f"What is fact {k} of session {session}?",
             "output": f"Fact {k} of session {session} is {k * 7 + session}."} for k in range(count)]


def server_command(model: Path, port: int, out: Path, threads: int, epochs: int) -> list[str]:
    """serving_bench's `tmem serve` command with this run's trainer settings."""
    return [*ours_command(model, port, out), "--worker-threads", str(threads), "--epochs", str(epochs),
            "--update-group-size", "16"]


def train_stats(metrics_text: str) -> dict[str, float]:
    """Training seconds (sum, count of passes) and batched passes so far, from the /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    stats = {"train_s": 0.0, "train_passes": 0.0, "batched_passes": 0.0}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.labels.get("stage") == "train" and s.name == "tmem_update_seconds_sum":
                stats["train_s"] = s.value
            elif s.labels.get("stage") == "train" and s.name == "tmem_update_seconds_count":
                stats["train_passes"] = s.value
            elif s.name == "tmem_batched_update_passes_total":
                stats["batched_passes"] = s.value
    return stats


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


async def chat(client: httpx.AsyncClient, sid: str, index: int, t0: float) -> Row:
    """One streaming chat; its start/end (seconds since `t0`), TTFT, e2e and error as a row."""
    rec = RequestRecord("overlap", 0, index, sid, start=time.perf_counter() - t0)
    body = {"messages": [{"role": "user", "content": f"Tell me something, please ({index})."}], "max_tokens": 16,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Session-ID": sid, "X-TMEM-Record": "false"}
    await send_turn(client, body, headers, rec, t0, REQUEST_TIMEOUT_S)
    if rec.ok and rec.ttft is None:
        rec.error = "no_content"
    return {"start": rec.start, "end": time.perf_counter() - t0, "ttft": rec.ttft, "e2e": rec.e2e,
            "tokens": rec.output_tokens, "chunks": len(rec.chunk_times), "error": rec.error}


async def teach_and_flush(client: httpx.AsyncClient, sid: str, session: int, pairs: int) -> None:
    (await client.post(f"/v1/sessions/{sid}/memories", json={"pairs": teach_pairs(session, pairs)})).raise_for_status()
    await flush(client, sid, 0.0)


async def flush(client: httpx.AsyncClient, sid: str, t0: float) -> float:
    """Wait until the session's updates are live; when that was, in seconds since `t0`."""
    resp = await client.post(f"/v1/sessions/{sid}/flush", json={"timeout": 600})
    resp.raise_for_status()
    if resp.json()["adapter_version"] < 1:  # the update was rejected: nothing was trained
        raise RuntimeError(f"session {sid} has no adapter after its flush")
    return time.perf_counter() - t0


async def run_phase(client: httpx.AsyncClient, n: int, chat_sid: str, args: argparse.Namespace) -> Row:
    """Teach N sessions at once, chat until their updates are flushed or the requests run out."""
    tag = uuid.uuid4().hex[:6]
    before = train_stats((await client.get("/metrics")).text)
    t0 = time.perf_counter()
    sids = [f"bench-ov-{tag}-{i}" for i in range(n)]
    taught = await asyncio.gather(*(client.post(f"/v1/sessions/{sid}/memories",
                                                json={"pairs": teach_pairs(i, args.pairs)})
                                    for i, sid in enumerate(sids)))
    for resp in taught:
        resp.raise_for_status()
    flushes = [asyncio.create_task(flush(client, sid, t0)) for sid in sids]
    rows: list[Row] = []
    while len(rows) < args.requests and not (flushes and all(task.done() for task in flushes)):
        rows.append(await chat(client, chat_sid, len(rows), t0))
        print(f"  N={n:<3} request {len(rows):>3}/{args.requests}  ttft {_ms(rows[-1]['ttft'])} ms"
              f"  pending flushes {sum(not task.done() for task in flushes)}", file=sys.stderr)
    done = list(await asyncio.gather(*flushes))  # every flush must succeed: raises otherwise
    after = train_stats((await client.get("/metrics")).text)
    await asyncio.gather(*(client.delete(f"/v1/sessions/{sid}") for sid in sids))
    return phase_summary(n, rows, max(done) if done else None, stats_delta(before, after))


def phase_summary(n: int, rows: list[Row], updates_done: float | None, train: dict[str, float]) -> Row:
    """Quantiles of one phase's chats, how many overlapped the updates, and the update throughput."""
    ok = [r for r in rows if r["error"] is None]
    overlapped = [r for r in ok if updates_done is not None and r["start"] < updates_done]
    # A reply that arrives as one chunk has TTFT = e2e: the first token waited for the last one.
    return {"n": n, "requests": len(rows), "errors": len(rows) - len(ok), "overlapped": len(overlapped),
            "single_chunk": sum(r["chunks"] == 1 for r in ok),
            "ttft_s": quantiles(r["ttft"] for r in ok), "ttft_overlapped_s": quantiles(r["ttft"] for r in overlapped),
            "e2e_s": quantiles(r["e2e"] for r in ok), "updates_wall_s": updates_done,
            "sessions_per_s": n / updates_done if n and updates_done else None, "train": train,
            "loadavg_1m": os.getloadavg()[0], "rows": rows}


def with_ratios(phases: list[Row]) -> list[Row]:
    """Each phase's TTFT p50/p95 and e2e p50 divided by those of N=0 (None without a baseline)."""
    base: Row = next((p for p in phases if p["n"] == 0), {"ttft_s": {}, "e2e_s": {}})
    for phase in phases:
        for key, metric, q in (("ratio_p50", "ttft_s", "p50"), ("ratio_p95", "ttft_s", "p95"),
                               ("e2e_ratio_p50", "e2e_s", "p50")):
            num, den = phase[metric].get(q), base[metric].get(q)
            phase[key] = num / den if num is not None and den else None
    return phases


async def run_server_phases(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate one session's training time, then the phases N = 0, 4, 16 on one server."""
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S + 600, trust_env=False) as client:
        before = train_stats((await client.get("/metrics")).text)
        chat_sid = f"bench-ov-chat-{uuid.uuid4().hex[:6]}"
        await teach_and_flush(client, chat_sid, 999, args.pairs)  # it owns an adapter, as a real session does
        calibration = stats_delta(before, train_stats((await client.get("/metrics")).text))
        print(f"  one session's update ({args.pairs} pairs, {args.epochs} epochs): "
              f"{calibration['train_s']:.2f} s of training", file=sys.stderr)
        for i in range(3):  # warm-up: the adapter load and the first compiled shapes
            if (row := await chat(client, chat_sid, -1 - i, time.perf_counter()))["error"]:
                raise RuntimeError(f"warm-up chat failed: {row['error']}")
        phases = [await run_phase(client, n, chat_sid, args) for n in N_VALUES]
        await client.delete(f"/v1/sessions/{chat_sid}")
    return {"one_session_train_s": calibration["train_s"], "phases": with_ratios(phases)}


def run_all(args: argparse.Namespace) -> list[Row]:
    """One server per worker-threads value, one after the other."""
    model = ensure_model(args.model)
    runs: list[Row] = []
    for threads in args.worker_threads:
        out: Path = args.out / f"threads{threads}"
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        cmd = server_command(model, port, out, threads, args.epochs)
        with HttpServer(f"tmem (worker threads {threads})", cmd, port, out / "tmem.log") as server:
            runs.append({"worker_threads": threads, **asyncio.run(run_server_phases(server.url, args))})
    return runs


def _phase(run: Row, n: int) -> Row:
    return next(p for p in run["phases"] if p["n"] == n)


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def headline(runs: list[Row]) -> Row:
    """The one-line summary, from the first worker-threads run."""
    first = runs[0]
    figures: Row = {"bench": "overlap", "worker_threads": first["worker_threads"]}
    for n in N_VALUES:
        figures[f"ttft_p50_n{n}"] = _r(_phase(first, n)["ttft_s"]["p50"])
    for n in N_VALUES[1:]:
        figures[f"ratio_n{n}"] = _r(_phase(first, n)["ratio_p50"])
    figures["overlapped_requests_n16"] = _phase(first, 16)["overlapped"]
    figures["e2e_ratio_n16"] = _r(_phase(first, 16)["e2e_ratio_p50"])
    figures["sessions_per_s_n16"] = _r(_phase(first, 16)["sessions_per_s"])
    return figures


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(runs: list[Row]) -> str:
    """One row per (worker threads, N): TTFT and its ratio to N=0, overlap, update throughput."""
    head = (f"{'threads':>7}{'N':>4}{'req':>5}{'err':>5}{'overlap':>8}{'TTFT p50':>10}{'TTFT p95':>10}{'x p50':>7}"
            f"{'x p95':>7}{'1chunk':>7}{'E2E p50':>9}{'x E2E':>7}{'upd wall':>9}{'sess/s':>8}{'train s':>8}"
            f"{'passes':>7}{'load':>6}")
    lines = [head + "   (TTFT/E2E in ms; x: ratio to N=0; 1chunk: replies in one chunk (TTFT = E2E);"
                    " upd wall: teach → last flush, s)"]
    for run in runs:
        for p in run["phases"]:
            lines.append(
                f"{run['worker_threads']:>7}{p['n']:>4}{p['requests']:>5}{p['errors']:>5}{p['overlapped']:>8}"
                f"{_ms(p['ttft_s']['p50']):>10}{_ms(p['ttft_s']['p95']):>10}{_f(p['ratio_p50']):>7}"
                f"{_f(p['ratio_p95']):>7}{p['single_chunk']:>7}{_ms(p['e2e_s']['p50']):>9}"
                f"{_f(p['e2e_ratio_p50']):>7}{_f(p['updates_wall_s'], 1):>9}"
                f"{_f(p['sessions_per_s']):>8}{_f(p['train']['train_s'], 1):>8}{p['train']['train_passes']:>7.0f}"
                f"{p['loadavg_1m']:>6.1f}")
        lines.append(f"worker threads {run['worker_threads']}: one session's update alone took "
                     f"{_f(run['one_session_train_s'])} s of training")
    lines.append(f"machine: {os.cpu_count()} cores; load: 1-min load average after each phase")
    return "\n".join(lines)


def write_plot(out: Path, runs: list[Row]) -> Path:
    """TTFT p50 and p95 against N, one pair of lines per worker-threads value."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, run in enumerate(runs):
        for q, style in (("p50", "o-"), ("p95", "s--")):
            ys = [_phase(run, n)["ttft_s"][q] for n in N_VALUES]
            ax.plot(N_VALUES, [y * 1000 if y is not None else float("nan") for y in ys], style, color=f"C{i}",
                    label=f"TTFT {q}, worker threads {run['worker_threads']}")
    ax.set(title="chat TTFT while N sessions' updates train", xlabel="N sessions updating", ylabel="ms",
           xticks=list(N_VALUES))
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out / PLOT_FILE)


def report(out: Path, runs: list[Row], meta: Row) -> Row:
    """results.json and the plot to `out`; the table, then (last) the JSON line, to stdout."""
    figures = headline(runs)
    (out / "results.json").write_text(json.dumps({"headline": figures, "meta": meta, "runs": runs}, indent=1))
    plot = write_plot(out, runs)
    print(format_table(runs))
    print(f"results: {out / 'results.json'}  plot: {plot}")
    print(json.dumps(figures))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("overlap_bench", __doc__, model=Path(".cache/tiny-model"))
    parser.add_argument("--requests", type=int, default=20, help="chat requests per N (fewer if updates end)")
    parser.add_argument("--worker-threads", type=int, nargs="+", default=[1], help="one server run per value")
    parser.add_argument("--pairs", type=int, default=16, help="pairs taught to each updating session")
    parser.add_argument("--epochs", type=int, default=3, help="trainer epochs (SGD, the server's default lr)")
    parser.add_argument("--quick", action="store_true", help="8 requests per N, 8 pairs, 2 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.pairs, args.epochs = min(args.requests, 8), 8, 2
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run_all(args)
    meta = {"requests": args.requests, "pairs": args.pairs, "epochs": args.epochs, "quick": args.quick,
            "n_values": list(N_VALUES), "cpu_count": os.cpu_count(), "max_tokens": 16, "update_group_size": 16}
    report(args.out, runs, meta)
    return 1 if any(p["errors"] for run in runs for p in run["phases"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
