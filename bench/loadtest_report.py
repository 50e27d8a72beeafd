"""The data of a `tmem loadtest` run (prompt set, plan, records) and the table, report.json and plots made of it."""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from tmem.bench.harness import pyplot, save_figure

REPORT_FILE = "report.json"
DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
PLOT_FILES = {"latency": "latency_cdf.png", "throughput": "throughput.png", "lag": "update_lag.png"}
SERVER_HISTOGRAMS = {"hot_swap": "tmem_hot_swap_seconds", "update_lag": "tmem_update_lag_seconds"}


@dataclass
class RequestRecord:
    """One chat request as the client saw it: seconds, with `start` relative to the run's start."""

    run: str
    session: int
    turn: int
    session_id: str | None
    start: float
    status: int | None = None  # HTTP status; None when no response arrived at all
    error: str | None = None  # connect, timeout, http_<status>, stream_error, bad_event, incomplete, transport,
    #                           cancelled (cut off by the run's overall timeout)
    error_message: str | None = None
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the usage chunk, to check two servers saw prompts of one size
    adapter_version: int | None = None
    update_lag: float | None = None
    lag_status: str | None = None  # new_version | absorbed (nothing to learn) | timeout; None: not watched
    update_timings: dict[str, float] | None = None  # the absorbing update's seconds per stage (last_update.timings)
    chunk_times: list[float] = field(default_factory=list, repr=False)  # content chunks, from run start
    text: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def row(self) -> dict[str, Any]:
        """The JSON row of report.json (without the chunk times and the reply text)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("chunk_times", "text")}


@dataclass(frozen=True)
class LoadConfig:
    """How much load, how long, and how each request is shaped."""

    sessions: int = 4
    turns: int = 4
    concurrency: int = 2
    duration_s: float = 300.0
    max_requests: int | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None  # per request seed + 1000·session + turn: sampled replies alike on both servers
    request_timeout_s: float = 120.0
    lag_timeout_s: float = 120.0
    poll_interval_s: float = 0.5
    warmup: int = 1
    system: str | None = None
    progress: bool = True
    think_s: float = 0.0  # pause after each session turn, as a person reading and typing


@dataclass(frozen=True)
class Target:
    """One server to load: `sessions` says whether it keeps history (X-Session-ID) or the client resends it."""

    label: str
    url: str
    sessions: bool
    api_key: str | None = None
    model: str | None = None
    keep_sessions: bool = False


@dataclass
class RunResult:
    """Everything one run produced; `loadtest_report` turns it into figures."""

    target: Target
    model: str | None
    records: list[RequestRecord]
    duration_s: float
    lag_poll_errors: int = 0
    cleanup_errors: int = 0
    metrics_before: str | None = None
    metrics_after: str | None = None


def load_conversations(path: Path) -> list[list[str]]:
    """User turns of each conversation: ShareGPT (`conversations` of {from, value}) or our `turns` lists."""
    data = json.loads(Path(path).read_text())
    items = data.get("conversations", data) if isinstance(data, dict) else data
    conversations: list[list[str]] = []
    for item in items:
        if "turns" in item:
            turns = [str(t) for t in item["turns"]]
        else:  # ShareGPT: keep the human side only; the server under test writes the replies
            turns = [str(m["value"]) for m in item.get("conversations", []) if m.get("from") in ("human", "user")]
        if turns:
            conversations.append(turns)
    if not conversations:
        raise ValueError(f"{path}: no conversation with a user turn")
    return conversations


def build_plan(conversations: list[list[str]], sessions: int, turns: int) -> list[list[str]]:
    """Session i talks conversation i (cycling the set); a short conversation repeats its turns to reach `turns`."""
    plan = []
    for i in range(sessions):
        conv = conversations[i % len(conversations)]
        plan.append([conv[k % len(conv)] for k in range(turns)])
    return plan


def quantiles(values: Iterable[float | None]) -> dict[str, float | None]:
    """p50/p95/p99 and mean of the values that exist; all None when there are none."""
    data = np.array([v for v in values if v is not None], dtype=float)
    if data.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(data.mean()), "n": int(data.size)}


def throughput_timeline(records: Sequence[RequestRecord], bucket_s: float = 1.0) -> list[list[float]]:
    """[bucket start, output tokens/s] per bucket; a chunk's tokens are the request's tokens spread over its chunks."""
    buckets: defaultdict[int, float] = defaultdict(float)
    for rec in records:
        if rec.chunk_times:
            per_chunk = rec.output_tokens / len(rec.chunk_times)
            for t in rec.chunk_times:
                buckets[int(t // bucket_s)] += per_chunk
    if not buckets:
        return []
    return [[i * bucket_s, buckets.get(i, 0) / bucket_s] for i in range(max(buckets) + 1)]


def summarize(result: RunResult, max_error_rate: float) -> dict[str, Any]:
    """Every figure of one run, plus its per-request rows."""
    recs = result.records
    ok = [r for r in recs if r.ok]
    errors = Counter(r.error for r in recs if not r.ok)
    tokens = sum(r.output_tokens for r in ok)
    lag_states = Counter(r.lag_status for r in recs if r.lag_status)
    sent = len(recs)
    error_rate = (sent - len(ok)) / sent if sent else 0.0
    return {
        "label": result.target.label, "url": result.target.url, "model": result.model,
        "sessions": result.target.sessions, "duration_s": result.duration_s,
        "requests": {"sent": sent, "ok": len(ok), "errors": sent - len(ok),
                     "by_status": dict(Counter(str(r.status) if r.status else "no_response" for r in recs)),
                     "errors_by_kind": dict(errors)},
        "error_rate": error_rate, "passed": error_rate <= max_error_rate and sent > 0,
        "ttft_s": quantiles(r.ttft for r in ok), "tpot_s": quantiles(r.tpot for r in ok),
        "e2e_s": quantiles(r.e2e for r in ok),
        "output_tokens": tokens,
        "prompt_tokens_mean": quantiles(r.prompt_tokens for r in ok)["mean"],
        "output_tok_per_s": tokens / result.duration_s if result.duration_s > 0 else 0.0,
        "requests_per_s": len(ok) / result.duration_s if result.duration_s > 0 else 0.0,
        "update_lag_s": {**quantiles(r.update_lag for r in recs),
                         "measured": lag_states["new_version"] + lag_states["absorbed"],
                         "new_version": lag_states["new_version"], "timed_out": lag_states["timeout"],
                         "poll_errors": result.lag_poll_errors},
        "cleanup_errors": result.cleanup_errors,
        "server_metrics": server_histograms(result.metrics_before, result.metrics_after),
        "throughput_timeline": throughput_timeline(recs),
        "rows": [r.row() for r in recs],
    }


def ratios(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float | None]:
    """ours / theirs: above 1 is slower for latencies, faster for throughput."""

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "ttft_p50": div(ours["ttft_s"]["p50"], theirs["ttft_s"]["p50"]),
        "ttft_p95": div(ours["ttft_s"]["p95"], theirs["ttft_s"]["p95"]),
        "e2e_p50": div(ours["e2e_s"]["p50"], theirs["e2e_s"]["p50"]),
        "output_tok_per_s": div(ours["output_tok_per_s"], theirs["output_tok_per_s"]),
    }


def write_report(out: Path, results: Sequence[RunResult], cfg: LoadConfig, run_id: str,
                 max_error_rate: float) -> dict[str, Any]:
    """report.json + PNGs in `out`; returns the report. The first run's figures are also at the top level."""
    out.mkdir(parents=True, exist_ok=True)
    runs = [summarize(r, max_error_rate) for r in results]
    doc: dict[str, Any] = {
        "tool": "tmem-loadtest", "run_id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(cfg), **runs[0],
        "compare": runs[1] if len(runs) > 1 else None,
        "ratios": ratios(runs[0], runs[1]) if len(runs) > 1 else None,
        "passed": all(run["passed"] for run in runs),
    }
    doc["plots"] = [str(p) for p in write_plots(out, runs)]
    (out / REPORT_FILE).write_text(json.dumps(doc, indent=1))
    return doc


# --- the table -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_run(run: dict[str, Any]) -> str:
    """One run as a plain-text table."""
    req = run["requests"]
    by_status = " ".join(f"{k}={v}" for k, v in sorted(run["requests"]["by_status"].items()))
    kinds = " ".join(f"{k}={v}" for k, v in sorted(req["errors_by_kind"].items())) or "none"
    lines = [
        f"run {run['label']}: {run['url']}  sessions={'on' if run['sessions'] else 'off'}  "
        f"{run['duration_s']:.1f}s",
        f"requests: sent {req['sent']}  ok {req['ok']}  errors {req['errors']}  "
        f"(error rate {run['error_rate']:.1%})",
        f"by status: {by_status or '-'}   errors by kind: {kinds}",
        f"{'metric':<12}{'p50':>10}{'p95':>10}{'p99':>10}",
    ]
    for name, key in (("TTFT ms", "ttft_s"), ("TPOT ms", "tpot_s"), ("E2E ms", "e2e_s")):
        q = run[key]
        lines.append(f"{name:<12}{_ms(q['p50']):>10}{_ms(q['p95']):>10}{_ms(q['p99']):>10}")
    lines.append(f"output: {run['output_tokens']} tokens, {run['output_tok_per_s']:.1f} tok/s, "
                 f"{run['requests_per_s']:.2f} req/s")
    if run["sessions"]:
        lag = run["update_lag_s"]
        lines.append(f"update lag s: p50 {_s(lag['p50'])}  p95 {_s(lag['p95'])}  "
                     f"(measured {lag['measured']}, {lag['new_version']} with a new version; "
                     f"timed out {lag['timed_out']}; poll errors {lag['poll_errors']})")
    for label, hist in run["server_metrics"].items():
        lines.append(f"server {label} s (/metrics): mean {_s(hist['mean'])}  p50 {_s(hist['p50'])}  "
                     f"p95 {_s(hist['p95'])}  (n={hist['count']:.0f})")
    return "\n".join(lines)


def format_comparison(ours: dict[str, Any], theirs: dict[str, Any], r: dict[str, float | None]) -> str:
    """The two runs side by side with ours/theirs."""

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [
        ("TTFT p50 ms", _ms(ours["ttft_s"]["p50"]), _ms(theirs["ttft_s"]["p50"]), ratio(r["ttft_p50"])),
        ("TTFT p95 ms", _ms(ours["ttft_s"]["p95"]), _ms(theirs["ttft_s"]["p95"]), ratio(r["ttft_p95"])),
        ("E2E p50 ms", _ms(ours["e2e_s"]["p50"]), _ms(theirs["e2e_s"]["p50"]), ratio(r["e2e_p50"])),
        ("output tok/s", f"{ours['output_tok_per_s']:.1f}", f"{theirs['output_tok_per_s']:.1f}",
         ratio(r["output_tok_per_s"])),
        ("errors", str(ours["requests"]["errors"]), str(theirs["requests"]["errors"]), ""),
    ]
    lines = [f"{'':<14}{'ours':>12}{'theirs':>12}{'ours/theirs':>13}"]
    lines += [f"{a:<14}{b:>12}{c:>12}{d:>13}" for a, b, c, d in rows]
    return "\n".join(lines)


def format_report(doc: dict[str, Any]) -> str:
    parts = [format_run(doc)]
    if doc["compare"] is not None:
        parts += [format_run(doc["compare"]), format_comparison(doc, doc["compare"], doc["ratios"])]
    parts.append(f"passed: {doc['passed']}")
    return "\n\n".join(parts)


# --- plots -----------------------------------------------------------------------------------


def write_plots(out: Path, runs: Sequence[dict[str, Any]]) -> list[Path]:
    """Latency CDFs (TTFT, E2E), output tokens/s over time, and the update-lag histogram."""
    plt = pyplot()

    paths = [out / PLOT_FILES[name] for name in ("latency", "throughput", "lag")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft", "TTFT"), (axes[1], "e2e", "end-to-end latency")):
        for run in runs:
            values = np.sort([row[key] for row in run["rows"] if row["error"] is None and row[key] is not None])
            if values.size:
                ax.step(values * 1000, np.arange(1, values.size + 1) / values.size, where="post", label=run["label"])
        ax.set(title=f"{title} CDF", xlabel="ms", ylabel="fraction of requests")
        _finish(ax)
    save_figure(fig, paths[0])

    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        timeline = np.array(run["throughput_timeline"], dtype=float).reshape(-1, 2)
        if len(timeline):  # one stair per bucket: the edges are the bucket starts plus the last end
            edges = np.append(timeline[:, 0], timeline[-1, 0] + 1.0)
            ax.stairs(timeline[:, 1], edges, label=run["label"])
    ax.set(title="output throughput", xlabel="seconds since start", ylabel="tokens/s")
    _finish(ax)
    save_figure(fig, paths[1])

    fig, ax = plt.subplots(figsize=(6, 4))
    lags = [row["update_lag"] for row in runs[0]["rows"] if row["update_lag"] is not None]
    if lags:
        ax.hist(lags, bins=min(30, max(5, len(lags) // 2)))
    else:
        ax.text(0.5, 0.5, "no update lag measured", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=f"update lag ({runs[0]['label']})", xlabel="seconds (turn end → new adapter live)",
           ylabel="turns")
    save_figure(fig, paths[2])
    return paths


def _finish(ax: Any) -> None:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    else:  # every request failed: say so rather than leave an empty frame
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)


# --- Prometheus histograms -------------------------------------------------------------------


def histogram_buckets(text: str | None, name: str) -> dict[float, float]:
    """Cumulative counts by upper bound of one histogram, summed over its other labels."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: defaultdict[float, float] = defaultdict(float)
    if not text:
        return {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                buckets[float(sample.labels["le"])] += sample.value
    return dict(buckets)


def histogram_sum(text: str | None, name: str) -> float:
    """The histogram's `_sum` (all observations added up), summed over its labels; 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    if not text:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == f"{name}_sum")


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket that holds the q-th observation."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the last finite bound: its bound is the best estimate
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def server_histograms(before: str | None, after: str | None) -> dict[str, dict[str, float | None]]:
    """The server's hot-swap and update-lag histograms over the run (after − before); empty off TMEM."""
    found: dict[str, dict[str, float | None]] = {}
    for label, name in SERVER_HISTOGRAMS.items():
        end = histogram_buckets(after, name)
        if not end:
            continue
        start = histogram_buckets(before, name)
        delta = {le: count - start.get(le, 0.0) for le, count in end.items()}
        count = max(delta.values())
        total = histogram_sum(after, name) - histogram_sum(before, name)
        found[label] = {"count": count, "mean": total / count if count else None,
                        "p50": histogram_quantile(0.5, delta), "p95": histogram_quantile(0.95, delta)}
    return found
