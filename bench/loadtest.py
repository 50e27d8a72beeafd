"""`tmem loadtest`: multi-turn session load against a TMEM server, optionally compared with a plain one.

    tmem loadtest --url http://127.0.0.1:8000 --sessions 8 --turns 4 --concurrency 4 --out out/lt \\
        [--duration 300] [--max-requests R] [--compare-url http://127.0.0.1:8001] [--prompts FILE] \\
        [--max-tokens 64] [--api-key K] [--model NAME] [--no-sessions] [--keep-sessions]

Each session is one conversation of the prompt set. With sessions on, a request carries only the new
user message and `X-Session-ID`, because the server keeps the history; without (`--no-sessions`, and
always for `--compare-url`) the client resends the whole conversation, as any stateless client must.
Requests stream (SSE) so TTFT is exact. Errors are counted by kind, never dropped: the exit status is 1
when the error rate of any run exceeds `--max-error-rate` (default 0), else 0.

--out gets report.json (ttft_s / tpot_s / e2e_s quantiles, output_tok_per_s, requests by status and error
kind, update_lag_s, the server's own /metrics histograms over the run, a per-second throughput timeline and
one row per request; `compare` and `ratios` with --compare-url) and latency_cdf.png, throughput.png,
update_lag.png. Update lag: turn end (the last SSE byte) → the update that absorbed the turn committed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from tmem.bench import loadtest_report as report
from tmem.bench.loadtest_report import LoadConfig, RequestRecord, RunResult, Target, build_plan, load_conversations

VERSION_HEADER = "X-TMEM-Adapter-Version"
Message = dict[str, str]


class RequestBudget:
    """Stops new requests at the deadline or after `max_requests`, whichever comes first."""

    def __init__(self, duration_s: float, max_requests: int | None) -> None:
        self.deadline = time.perf_counter() + duration_s
        self.left = max_requests
        self.sent = 0

    def take(self) -> bool:
        # No await between check and update: asyncio tasks cannot race here.
        if time.perf_counter() >= self.deadline or (self.left is not None and self.sent >= self.left):
            return False
        self.sent += 1
        return True


async def send_turn(client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str],
                    rec: RequestRecord, t0: float, timeout_s: float) -> None:
    """Stream one chat completion into `rec`; every failure becomes an error kind, never an exception."""
    started = time.perf_counter()
    try:
        await asyncio.wait_for(_exchange(client, body, headers, rec, started, t0), timeout_s)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        rec.error, rec.error_message = "connect", str(exc) or type(exc).__name__
    except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
        rec.error, rec.error_message = "timeout", str(exc) or f"no complete reply within {timeout_s}s"
    except httpx.HTTPError as exc:
        rec.error, rec.error_message = "transport", f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        rec.error, rec.error_message = "cancelled", "the run's overall timeout cut this request off"
        raise
    finally:
        rec.e2e = time.perf_counter() - started
        if rec.ok and rec.ttft is not None and rec.output_tokens > 1:
            rec.tpot = (rec.e2e - rec.ttft) / (rec.output_tokens - 1)


async def _exchange(client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str],
                    rec: RequestRecord, started: float, t0: float) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
        rec.status = resp.status_code
        version = resp.headers.get(VERSION_HEADER)
        rec.adapter_version = int(version) if version and version.isdigit() else None
        if resp.status_code != 200:
            await resp.aread()
            rec.error, rec.error_message = f"http_{resp.status_code}", _error_message(resp.text)
            return
        await _read_sse(resp, rec, started, t0)


async def _read_sse(resp: httpx.Response, rec: RequestRecord, started: float, t0: float) -> None:
    usage_tokens: int | None = None
    parts: list[str] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        try:
            event = json.loads(data)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            rec.error, rec.error_message = "bad_event", data[:300]
            continue
        if "error" in event:  # an error after the first byte arrives as an event, then [DONE]
            rec.error, rec.error_message = "stream_error", _error_message(data)
            continue
        usage = event.get("usage")
        if usage:
            usage_tokens = int(usage.get("completion_tokens", 0))
            rec.prompt_tokens = usage.get("prompt_tokens")
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                now = time.perf_counter()
                rec.ttft = now - started if rec.ttft is None else rec.ttft
                rec.chunk_times.append(now - t0)
                parts.append(content)
    else:
        if rec.error is None:
            rec.error, rec.error_message = "incomplete", "the stream ended without data: [DONE]"
    rec.text = "".join(parts)
    # usage counts tokens exactly; a chunk may carry more than one token, so chunks are the fallback.
    rec.output_tokens = usage_tokens if usage_tokens is not None else len(rec.chunk_times)


def _error_message(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300]


@dataclass
class _Watched:
    rec: RequestRecord
    ended: float
    messages_needed: int  # stored messages the adapter must have absorbed for this turn to be in it


class LagTracker:
    """Polls GET /v1/sessions/{id} until the update that absorbed each watched turn has committed.

    A turn is absorbed once `turns − pending_updates` (messages absorbed; nothing else is taught during a
    load test) reaches the messages stored up to it. A version bump alone would mislead: an update that
    started before the turn was stored bumps the version without it. And an update whose extraction found
    nothing to learn commits with no new version at all (the usual case on the random tiny model), so
    waiting for a bump would never end; such turns are measured too, as `absorbed` rather than `new_version`.
    """

    def __init__(self, timeout_s: float, interval_s: float) -> None:
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.watched: dict[str, list[_Watched]] = {}
        self.poll_errors = 0

    def watch(self, sid: str, rec: RequestRecord, messages_needed: int) -> None:
        self.watched.setdefault(sid, []).append(_Watched(rec, time.perf_counter(), messages_needed))

    async def run(self, client: httpx.AsyncClient, load_done: asyncio.Event) -> None:
        """Poll until the load is over and every watched turn is measured or timed out."""
        while not load_done.is_set() or self.watched:
            await asyncio.gather(*(self._poll(client, sid) for sid in list(self.watched)))
            await asyncio.sleep(self.interval_s)

    def expire_all(self) -> None:
        for items in self.watched.values():
            for item in items:
                item.rec.lag_status = "timeout"
        self.watched.clear()

    async def _poll(self, client: httpx.AsyncClient, sid: str) -> None:
        state: dict[str, Any] | None = None
        try:
            resp = await client.get(f"/v1/sessions/{sid}", timeout=10)
            if resp.status_code == 200:
                state = resp.json()
            else:
                self.poll_errors += 1
        except httpx.HTTPError:
            self.poll_errors += 1
        now = time.perf_counter()
        for item in self.watched.get(sid, []):
            status = _absorbed(state, item) if state is not None else None
            if status is not None:
                item.rec.update_lag, item.rec.lag_status = now - item.ended, status
                item.rec.update_timings = _timings(state)
            elif now - item.ended > self.timeout_s:
                item.rec.lag_status = "timeout"
        # watch() may have added turns while the GET was in flight: keep everything still open.
        left = [item for item in self.watched.get(sid, []) if item.rec.lag_status is None]
        if left:
            self.watched[sid] = left
        else:
            self.watched.pop(sid, None)


def _timings(state: dict[str, Any] | None) -> dict[str, float] | None:
    """The seconds per stage of the session's last update, as its `last_update` reports them."""
    return ((state or {}).get("last_update") or {}).get("timings") or None


def _absorbed(state: dict[str, Any], item: _Watched) -> str | None:
    """`new_version` or `absorbed` (committed, nothing new learned) once the turn is in; None before."""
    absorbed = int(state.get("turns", 0)) - int(state.get("pending_updates", 0))
    if absorbed < item.messages_needed:
        return None
    return "new_version" if int(state.get("adapter_version", 0)) > (item.rec.adapter_version or 0) else "absorbed"


class LoadRun:
    """One run against one target: sessions in parallel up to the concurrency, turns in order within each."""

    def __init__(self, target: Target, cfg: LoadConfig, plan: list[list[str]], run_id: str, model: str | None,
                 client: httpx.AsyncClient) -> None:
        self.target, self.cfg, self.plan, self.run_id, self.model, self.client = (
            target, cfg, plan, run_id, model, client)
        self.records: list[RequestRecord] = []
        self.lag = LagTracker(cfg.lag_timeout_s, cfg.poll_interval_s)
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.budget = RequestBudget(cfg.duration_s, cfg.max_requests)
        planned = sum(len(turns) for turns in plan)
        total = min(planned, cfg.max_requests) if cfg.max_requests is not None else planned
        self.bar = tqdm(total=total, desc=f"{target.label:<8}", unit="req", disable=not cfg.progress, file=sys.stderr)
        self.t0 = time.perf_counter()

    def session_id(self, i: int) -> str | None:
        return f"lt-{self.run_id}-{i}" if self.target.sessions else None

    async def run_session(self, i: int, turns: list[str]) -> None:
        async with self.slots:
            history: list[Message] = []
            stored = 0
            sid = self.session_id(i)
            for k, text in enumerate(turns):
                if not self.budget.take():
                    return
                rec = RequestRecord(self.target.label, i, k, sid, start=time.perf_counter() - self.t0)
                self.records.append(rec)
                user = {"role": "user", "content": text}
                messages = [user] if sid is not None else [*history, user]
                await send_turn(self.client, self.body(messages, i, k), self.headers(sid), rec, self.t0,
                                self.cfg.request_timeout_s)
                self.bar.update(1)
                if not rec.ok:
                    self.bar.set_postfix(errors=sum(not r.ok for r in self.records))
                    continue  # a failed turn is not stored by the server, so it leaves the history too
                if sid is not None:
                    stored += 1
                    self.lag.watch(sid, rec, messages_needed=2 * stored)  # user + assistant per turn
                else:
                    history += [user, {"role": "assistant", "content": rec.text}]
                if self.cfg.think_s and k + 1 < len(turns):
                    await asyncio.sleep(self.cfg.think_s)

    def body(self, messages: list[Message], session: int, turn: int) -> dict[str, Any]:
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        body: dict[str, Any] = {
            "messages": [*system, *messages], "max_tokens": self.cfg.max_tokens,
            "temperature": self.cfg.temperature, "stream": True, "stream_options": {"include_usage": True},
        }
        if self.cfg.seed is not None:
            body["seed"] = self.cfg.seed + 1000 * session + turn
        if self.model:
            body["model"] = self.model
        return body

    def headers(self, sid: str | None) -> dict[str, str]:
        return {"X-Session-ID": sid} if sid is not None else {}

    async def execute(self) -> float:
        """Run every session; returns the load phase's wall time. Cancels what is left at the hard deadline."""
        done = asyncio.Event()
        lag_task = asyncio.create_task(self.lag.run(self.client, done)) if self.target.sessions else None
        tasks = [asyncio.create_task(self.run_session(i, turns)) for i, turns in enumerate(self.plan)]
        hard_deadline = self.cfg.duration_s + self.cfg.request_timeout_s + 5
        finished, unfinished = await asyncio.wait(tasks, timeout=hard_deadline)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        for task in finished:
            task.result()  # a bug in the runner must surface, not vanish into a task
        duration = time.perf_counter() - self.t0
        self.bar.close()
        done.set()
        if lag_task is not None:
            # Every watched turn expires lag_timeout after its end, so this bound is only a backstop.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lag_task, self.cfg.lag_timeout_s + 30)
            self.lag.expire_all()
        return duration


async def run_target(target: Target, cfg: LoadConfig, plan: list[list[str]], run_id: str) -> RunResult:
    """Warm up, load, wait for update lags, scrape /metrics around it, delete the sessions."""
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 8)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10)
    # trust_env=False: a proxy from the environment must never carry load-test traffic elsewhere.
    base_url = target.url.rstrip("/").removesuffix("/v1")  # routes below start with /v1 themselves
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=timeout, trust_env=False) as client:
        model = target.model or await discover_model(client)
        await warm_up(client, cfg, model, plan)
        before = await scrape_metrics(client)
        load = LoadRun(target, cfg, plan, run_id, model, client)
        duration = await load.execute()
        after = await scrape_metrics(client)
        cleanup_errors = 0
        if target.sessions and not target.keep_sessions:
            cleanup_errors = await delete_sessions(client, {r.session_id for r in load.records if r.ok})
    return RunResult(target, model, load.records, duration, load.lag.poll_errors, cleanup_errors, before, after)


async def discover_model(client: httpx.AsyncClient) -> str | None:
    """The server's first model; None (the server's default) when /v1/models does not answer."""
    try:
        resp = await client.get("/v1/models", timeout=10)
        return str(resp.json()["data"][0]["id"]) if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return None


async def warm_up(client: httpx.AsyncClient, cfg: LoadConfig, model: str | None, plan: list[list[str]]) -> None:
    """Stateless requests, not recorded, so the first measured request does not pay for cold caches."""
    for i in range(cfg.warmup):
        prompt = plan[0][i % len(plan[0])]
        body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.max_tokens,
                                "temperature": cfg.temperature}
        if model:
            body["model"] = model
        try:
            await client.post("/v1/chat/completions", json=body, headers={"X-TMEM-Record": "false"}, timeout=60)
        except httpx.HTTPError:
            return  # the measured requests will meet and count the same failure


async def scrape_metrics(client: httpx.AsyncClient) -> str | None:
    try:
        resp = await client.get("/metrics", timeout=10)
        return resp.text if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def delete_sessions(client: httpx.AsyncClient, session_ids: set[str | None]) -> int:
    """DELETE every session the run created; returns how many deletions failed."""
    failures = 0
    for sid in sorted(s for s in session_ids if s):
        try:
            resp = await client.delete(f"/v1/sessions/{sid}", timeout=30)
            failures += resp.status_code != 200
        except httpx.HTTPError:
            failures += 1
    return failures


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        sessions=args.sessions, turns=args.turns, concurrency=args.concurrency, duration_s=args.duration,
        max_requests=args.max_requests, max_tokens=args.max_tokens, temperature=args.temperature,
        request_timeout_s=args.request_timeout, lag_timeout_s=args.lag_timeout, poll_interval_s=args.poll_interval,
        warmup=args.warmup, system=args.system, seed=args.seed, progress=not args.no_progress,
    )


def cmd_loadtest(args: argparse.Namespace) -> int:
    """Run the load (and the comparison), write report.json and the plots, print the table."""
    # The CLI logs at INFO; httpx would add a line per request and drown the progress bar.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = config_from_args(args)
    plan = build_plan(load_conversations(args.prompts), cfg.sessions, cfg.turns)
    run_id = uuid.uuid4().hex[:8]
    ours = Target("ours", args.url, sessions=not args.no_sessions, api_key=args.api_key, model=args.model,
                  keep_sessions=args.keep_sessions)
    results = [asyncio.run(run_target(ours, cfg, plan, run_id))]
    if args.compare_url:
        theirs = Target("compare", args.compare_url, sessions=False, api_key=args.compare_api_key,
                        model=args.compare_model)
        results.append(asyncio.run(run_target(theirs, cfg, plan, run_id)))
    out = Path(args.out)
    doc = report.write_report(out, results, cfg, run_id, args.max_error_rate)
    print(report.format_report(doc))
    print(f"report: {out / report.REPORT_FILE}  plots: {', '.join(doc['plots'])}")
    return 0 if doc["passed"] else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--url", required=True, help="the TMEM server, e.g. http://127.0.0.1:8000")
    a("--sessions", type=_positive, default=4, help="sessions (conversations) to run")
    a("--turns", type=_positive, default=4, help="user turns per session")
    a("--concurrency", type=_positive, default=2, help="sessions in flight at a time")
    a("--duration", type=float, default=300.0, help="stop sending new requests after this many seconds")
    a("--max-requests", type=_positive, default=None, help="stop after this many requests")
    a("--prompts", type=Path, default=report.DEFAULT_PROMPTS, help="ShareGPT-style JSON or our prompts.json format")
    a("--max-tokens", type=_positive, default=64)
    a("--temperature", type=float, default=0.0, help="0 (default): both servers of a comparison emit alike")
    a("--seed", type=int, default=None, help="sampling seed base (with --temperature > 0), same on both servers")
    a("--system", default=None, help="a system message sent with every request")
    a("--api-key", default=os.environ.get("TMEM_API_KEY"), help="bearer key (default $TMEM_API_KEY)")
    a("--model", default=None, help="model name (default: the server's first in /v1/models)")
    a("--compare-url", default=None, help="a plain OpenAI server to run the same load against afterwards")
    a("--compare-api-key", default=None)
    a("--compare-model", default=None)
    a("--no-sessions", action="store_true", help="stateless: no X-Session-ID, the client resends the history")
    a("--keep-sessions", action="store_true", help="do not DELETE the load-test sessions at the end")
    a("--request-timeout", type=float, default=120.0, help="seconds for one whole streamed reply")
    a("--lag-timeout", type=float, default=120.0, help="how long to wait for a turn's new adapter version")
    a("--poll-interval", type=float, default=0.5, help="seconds between GET /v1/sessions/{id} polls")
    a("--warmup", type=int, default=1, help="unrecorded stateless requests before each run")
    a("--max-error-rate", type=float, default=0.0, help="exit 1 when a run's error rate is above this")
    a("--no-progress", action="store_true")
    a("--out", type=Path, required=True, help="directory for report.json and the PNG plots")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(sub: Any) -> None:
    """Add `tmem loadtest` to the CLI."""
    parser: argparse.ArgumentParser = sub.add_parser("loadtest", help="multi-turn session load test with a report")
    add_arguments(parser)
    parser.set_defaults(func=cmd_loadtest)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem.bench.loadtest", description="multi-turn session load test")
    add_arguments(parser)
    return cmd_loadtest(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
