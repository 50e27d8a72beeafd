"""Serving cost of TMEM: `tmem serve` against vLLM's own OpenAI server on the same model, plus update lag and hot swap.

    python -m bench.serving_bench --out DIR [--model DIR] [--max-tokens 64] [--turns 3] [--skip-vllm]

The two servers run one after the other, never together (a small machine has no cores to spare). At
concurrency 1 and 8 each gets the same stateless load (the client resends the history; same system
message; temperature 1 with a seed per request): that is the fair comparison, reported as ratios
ours/vLLM (the goal: TTFT ≤ 1.05, throughput ≥ 0.95). Ours then runs the same conversations as sessions
(every-turn updates training beside serving), which gives the update lag, and a hot-swap probe teaches
a pair, flushes and chats, because the random tiny model's extraction finds nothing to learn in chat
turns and so never makes a new adapter version on its own. Progress goes to stderr; stdout gets the
table and, last, one JSON line of headline figures. results.json and serving_bench.png go to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench import loadtest_report as report
from bench.loadtest import run_target, send_turn
from bench.loadtest_report import LoadConfig, RequestRecord, Target, build_plan, load_conversations, quantiles
from server.redis_proc import free_port

CONCURRENCIES = (1, 8)
SYSTEM = "You are a helpful assistant."  # sent to both servers so their prompts are built alike
ENGINE_FLAGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.08", "--max-model-len", "2048"]
PLOT_FILE = "serving_bench.png"


class ManagedServer:
    """A server subprocess in its own process group, logging to a file, healthy before `__enter__` returns."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ManagedServer:
        print(f"starting {self.name}: {' '.join(self.cmd)}", file=sys.stderr)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"{self.name} was not healthy within 600 s; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        # The whole group: vLLM's engine core and worker are children of the server.
        _signal_group(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        # A vLLM worker can outlive the server it belongs to: ask what is left once more, then force it.
        if _signal_group(self.proc.pid, signal.SIGTERM):
            time.sleep(5)
        _signal_group(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal the process group; False when it is already empty (also if it empties meanwhile)."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def ours_command(model: Path, port: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), *ENGINE_FLAGS, "--context-tokens", "1536", "--update-policy", "every-turn",
            "--redis-data-dir", str(out / "redis"), "--a0-cache-dir", str(out / "a0")]


def vllm_command(model: Path, port: int) -> list[str]:
    # The engine settings ours uses (server/engine.py): LoRA on, 8 resident adapters, eager mode.
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--enable-lora",
            "--max-lora-rank", "8", "--max-loras", "8", "--max-cpu-loras", "64", "--enforce-eager", *ENGINE_FLAGS,
            "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]


def measure(url: str, label: str, sessions: bool, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    """One load run (loadtest's engine) → its summary; 4 sessions per concurrency slot, at least 8."""
    n_sessions = max(8, 4 * concurrency)
    # Sampled, with a seed per request: replies as a chat client gets them, yet reproducible and the same
    # on both servers (same engine, same seeds), so both generate the same number of tokens.
    cfg = LoadConfig(sessions=n_sessions, turns=args.turns, concurrency=concurrency, duration_s=args.duration,
                     max_tokens=args.max_tokens, temperature=1.0, seed=0, lag_timeout_s=args.lag_timeout,
                     warmup=2, system=SYSTEM)
    plan = build_plan(load_conversations(report.DEFAULT_PROMPTS), n_sessions, args.turns)
    result = asyncio.run(run_target(Target(label, url, sessions=sessions), cfg, plan, uuid.uuid4().hex[:8]))
    summary = report.summarize(result, max_error_rate=0.0)
    summary["concurrency"] = concurrency
    summary["loadavg_1m"] = os.getloadavg()[0]  # a shared machine's other work skews every figure: show it
    return summary


def hot_swap_probe(url: str, sessions: int = 4, rounds: int = 2) -> dict[str, Any]:
    """Teach one pair, flush (a new version), then chat: the chat loads the version into the engine."""
    return asyncio.run(_probe(url, sessions, rounds))


async def _probe(url: str, sessions: int, rounds: int) -> dict[str, Any]:
    teach_to_live: list[float] = []
    ttft_after_swap: list[float | None] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, trust_env=False) as client:
        for i in range(sessions):
            sid = f"bench-hs-{uuid.uuid4().hex[:8]}-{i}"
            for r in range(rounds):
                pair = {"instruction": f"What is fact {r} of session {i}?", "output": f"Fact {r} is {i * 7 + r}."}
                started = time.perf_counter()
                (await client.post(f"/v1/sessions/{sid}/memories", json={"pairs": [pair]})).raise_for_status()
                (await client.post(f"/v1/sessions/{sid}/flush", json={"timeout": 300})).raise_for_status()
                teach_to_live.append(time.perf_counter() - started)
                rec = RequestRecord("probe", i, r, sid, start=0.0)
                body = {"messages": [{"role": "user", "content": "What do you know?"}], "max_tokens": 8,
                        "stream": True, "stream_options": {"include_usage": True}}
                # X-TMEM-Record false: the probe must not queue an update that races the next round's flush.
                await send_turn(client, body, {"X-Session-ID": sid, "X-TMEM-Record": "false"}, rec, started, 120)
                if not rec.ok:
                    raise RuntimeError(f"hot-swap probe chat failed: {rec.error} {rec.error_message}")
                ttft_after_swap.append(rec.ttft)
            (await client.delete(f"/v1/sessions/{sid}")).raise_for_status()
        metrics = (await client.get("/metrics")).text
    swap = report.server_histograms(None, metrics).get("hot_swap", {})
    return {"hot_swap_s": swap, "teach_to_live_s": quantiles(teach_to_live),
            "ttft_after_swap_s": quantiles(ttft_after_swap)}


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Ours (stateless, sessions, hot-swap probe), then vLLM (stateless), one server at a time."""
    model = ensure_model(args.model)
    out: Path = args.out
    runs: list[dict[str, Any]] = []
    port = free_port()
    with ManagedServer("tmem", ours_command(model, port, out), port, out / "tmem.log") as ours:
        runs += [measure(ours.url, "ours", False, c, args) for c in CONCURRENCIES]
        runs += [measure(ours.url, "ours-sessions", True, c, args) for c in CONCURRENCIES]
        probe = hot_swap_probe(ours.url)
    if not args.skip_vllm:
        port = free_port()
        with ManagedServer("vllm", vllm_command(model, port), port, out / "vllm.log") as theirs:
            runs += [measure(theirs.url, "vllm", False, c, args) for c in CONCURRENCIES]
    return {"runs": runs, "probe": probe}


def ensure_model(model: Path) -> Path:
    if not (model / "config.json").exists():
        from adapters.tiny_model import build_tiny_model

        print(f"building the tiny model in {model}", file=sys.stderr)
        build_tiny_model(model)
    return model


def _find(runs: list[dict[str, Any]], label: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in runs if r["label"] == label and r["concurrency"] == concurrency), None)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue asks for: ratios ours/vLLM (stateless), update lag, hot swap."""
    runs = results["runs"]
    figures: dict[str, Any] = {"bench": "serving"}
    for c in CONCURRENCIES:
        ours, theirs = _find(runs, "ours", c), _find(runs, "vllm", c)
        r = report.ratios(ours, theirs) if ours and theirs else {}
        figures[f"ttft_ratio_c{c}"] = _round(r.get("ttft_p50"))
        figures[f"ttft_p95_ratio_c{c}"] = _round(r.get("ttft_p95"))
        figures[f"throughput_ratio_c{c}"] = _round(r.get("output_tok_per_s"))
    # every session turn of both concurrencies: the lag a user of a loaded server sees
    lags = quantiles(row["update_lag"] for run in runs if run["label"] == "ours-sessions" for row in run["rows"])
    figures["update_lag_p50_s"] = _round(lags["p50"])
    figures["update_lag_p95_s"] = _round(lags["p95"])
    figures["hot_swap_p50_s"] = _round(results["probe"]["hot_swap_s"].get("p50"))
    figures["hot_swap_mean_s"] = _round(results["probe"]["hot_swap_s"].get("mean"))
    return figures


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def format_table(results: dict[str, Any], figures: dict[str, Any]) -> str:
    """Every run in one table, then the ratios, the lag and the hot swap."""
    head = f"{'run':<15}{'conc':>5}{'req':>5}{'err':>5}{'prompt':>8}{'TTFT p50':>10}{'TTFT p95':>10}"
    head += f"{'TPOT p50':>10}{'E2E p50':>10}{'tok/s':>9}{'lag p50':>9}{'lag p95':>9}{'load':>6}"
    lines = [head + "   (times in ms, lag in s, load: 1-min load average after the run)"]
    for run in results["runs"]:
        lag = run["update_lag_s"] if run["sessions"] else {"p50": None, "p95": None}
        lines.append(
            f"{run['label']:<15}{run['concurrency']:>5}{run['requests']['sent']:>5}{run['requests']['errors']:>5}"
            f"{_num(run['prompt_tokens_mean'], 1, 0):>8}{_num(run['ttft_s']['p50'], 1000):>10}"
            f"{_num(run['ttft_s']['p95'], 1000):>10}{_num(run['tpot_s']['p50'], 1000):>10}"
            f"{_num(run['e2e_s']['p50'], 1000):>10}{run['output_tok_per_s']:>9.1f}"
            f"{_num(lag['p50'], 1, 2):>9}{_num(lag['p95'], 1, 2):>9}{run['loadavg_1m']:>6.1f}")
    lines.append("")
    for c in CONCURRENCIES:
        lines.append(f"ours/vLLM at concurrency {c}: TTFT p50 {_num(figures[f'ttft_ratio_c{c}'], 1, 3)}"
                     f" (goal <= 1.05), TTFT p95 {_num(figures[f'ttft_p95_ratio_c{c}'], 1, 3)},"
                     f" throughput {_num(figures[f'throughput_ratio_c{c}'], 1, 3)} (goal >= 0.95)")
    probe = results["probe"]
    swap = probe["hot_swap_s"]
    lines.append(f"update lag (session runs, every-turn): p50 {_num(figures['update_lag_p50_s'], 1, 2)} s,"
                 f" p95 {_num(figures['update_lag_p95_s'], 1, 2)} s")
    lines.append(f"hot swap (/metrics, {swap.get('count', 0):.0f} loads): mean {_num(swap.get('mean'), 1000)} ms,"
                 f" p50 {_num(swap.get('p50'), 1000)} ms (bucket-interpolated);"
                 f" teach→flush→live p50 {_num(probe['teach_to_live_s']['p50'], 1, 2)} s;"
                 f" TTFT right after a swap p50 {_num(probe['ttft_after_swap_s']['p50'], 1000)} ms")
    return "\n".join(lines)


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def write_plot(out: Path, results: dict[str, Any]) -> Path:
    """TTFT p50/p95 and throughput per run and concurrency, and the update-lag histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = results["runs"]
    labels = sorted({r["label"] for r in runs}, key=["ours", "ours-sessions", "vllm"].index)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(CONCURRENCIES))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        found = [_find(runs, label, c) for c in CONCURRENCIES]
        ttft = [run["ttft_s"]["p50"] * 1000 if run and run["ttft_s"]["p50"] else 0 for run in found]
        tps = [run["output_tok_per_s"] if run else 0 for run in found]
        axes[0].bar(x + j * width, ttft, width, label=label)
        axes[1].bar(x + j * width, tps, width, label=label)
    for ax, title, unit in ((axes[0], "TTFT p50", "ms"), (axes[1], "output throughput", "tokens/s")):
        ax.set(title=title, ylabel=unit, xticks=x + width * (len(labels) - 1) / 2,
               xticklabels=[f"concurrency {c}" for c in CONCURRENCIES])
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
    lags = [row["update_lag"] for run in runs if run["label"] == "ours-sessions" for row in run["rows"]
            if row["update_lag"] is not None]
    if lags:
        axes[2].hist(lags, bins=20)
    axes[2].set(title="update lag (session runs)", xlabel="seconds, turn end → update committed", ylabel="turns")
    fig.tight_layout()
    path = out / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_bench", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-model"), help="built here if missing")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--turns", type=int, default=3, help="user turns per conversation")
    parser.add_argument("--duration", type=float, default=120.0, help="cap of each run's load phase, seconds")
    parser.add_argument("--lag-timeout", type=float, default=300.0, help="wait for each turn's update, seconds")
    parser.add_argument("--skip-vllm", action="store_true", help="ours only (no ratios)")
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
