"""`python -m tmem.bench.soak`: session load for minutes while workers are killed and Redis restarts; then an audit.

    python -m tmem.bench.soak --out out/soak [--minutes 10] [--sessions 8] [--concurrency 4] [--model DIR]

Starts its own redis-server (AOF, data in OUT/redis), `tmem serve --worker off` and one `tmem worker`, then
sends streamed session turns (tmem.bench.loadtest's client; every user message unique) while faults run: the
worker is SIGKILLed at ~25% and ~60% of the run (a new one is started each time) and redis-server is stopped
and started again on the same port and data dir at ~45%. A few pairs are taught to two sessions so real
versions get written. At the end every session is flushed and Redis itself is audited: every acknowledged
turn (a streamed reply that ended in `[DONE]` with no error) stored exactly once with the reply the client
got, nothing stored that was not acknowledged, every checkpoint's sha256 verified. A 503 whose request
overlapped the Redis outage is declared; any other 5xx is unexpected.

OUT gets report.json, soak.png (requests/s with the fault moments), loadtest/ (the usual load-test report)
and logs/. The last stdout line is one JSON object; the exit status is 0 iff its `ok` is true.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from tmem.bench import loadtest
from tmem.bench import loadtest_report as report
from tmem.bench.harness import pyplot, save_figure
from tmem.bench.loadtest_report import LoadConfig, RequestRecord, RunResult, Target
from tmem.bench.processes import TINY_ENGINE_FLAGS, TINY_WORKER_FLAGS, HttpServer, TmemWorker, tmem_command
from tmem.server.redis_proc import PrivateRedis, free_port

# The soak checks that nothing is lost, not what is learned: a few epochs keep each update short even
# though every turn now trains (extracted pairs, or its raw text when the random model extracts none).
TRAINER_FLAGS = ["--optimizer", "adam", "--lr", "0.01", "--epochs", "3"]
# Short lock/reclaim times so a killed worker's job is taken over within seconds, not a minute.
LOCK_FLAGS = ["--job-lock-ttl-ms", "1500", "--job-reclaim-idle-ms", "1000"]
STORE_DOWN = "session storage (Redis) is unavailable"  # the message of the server's store_unavailable 503
OUTAGE_GRACE_S = 10.0  # after redis-server is back, pooled connections reconnect on their next command
TENANT = "default"
AUDIT_KEYS = ("found", "lost", "duplicated", "unacked_stored", "reply_mismatches", "stored_messages", "malformed",
              "meta_mismatches", "pending_after_flush", "versions_written", "version_not_latest", "checksum_failures")


class Cluster:
    """redis-server, the API replica (`serve --worker off`) and the current `tmem worker`."""

    def __init__(self, out: Path, model: Path, timeout_s: float) -> None:
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.out, self.model, self.timeout_s = out, model, timeout_s
        self.env = {"TMEM_A0_CACHE_DIR": str(out / "a0")}
        self.redis = PrivateRedis(out / "redis")
        port = free_port()
        self.server = HttpServer("tmem serve", tmem_command(
            "serve", "--model", str(model), "--redis-url", self.redis.url, "--port", str(port), "--worker", "off",
            *TINY_ENGINE_FLAGS, *TINY_WORKER_FLAGS, *TRAINER_FLAGS), port, out / "logs" / "server.log", self.env)
        self.url = self.server.url
        self.workers: list[TmemWorker] = []

    def start(self) -> None:
        self.redis.start()
        self.server.start(self.timeout_s)
        self.start_worker()

    def start_worker(self) -> None:
        path = self.out / "logs" / f"worker-{len(self.workers)}.log"
        self.workers.append(TmemWorker(["--model", str(self.model), "--redis-url", self.redis.url, "--api-url",
                                        self.url, *TINY_WORKER_FLAGS, *TRAINER_FLAGS,
                                        *LOCK_FLAGS], path, self.env))
        self.workers[-1].start(self.timeout_s)

    def close(self) -> None:
        for child in [*self.workers, self.server]:
            child.stop(30)
        self.redis.stop()


def prompt_for(conversations: list[list[str]], session: int, turn: int) -> str:
    """A user message no other turn sends, so the audit can find each turn in the history by its text."""
    conv = conversations[session % len(conversations)]
    return f"[soak {session}.{turn}] {conv[turn % len(conv)]}"


class SoakLoad(loadtest.LoadRun):
    """LoadRun's requests and lag tracking, with every session in rotation instead of one session per slot.

    LoadRun holds a concurrency slot for a whole session, so a load that runs for a duration would only ever
    use the first `concurrency` sessions. Here each client takes the next idle session, sends its next turn
    and puts it back: turns within a session stay in order, and all sessions keep getting turns.
    """

    def __init__(self, target: Target, cfg: LoadConfig, conversations: list[list[str]], run_id: str,
                 model: str | None, client: httpx.AsyncClient) -> None:
        super().__init__(target, cfg, [[] for _ in range(cfg.sessions)], run_id, model, client)
        self.conversations = conversations
        self.next_turn, self.acked = [0] * cfg.sessions, [0] * cfg.sessions
        self.idle: asyncio.Queue[int] = asyncio.Queue()
        self.lag_task: asyncio.Task[None] | None = None
        self.load_done = asyncio.Event()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def execute(self) -> float:
        """Run the clients until the budget's deadline; the lag tracker keeps running (see finish_lag)."""
        for i in range(self.cfg.sessions):
            self.idle.put_nowait(i)
        self.lag_task = asyncio.create_task(self.lag.run(self.client, self.load_done))
        clients = [asyncio.create_task(self._client()) for _ in range(min(self.cfg.concurrency, self.cfg.sessions))]
        await asyncio.gather(*clients)  # a bug in a client surfaces here
        return self.now()

    async def _client(self) -> None:
        while self.budget.take():
            i = await self.idle.get()  # never waits: there are at least as many sessions as clients
            k, sid = self.next_turn[i], self.session_id(i)
            self.next_turn[i] += 1
            rec = RequestRecord(self.target.label, i, k, sid, start=self.now())
            self.records.append(rec)
            user = {"role": "user", "content": prompt_for(self.conversations, i, k)}
            await loadtest.send_turn(self.client, self.body([user], i, k), self.headers(sid), rec, self.t0,
                                     self.cfg.request_timeout_s)
            if rec.ok and sid is not None:
                self.acked[i] += 1
                self.lag.watch(sid, rec, messages_needed=2 * self.acked[i])
            else:
                await asyncio.sleep(1.0)  # a refused client backs off a little, as Retry-After asks
            self.idle.put_nowait(i)

    async def finish_lag(self, timeout_s: float) -> None:
        """Stop the lag tracker once its watched turns are measured (after the flush), or at the timeout."""
        self.load_done.set()
        if self.lag_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.lag_task, timeout_s)
        self.lag.expire_all()


class FaultSchedule:
    """Worker kills, the Redis restart and a few teach calls at fixed fractions of the run, one after another."""

    def __init__(self, cluster: Cluster, load: SoakLoad, duration_s: float, redis_down_s: float) -> None:
        self.cluster, self.load, self.duration_s, self.redis_down_s = cluster, load, duration_s, redis_down_s
        self.events: list[dict[str, Any]] = []  # {t: seconds since the load started, kind, note}
        self.teach_statuses: list[tuple[float, int | None]] = []  # (t, HTTP status; None: no response)

    async def run(self) -> None:
        plan: list[tuple[float, Callable[[], Any]]] = [
            (0.15, self.teach), (0.25, self.kill_worker), (0.45, self.restart_redis), (0.5, self.teach),
            (0.6, self.kill_worker), (0.75, self.teach)]
        for fraction, action in plan:
            await asyncio.sleep(max(0.0, fraction * self.duration_s - self.load.now()))
            await action()

    def note(self, kind: str, note: str = "") -> None:
        """Record an event: teach | worker_kill | worker_ready | redis_stop | redis_start."""
        self.events.append({"t": self.load.now(), "kind": kind, "note": note})

    async def kill_worker(self) -> None:
        # Prefer a kill mid-update (the worker holds a session's lock): the crash that must not lose work.
        import redis.asyncio as aioredis

        locks = [f"tmem:{{{TENANT}:{self.load.session_id(i)}}}:lock" for i in range(self.load.cfg.sessions)]
        client, deadline = aioredis.Redis.from_url(self.cluster.redis.url), time.monotonic() + 10
        try:
            while not (busy := bool(await client.exists(*locks))) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        self.cluster.workers[-1].kill()
        self.note("worker_kill", "mid-update" if busy else "idle")
        await asyncio.to_thread(self.cluster.start_worker)
        self.note("worker_ready")

    async def restart_redis(self) -> None:
        await asyncio.to_thread(self.cluster.redis.stop)  # SIGTERM: Redis fsyncs its AOF before it exits
        self.note("redis_stop")
        await asyncio.sleep(self.redis_down_s)
        await asyncio.to_thread(self.cluster.redis.start)
        self.note("redis_start")

    async def teach(self) -> None:
        n, taught = sum(e["kind"] == "teach" for e in self.events), min(2, self.load.cfg.sessions)
        for i in range(taught):
            pairs = [{"instruction": f"What is my code word {n}.{j}?", "output": f"It is falcon-{i}-{n}-{j}."}
                     for j in range(3)]
            status: int | None = None
            with contextlib.suppress(httpx.HTTPError):
                resp = await self.load.client.post(f"/v1/sessions/{self.load.session_id(i)}/memories",
                                                   json={"pairs": pairs}, timeout=60)
                status = resp.status_code
            self.teach_statuses.append((self.load.now(), status))
        self.note("teach", f"3 pairs x {taught} sessions")

    def outage(self) -> tuple[float, float] | None:
        """When a store_unavailable 503 is expected: from Redis' stop until a grace period after its start."""
        stop = next((e["t"] for e in self.events if e["kind"] == "redis_stop"), None)
        start = next((e["t"] for e in self.events if e["kind"] == "redis_start"), None)
        return None if stop is None or start is None else (stop, start + OUTAGE_GRACE_S)


async def flush_all(client: httpx.AsyncClient, sids: list[str], timeout_s: float) -> dict[str, int | None]:
    """POST /flush for every session at once; the HTTP status of each (None: no response)."""

    async def one(sid: str) -> int | None:
        with contextlib.suppress(httpx.HTTPError):
            resp = await client.post(f"/v1/sessions/{sid}/flush", json={"timeout": timeout_s}, timeout=timeout_s + 30)
            return resp.status_code
        return None

    return dict(zip(sids, await asyncio.gather(*(one(s) for s in sids)), strict=True))


def classify_errors(records: list[RequestRecord], teach: list[tuple[float, int | None]],
                    flushes: dict[str, int | None], outage: tuple[float, float] | None) -> dict[str, Any]:
    """5xx answers split into declared (a store_unavailable 503 overlapping the Redis outage) and unexpected."""
    declared, unexpected, other = Counter[str](), Counter[str](), Counter[str]()

    def in_outage(start: float, end: float) -> bool:
        return outage is not None and start <= outage[1] and end >= outage[0]

    for rec in records:
        in_stream = rec.error == "stream_error"  # after a 200 status line: the error arrives as an event
        store_down = rec.status == 503 or (in_stream and STORE_DOWN in (rec.error_message or ""))
        label = f"chat {503 if store_down else rec.status}" + (" in-stream" if in_stream else "")
        if store_down and in_outage(rec.start, rec.start + (rec.e2e or 0.0)):
            declared[label] += 1
        elif in_stream or (rec.status or 0) >= 500:
            unexpected[label] += 1
        elif rec.error is not None:
            other[rec.error] += 1
    for t, status in teach:
        if status == 503 and in_outage(t - 60, t):
            declared["teach 503"] += 1
        elif status is None or status >= 500:
            unexpected[f"teach {status}"] += 1
    unexpected.update(f"flush {s}" for s in flushes.values() if s is None or s >= 500)
    return {"declared": dict(declared), "unexpected": dict(unexpected), "client_errors": dict(other)}


async def audit(redis_url: str, load: SoakLoad, sessions: list[int]) -> dict[str, int]:
    """Read every session back from Redis and hold it against what the clients were told."""
    from tmem.adapters.checkpoint import CheckpointError, decode_b
    from tmem.server.store import RedisStore

    store, found = RedisStore.from_url(redis_url), dict.fromkeys(AUDIT_KEYS, 0)
    try:
        for i in sessions:
            sid = str(load.session_id(i))
            turns, state = await store.get_turns(TENANT, sid), await store.get_session(TENANT, sid)
            users = Counter(m["content"] for m in turns if m.get("role") == "user")
            replies = {a["content"]: b.get("content") for a, b in itertools.pairwise(turns)
                       if a.get("role") == "user" and b.get("role") == "assistant"}
            for rec in (r for r in load.records if r.session == i):
                text = prompt_for(load.conversations, i, rec.turn)
                n = users[text]
                if rec.ok:
                    found["lost" if n == 0 else "duplicated" if n > 1 else "found"] += 1
                    found["reply_mismatches"] += n == 1 and replies.get(text) != rec.text
                else:  # generated but refused (e.g. 503 while storing): it must not be in the history
                    found["unacked_stored"] += n > 0
            found["stored_messages"] += len(turns)
            found["malformed"] += sum(m.get("role") != ("user", "assistant")[j % 2] for j, m in enumerate(turns))
            found["meta_mismatches"] += state is not None and state.turns != len(turns)
            found["pending_after_flush"] += state.pending_updates if state is not None else 0
            versions = await store.list_versions(TENANT, sid)
            found["versions_written"] += len(versions)
            found["version_not_latest"] += state is not None and state.adapter_version != max(versions, default=0)
            for v in versions:
                ckpt = await store.get_checkpoint(TENANT, sid, v)
                try:
                    found["checksum_failures"] += ckpt is None or not decode_b(ckpt.data, ckpt.sha256)
                except CheckpointError:
                    found["checksum_failures"] += 1
    finally:
        await store.aclose()
    return found


async def progress(load: SoakLoad, schedule: FaultSchedule, every_s: float) -> None:
    """A rate line on stderr while the load runs."""
    seen = 0
    while not load.load_done.is_set():
        await asyncio.sleep(every_s)
        n, ok = len(load.records), sum(r.ok for r in load.records)
        phase = "flushing" if load.now() > load.cfg.duration_s else "load"
        last = schedule.events[-1]["kind"] if schedule.events else "-"
        print(f"[soak] {load.now():6.0f}s {phase}: requests {n} ok {ok} failed {n - ok}  "
              f"{(n - seen) / every_s:.2f} req/s  last fault: {last}", file=sys.stderr, flush=True)
        seen = n


async def soak(cluster: Cluster, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Load + faults, flush, audit; returns the report (not yet written)."""
    cfg = LoadConfig(sessions=args.sessions, turns=1, concurrency=args.concurrency, duration_s=args.minutes * 60,
                     max_tokens=args.max_tokens, lag_timeout_s=args.flush_timeout, poll_interval_s=1.0,
                     progress=False)
    conversations, run_id = report.load_conversations(report.DEFAULT_PROMPTS), uuid.uuid4().hex[:8]
    target = Target("soak", cluster.url, sessions=True, keep_sessions=True)
    limits = httpx.Limits(max_connections=args.concurrency + 16)
    async with httpx.AsyncClient(base_url=cluster.url, limits=limits, timeout=120, trust_env=False) as client:
        model = await loadtest.discover_model(client)
        await loadtest.warm_up(client, cfg, model, [[conversations[0][0]]])
        before = await loadtest.scrape_metrics(client)
        load = SoakLoad(target, cfg, conversations, run_id, model, client)
        schedule = FaultSchedule(cluster, load, cfg.duration_s, args.redis_down)
        faults = asyncio.create_task(schedule.run())
        ticker = asyncio.create_task(progress(load, schedule, max(5.0, cfg.duration_s / 30)))
        load_s = await load.execute()
        await faults  # every fault is due before the end, but a replacement worker may still be starting
        # Sessions 0 and 1 were taught, so they exist even if none of their turns got through.
        sessions = [i for i in range(args.sessions) if load.acked[i] or i < 2]
        flushes = await flush_all(client, [str(load.session_id(i)) for i in sessions], args.flush_timeout)
        await load.finish_lag(timeout_s=30)
        ticker.cancel()
        after = await loadtest.scrape_metrics(client)
    audited = await audit(cluster.redis.url, load, sessions)
    errors = classify_errors(load.records, schedule.teach_statuses, flushes, schedule.outage())
    result = RunResult(target, model, load.records, load_s, load.lag.poll_errors, 0, before, after)
    lt_doc = report.write_report(out / "loadtest", [result], cfg, run_id, max_error_rate=1.0)
    sent, stored = sum(load.acked), audited["stored_messages"] // 2
    verdict = {"bench": "soak", "minutes": args.minutes, "turns_sent": sent, "turns_stored": stored,
               "turns_lost": audited["lost"], "turns_duplicated": audited["duplicated"],
               "versions_written": audited["versions_written"], "checksum_failures": audited["checksum_failures"],
               "unexpected_5xx": sum(errors["unexpected"].values()), "declared_503": sum(errors["declared"].values()),
               "worker_kills": sum(e["kind"] == "worker_kill" for e in schedule.events),
               "redis_restarts": sum(e["kind"] == "redis_start" for e in schedule.events)}
    verdict["ok"] = (0 < sent == stored and audited["lost"] == audited["duplicated"] == 0
                     and verdict["checksum_failures"] == 0 and verdict["unexpected_5xx"] == 0)
    return {"verdict": verdict, "config": {**vars(args), "run_id": run_id}, "audit": audited, "errors": errors,
            "flush_status": flushes, "outage_window_s": schedule.outage(), "load_s": load_s,
            "events": schedule.events, "loadtest": lt_doc,
            "timeline": [[r.start + (r.e2e or 0.0), r.ok] for r in load.records]}  # (end, acknowledged)


def plot(out: Path, doc: dict[str, Any]) -> Path:
    """Requests/s over time (acknowledged and failed, by end time) with the fault moments marked."""
    plt = pyplot()
    import numpy as np

    rows = np.array(doc["timeline"], dtype=float).reshape(-1, 2)
    bucket = max(1.0, doc["load_s"] / 120)
    edges = np.arange(0.0, max(doc["load_s"], rows[:, 0].max(initial=0.0)) + bucket, bucket)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for ok, label in ((1, "acknowledged"), (0, "failed")):
        ax.stairs(np.histogram(rows[rows[:, 1] == ok, 0], bins=edges)[0] / bucket, edges, label=label)
    if doc["outage_window_s"]:
        ax.axvspan(*doc["outage_window_s"], color="tab:purple", alpha=0.1, label="503s declared (outage + grace)")
    styles = {"worker_kill": ("tab:red", "-"), "worker_ready": ("tab:green", ":"),
              "redis_stop": ("tab:purple", "-"), "redis_start": ("tab:purple", ":"), "teach": ("tab:gray", "--")}
    for kind, (color, style) in styles.items():
        for j, t in enumerate(e["t"] for e in doc["events"] if e["kind"] == kind):
            ax.axvline(t, color=color, linestyle=style, linewidth=1.2, label=kind.replace("_", " ") if j == 0 else None)
    ax.set(title="soak: requests/s by completion time", xlabel="seconds since the load started", ylabel="requests/s")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    return save_figure(fig, out / "soak.png")


def format_table(doc: dict[str, Any]) -> str:
    """The load-test table, the fault timeline and the audit."""
    v, a, e = doc["verdict"], doc["audit"], doc["errors"]
    rows = [("turns acknowledged (sent)", v["turns_sent"]), ("turns stored", v["turns_stored"]),
            ("  found exactly once", a["found"]), ("  lost", a["lost"]), ("  duplicated", a["duplicated"]),
            ("  stored, not acknowledged", a["unacked_stored"]), ("  reply != delivered", a["reply_mismatches"]),
            ("  out of user/assistant order", a["malformed"]), ("  meta.turns != stored", a["meta_mismatches"]),
            ("pending after flush", a["pending_after_flush"]), ("versions written", v["versions_written"]),
            ("  newest != served", a["version_not_latest"]), ("checksum failures", v["checksum_failures"]),
            ("declared 503 (Redis outage)", f"{v['declared_503']} {e['declared']}"),
            ("unexpected 5xx", f"{v['unexpected_5xx']} {e['unexpected']}"), ("other client errors", e["client_errors"]),
            ("worker kills", v["worker_kills"]), ("redis restarts", v["redis_restarts"])]
    events = "  ".join(f"{ev['t']:.0f}s {ev['kind']}" + (f" ({ev['note']})" if ev["note"] else "")
                       for ev in doc["events"])
    table = "\n".join(f"{name:<32}{value}" for name, value in rows)
    return f"{report.format_run(doc['loadtest'])}\n\nfaults: {events}\n\n{table}\nok: {v['ok']}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem.bench.soak", description=__doc__.splitlines()[0])
    a = parser.add_argument
    a("--out", type=Path, required=True, help="directory for report.json, soak.png, loadtest/, logs/, redis/")
    a("--minutes", type=float, default=10.0, help="how long the load runs")
    a("--sessions", type=int, default=8)
    a("--concurrency", type=int, default=4, help="requests in flight at a time (at most --sessions)")
    a("--model", type=Path, default=None, help="model dir (default: build the tiny model into OUT/tiny-model)")
    a("--max-tokens", type=int, default=32)
    a("--redis-down", type=float, default=3.0, help="seconds redis-server stays stopped")
    a("--flush-timeout", type=float, default=300.0, help="seconds every session's final flush may take")
    a("--start-timeout", type=float, default=300.0, help="seconds the server or a worker may take to start")
    args = parser.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.model is None:
        from tmem.adapters.tiny_model import build_tiny_model

        args.model = build_tiny_model(out / "tiny-model", layers=4, hidden=256, seed=0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: no orphaned engines
    cluster = Cluster(out, Path(args.model).resolve(), args.start_timeout)
    try:
        cluster.start()
        doc = asyncio.run(soak(cluster, args, out))
    finally:
        cluster.close()
    doc["plot"] = str(plot(out, doc))
    (out / report.REPORT_FILE).write_text(json.dumps({k: v for k, v in doc.items() if k != "loadtest"},
                                                     indent=1, default=str))
    print(format_table(doc))
    print(json.dumps(doc["verdict"]))
    return 0 if doc["verdict"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
