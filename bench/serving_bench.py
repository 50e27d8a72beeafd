"""Serving cost of TMEM on the real model: `tmem serve` against vLLM's own OpenAI server, and update lag.

    python -m tmem.bench.serving_bench --out DIR [--model DIR] [--session-turns 4] [--think 5] [--skip-vllm]

The two servers run one after the other, never together (a small machine has no cores to spare).

- **Stateless, ours vs vLLM** (concurrency 1 and 8): the same load (the client resends the history; same
  system message; temperature 1 with a seed per request), reported as ratios ours/vLLM (goals: TTFT ≤ 1.05,
  throughput ≥ 0.95).
- **Update lag** (1, 4 and 8 sessions chatting at once, each pausing `--think` seconds between turns as a
  person does): turn end (last SSE byte) → the update that absorbed the turn committed its new version,
  p50/p95, the share of turns that got a new version, and each update's seconds per stage (queued,
  extract, summary, train from the session's `last_update.timings`; commit and hot swap from /metrics).
- **TTFT while others update:** a probe session (nothing recorded) asks short questions while idle, then
  while the 8 sessions chat and update; the ratio is the cost of training beside serving.

Progress goes to stderr; stdout gets the tables and, last, one JSON line of headline figures.
results.json and serving_bench.png go to --out. The default model is the real demo model
(`tmem demo-model`); `--model .cache/tiny-model` gives a fast smoke run on the random tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tmem.bench import loadtest_report as report
from tmem.bench.harness import bench_parser, pyplot, save_figure
from tmem.bench.loadtest import run_target, send_turn
from tmem.bench.loadtest_report import LoadConfig, RequestRecord, Target, build_plan, load_conversations, quantiles
from tmem.bench.processes import HttpServer, tmem_command
from tmem.server.redis_proc import free_port

CONCURRENCIES = (1, 8)  # stateless runs, ours and vLLM
SESSION_CONCURRENCIES = (1, 4, 8)  # sessions chatting at once, for the update lag
# From each update's own report; commit and the hot swap come from /metrics.
STAGES = ("queued", "extract", "summary", "train_wait", "train")
PROBE_PROMPT = "Name three colours."
SYSTEM = "You are a helpful assistant."  # sent to both servers so their prompts are built alike
ENGINE_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.25", "--max-model-len", "2048"]
PLOT_FILE = "serving_bench.png"


def ours_command(model: Path, port: int, out: Path, extra: Sequence[str] = ()) -> list[str]:
    return tmem_command("serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(port), *ENGINE_FLAGS,
                        "--context-tokens", "1536", "--update-policy", "every-turn", "--redis-data-dir",
                        str(out / "redis"), "--a0-cache-dir", str(out / "a0"), *extra)


def vllm_command(model: Path, port: int) -> list[str]:
    # The engine settings ours uses (server/engine.py): LoRA on, 8 resident adapters, eager mode.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--enable-lora",
            "--max-lora-rank", "8", "--max-loras", "8", "--max-cpu-loras", "64", "--enforce-eager", *ENGINE_FLAGS,
            "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]


def load_config(sessions: bool, concurrency: int, args: argparse.Namespace) -> LoadConfig:
    """Stateless: 4 conversations per concurrency slot. Sessions: one per slot, all chatting at once."""
    # Sampled, with a seed per request: replies as a chat client gets them, yet reproducible and the same
    # on both servers (same engine, same seeds), so both generate the same number of tokens.
    n_sessions = concurrency if sessions else max(8, 4 * concurrency)
    return LoadConfig(sessions=n_sessions, turns=args.session_turns if sessions else args.turns,
                      concurrency=concurrency, duration_s=args.duration, max_tokens=args.max_tokens,
                      temperature=1.0, seed=0, lag_timeout_s=args.lag_timeout, warmup=2, system=SYSTEM,
                      think_s=args.think if sessions else 0.0)


def measure(url: str, label: str, sessions: bool, concurrency: int, args: argparse.Namespace,
            probe: bool = False) -> dict[str, Any]:
    """One load run (loadtest's engine) → its summary; with `probe`, TTFTs of a bystander session during it."""
    cfg = load_config(sessions, concurrency, args)
    plan = build_plan(load_conversations(report.DEFAULT_PROMPTS), cfg.sessions, cfg.turns)
    result, probe_ttfts = asyncio.run(_run_with_probe(Target(label, url, sessions=sessions), cfg, plan, probe))
    summary = report.summarize(result, max_error_rate=0.0)
    summary["concurrency"] = concurrency
    summary["loadavg_1m"] = os.getloadavg()[0]  # a shared machine's other work skews every figure: show it
    if sessions:
        summary["stages_s"] = stage_breakdown(summary["rows"])
        summary["server_stages_s"] = server_stage_means(result.metrics_before, result.metrics_after)
    if probe:
        summary["probe_ttft_s"] = quantiles(probe_ttfts)
    return summary


async def _run_with_probe(target: Target, cfg: LoadConfig, plan: list[list[str]],
                          probe: bool) -> tuple[Any, list[float]]:
    stop = asyncio.Event()
    task = asyncio.create_task(probe_ttfts(target.url, stop)) if probe else None
    try:
        result = await run_target(target, cfg, plan, uuid.uuid4().hex[:8])
    finally:
        stop.set()
    return result, (await task) if task else []


async def probe_ttfts(url: str, stop: asyncio.Event | None = None, count: int = 8,
                      interval_s: float = 1.0) -> list[float]:
    """TTFT of a bystander session asking a short question: `count` times, or until `stop` is set."""
    sid = f"bench-probe-{uuid.uuid4().hex[:8]}"
    ttfts: list[float] = []
    body = {"messages": [{"role": "user", "content": PROBE_PROMPT}], "max_tokens": 8, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    # X-TMEM-Record false: the probe must not queue updates of its own.
    headers = {"X-Session-ID": sid, "X-TMEM-Record": "false"}
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        while (stop is None and len(ttfts) < count) or (stop is not None and not stop.is_set()):
            rec = RequestRecord("probe", 0, len(ttfts), sid, start=0.0)
            await send_turn(client, body, headers, rec, time.perf_counter(), 120)
            if rec.ok and rec.ttft is not None:
                ttfts.append(rec.ttft)
            await asyncio.sleep(interval_s)
        with contextlib.suppress(httpx.HTTPError):
            await client.delete(f"/v1/sessions/{sid}")
    return ttfts


def stage_breakdown(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each stage's seconds over the turns that got a new version (one update may absorb several turns)."""
    timed = [row["update_timings"] for row in rows if row.get("update_timings")]
    return {stage: quantiles(t.get(stage, 0.0) for t in timed) for stage in STAGES}


def server_stage_means(before: str | None, after: str | None) -> dict[str, float | None]:
    """Mean seconds of the worker's stages and of a hot swap over the run, from the server's histograms
    (an older server's `extract` included the summary)."""
    means: dict[str, float | None] = {}
    stages = [(stage, "tmem_update_seconds", stage) for stage in ("extract", "train", "commit")]
    for label, name, stage in [*stages, ("swap", "tmem_hot_swap_seconds", None)]:
        count = _sample(after, f"{name}_count", stage) - _sample(before, f"{name}_count", stage)
        total = _sample(after, f"{name}_sum", stage) - _sample(before, f"{name}_sum", stage)
        means[label] = total / count if count else None
    return means


def _sample(text: str | None, name: str, stage: str | None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    if not text:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and (stage is None or s.labels.get("stage") == stage))


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Ours (stateless, then sessions at 1/4/8 with the idle and loaded probe), then vLLM (stateless)."""
    model = ensure_model(args.model)
    out: Path = args.out
    runs: list[dict[str, Any]] = []
    port = free_port()
    with HttpServer("tmem", ours_command(model, port, out, args.server_flag), port, out / "tmem.log") as ours:
        runs += [measure(ours.url, "ours", False, c, args) for c in CONCURRENCIES]
        idle = quantiles(asyncio.run(probe_ttfts(ours.url)))
        busiest = max(SESSION_CONCURRENCIES)
        runs += [measure(ours.url, "ours-sessions", True, c, args, probe=c == busiest) for c in SESSION_CONCURRENCIES]
    if not args.skip_vllm:
        port = free_port()
        with HttpServer("vllm", vllm_command(model, port), port, out / "vllm.log") as theirs:
            runs += [measure(theirs.url, "vllm", False, c, args) for c in CONCURRENCIES]
    return {"runs": runs, "probe_idle_ttft_s": idle}


def ensure_model(model: Path) -> Path:
    if (model / "config.json").exists():
        return model
    if model.name == "tiny-model":
        from tmem.adapters.tiny_model import build_tiny_model

        print(f"building the tiny model in {model}", file=sys.stderr)
        build_tiny_model(model)
    else:
        from tmem.adapters.demo_model import build_demo_model

        build_demo_model(model)
    return model


def _find(runs: list[dict[str, Any]], label: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in runs if r["label"] == label and r["concurrency"] == concurrency), None)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the issues ask for: ratios ours/vLLM (stateless), update lag per load, TTFT under updates."""
    runs = results["runs"]
    figures: dict[str, Any] = {"bench": "serving"}
    for c in CONCURRENCIES:
        ours, theirs = _find(runs, "ours", c), _find(runs, "vllm", c)
        r = report.ratios(ours, theirs) if ours and theirs else {}
        figures[f"ttft_ratio_c{c}"] = _round(r.get("ttft_p50"))
        figures[f"throughput_ratio_c{c}"] = _round(r.get("output_tok_per_s"))
    for c in SESSION_CONCURRENCIES:
        run = _find(runs, "ours-sessions", c)
        if run is None:
            continue
        lag = run["update_lag_s"]
        figures[f"lag_p50_s{c}"], figures[f"lag_p95_s{c}"] = _round(lag["p50"]), _round(lag["p95"])
        figures[f"new_version_share_s{c}"] = _round(lag["new_version"] / run["requests"]["sent"]
                                                    if run["requests"]["sent"] else None)
        if "probe_ttft_s" in run:
            idle, busy = results["probe_idle_ttft_s"]["p50"], run["probe_ttft_s"]["p50"]
            figures["probe_ttft_idle_ms"] = _round(idle * 1000 if idle else None)
            figures[f"probe_ttft_ratio_s{c}"] = _round(busy / idle if busy and idle else None)
    return figures


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def format_table(results: dict[str, Any], figures: dict[str, Any]) -> str:
    """Every run in one table, the ratios, then the update lag and where it goes."""
    head = f"{'run':<15}{'conc':>5}{'req':>5}{'err':>5}{'prompt':>8}{'TTFT p50':>10}{'TTFT p95':>10}"
    head += f"{'TPOT p50':>10}{'E2E p50':>10}{'tok/s':>9}{'lag p50':>9}{'lag p95':>9}{'new v':>7}{'load':>6}"
    lines = [head + "   (times in ms, lag in s, new v: turns that got a new version, load: 1-min load average)"]
    for run in results["runs"]:
        lag = run["update_lag_s"] if run["sessions"] else {"p50": None, "p95": None, "new_version": None}
        new_v = "-" if lag["new_version"] is None else f"{lag['new_version']}/{run['requests']['sent']}"
        lines.append(
            f"{run['label']:<15}{run['concurrency']:>5}{run['requests']['sent']:>5}{run['requests']['errors']:>5}"
            f"{_num(run['prompt_tokens_mean'], 1, 0):>8}{_num(run['ttft_s']['p50'], 1000):>10}"
            f"{_num(run['ttft_s']['p95'], 1000):>10}{_num(run['tpot_s']['p50'], 1000):>10}"
            f"{_num(run['e2e_s']['p50'], 1000):>10}{run['output_tok_per_s']:>9.1f}"
            f"{_num(lag['p50'], 1, 2):>9}{_num(lag['p95'], 1, 2):>9}{new_v:>7}{run['loadavg_1m']:>6.1f}")
    lines.append("")
    for c in CONCURRENCIES:
        lines.append(f"ours/vLLM at concurrency {c}: TTFT p50 {_num(figures.get(f'ttft_ratio_c{c}'), 1, 3)}"
                     f" (goal <= 1.05), throughput {_num(figures.get(f'throughput_ratio_c{c}'), 1, 3)} (goal >= 0.95)")
    server = ("extract", "train", "commit", "swap")
    lines += ["", f"{'sessions':<10}" + "".join(f"{s + ' p50':>13}" for s in STAGES)
              + "".join(f"{s + ' mean':>14}" for s in server)
              + "   (seconds per update: p50 of the updates' own timings; means from /metrics)"]
    for c in SESSION_CONCURRENCIES:
        run = _find(results["runs"], "ours-sessions", c)
        if run is None:
            continue
        cells = [f"{_num(run['stages_s'][s]['p50'], 1, 2):>13}" for s in STAGES]
        cells += [f"{_num(run['server_stages_s'][s], 1, 3):>14}" for s in server]
        lines.append(f"{c:<10}" + "".join(cells))
    busiest = max(SESSION_CONCURRENCIES)
    lines.append(f"\nprobe session TTFT p50: idle {_num(figures.get('probe_ttft_idle_ms'), 1, 1)} ms, while {busiest}"
                 f" sessions chat and update {_num(figures.get(f'probe_ttft_ratio_s{busiest}'), 1, 2)}x idle"
                 " (goal <= 1.5)")
    lines.append("update lag goals: p95 <= 5 s with 1 session"
                 f" (got {_num(figures.get('lag_p95_s1'), 1, 2)}), <= 15 s with 8 (got"
                 f" {_num(figures.get('lag_p95_s8'), 1, 2)})")
    return "\n".join(lines)


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def write_plot(out: Path, results: dict[str, Any]) -> Path:
    """TTFT p50 and throughput per stateless run, lag p50/p95 per load, and the stages of an update."""
    plt = pyplot()
    import numpy as np

    runs = results["runs"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    labels = [label for label in ("ours", "vllm") if any(r["label"] == label for r in runs)]
    x = np.arange(len(CONCURRENCIES))
    width = 0.8 / max(1, len(labels))
    for j, label in enumerate(labels):
        found = [_find(runs, label, c) for c in CONCURRENCIES]
        axes[0].bar(x + j * width, [r["ttft_s"]["p50"] * 1000 if r and r["ttft_s"]["p50"] else 0 for r in found],
                    width, label=label)
        axes[1].bar(x + j * width, [r["output_tok_per_s"] if r else 0 for r in found], width, label=label)
    for ax, title, unit in ((axes[0], "stateless TTFT p50", "ms"), (axes[1], "stateless throughput", "tokens/s")):
        ax.set(title=title, ylabel=unit, xticks=x + width * (len(labels) - 1) / 2,
               xticklabels=[f"concurrency {c}" for c in CONCURRENCIES])
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    sessions = [r for r in runs if r["label"] == "ours-sessions"]
    names = [str(r["concurrency"]) for r in sessions]
    for q, offset in (("p50", -0.2), ("p95", 0.2)):
        axes[2].bar(np.arange(len(sessions)) + offset, [r["update_lag_s"][q] or 0 for r in sessions], 0.4, label=q)
    axes[2].axhline(5, color="grey", ls=":")
    axes[2].axhline(15, color="grey", ls="--")
    axes[2].set(title="update lag (goals: 5 s at 1, 15 s at 8)", xlabel="sessions chatting at once",
                ylabel="seconds", xticks=np.arange(len(sessions)), xticklabels=names)
    axes[2].legend()
    bottom = np.zeros(len(sessions))
    for stage in STAGES:
        values = np.array([r["stages_s"][stage]["p50"] or 0 for r in sessions])
        axes[3].bar(names, values, bottom=bottom, label=stage)
        bottom += values
    axes[3].set(title="update stages (p50)", xlabel="sessions chatting at once", ylabel="seconds")
    axes[3].legend()
    return save_figure(fig, out / PLOT_FILE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("serving_bench", __doc__, model=Path(".cache/demo-model"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="user turns per stateless conversation")
    parser.add_argument("--session-turns", type=int, default=4, help="user turns per chatting session")
    parser.add_argument("--think", type=float, default=5.0, help="seconds a session pauses between its turns")
    parser.add_argument("--duration", type=float, default=300.0, help="cap of each run's load phase, seconds")
    parser.add_argument("--lag-timeout", type=float, default=300.0, help="wait for each turn's update, seconds")
    parser.add_argument("--skip-vllm", action="store_true", help="ours only (no ratios)")
    parser.add_argument("--server-flag", action="append", default=[], help="extra `tmem serve` flag (repeatable)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_all(args)
    figures = headline(results)
    plot = write_plot(args.out, results)
    (args.out / "results.json").write_text(json.dumps({"headline": figures, **results}, indent=1))
    print(format_table(results, figures))
    print(f"results: {args.out / 'results.json'}  plot: {plot}")
    print(json.dumps(figures))
    failed = sum(run["requests"]["errors"] for run in results["runs"])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
