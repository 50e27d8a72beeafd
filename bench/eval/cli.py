"""`tmem eval locomo|longmemeval`: run a benchmark against a TMEM server and report per mode × category.

    tmem eval locomo --data ../shared/data/locomo10.json --url http://127.0.0.1:8000 --out runs/locomo \\
        --mode full-context,window,summary,tmem --conversations 1 --questions 20

Answers go to ``OUT/answers.jsonl`` as they come, one line per (mode, question).  Running the same
command again skips every (mode, question) already there, so an interrupted run resumes without
repeating itself.  A conversation whose questions are all answered in the session modes asked for is
not ingested again; one with questions still missing is ingested again from the start, in a fresh
session (the old one may be half-ingested or deleted), so resumed answers may come from a different
session than earlier ones.  At the end: a table on stdout, ``OUT/results.json`` (every selected answer,
earlier runs' included) and ``OUT/f1_by_category.png``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tmem.bench.eval.runner import MODES, EvalConfig, EvalRunner, Judge, RunSummary, parse_modes

DEFAULT_MODES = ",".join(MODES)


def register(sub: Any) -> None:
    """Add ``eval`` (with ``locomo`` and ``longmemeval`` below it) to the ``tmem`` command."""
    parser: argparse.ArgumentParser = sub.add_parser("eval", help="run LoCoMo or LongMemEval against a TMEM server")
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)
    for name, help_text in (
        ("locomo", "LoCoMo (locomo10.json): many questions per long conversation"),
        ("longmemeval", "LongMemEval (longmemeval_s.json, ...): one question per instance"),
    ):
        bench = benchmarks.add_parser(name, help=help_text)
        _add_common_flags(bench)
        if name == "longmemeval":
            bench.add_argument("--question-types", default=None, help="comma-separated question_type filter")
        bench.set_defaults(func=cmd_eval)


def _add_common_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="the benchmark's JSON file")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the TMEM server (with or without /v1)")
    parser.add_argument("--out", type=Path, required=True, help="output directory (answers.jsonl, results.json, PNG)")
    parser.add_argument("--mode", default=DEFAULT_MODES, help=f"comma-separated modes (default {DEFAULT_MODES})")
    parser.add_argument("--conversations", type=int, default=None, help="keep the first K conversations")
    parser.add_argument(
        "--questions", type=int, default=None,
        help="LoCoMo: the first Q questions of each conversation; LongMemEval: the first Q instances",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length limit (default 32)")
    parser.add_argument("--flush-timeout", type=float, default=1800.0, help="seconds a conversation's flush may take")
    parser.add_argument(
        "--flush-each-session",
        action="store_true",
        help="flush after every history session, so each update absorbs one session",
    )
    parser.add_argument("--context-chars", type=int, default=16_000, help="full-context: history characters kept")
    parser.add_argument("--window-turns", type=int, default=8, help="window: newest messages kept (default 8)")
    parser.add_argument("--keep-sessions", action="store_true", help="do not delete the eval sessions afterwards")
    parser.add_argument("--api-key", default=None, help="the server's API key (default $TMEM_API_KEY)")
    parser.add_argument("--judge-url", default=None, help="an OpenAI-compatible URL for yes/no LLM judging")
    parser.add_argument("--judge-model", default=None, help="judge model (default: the judge's first model)")
    parser.add_argument("--judge-api-key", default=None, help="the judge's API key (never $TMEM_API_KEY)")


def _load(args: argparse.Namespace) -> list[Any]:
    from tmem.bench.eval.datasets import load_locomo, load_longmemeval

    if args.benchmark == "locomo":
        return load_locomo(args.data, args.conversations, args.questions)
    limits = [n for n in (args.conversations, args.questions) if n is not None]
    types = [t.strip() for t in args.question_types.split(",")] if args.question_types else None
    return load_longmemeval(args.data, min(limits) if limits else None, types)


def cmd_eval(args: argparse.Namespace) -> int:
    """Run, then print the table and write results.json and the chart."""
    from tmem.bench.eval.report import CHART_FILE, TINY_MODEL_NOTE, build_results, plot_f1, write_results

    # One INFO line per HTTP request (set up by `tmem`'s logging) would tear the progress bar apart.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        modes = parse_modes(args.mode)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.data.exists():
        print(f"error: no data file at {args.data}", file=sys.stderr)
        return 2
    conversations = _load(args)
    cfg = EvalConfig(
        url=args.url, modes=modes, api_key=args.api_key, max_tokens=args.max_tokens,
        flush_timeout=args.flush_timeout, context_chars=args.context_chars, window_turns=args.window_turns,
        keep_sessions=args.keep_sessions, flush_each_session=args.flush_each_session,
    )  # fmt: skip
    judge = Judge(args.judge_url, args.judge_model, args.judge_api_key) if args.judge_url else None
    runner = EvalRunner(cfg, args.benchmark, args.out, judge=judge)
    started = time.perf_counter()
    try:
        summary = runner.run(conversations)
    finally:
        runner.close()
        if judge is not None:
            judge.close()
    elapsed = time.perf_counter() - started
    meta = _meta(args, cfg, conversations, summary, elapsed)
    results_path = write_results(args.out, build_results(summary.table, meta))
    chart = plot_f1(summary.table, args.out / CHART_FILE, f"{args.benchmark}: F1 per category")
    print(_report(summary, elapsed))
    print(summary.table.render())
    print(f"\nwrote {args.out / 'answers.jsonl'}, {results_path}, {chart}")
    print(TINY_MODEL_NOTE)
    return 0


def _meta(
    args: argparse.Namespace, cfg: EvalConfig, conversations: list[Any], summary: RunSummary, elapsed: float
) -> dict[str, Any]:
    return {
        "benchmark": args.benchmark,
        "data": str(args.data),
        "url": cfg.url,
        "modes": list(cfg.modes),
        "conversations": len(conversations),
        "questions": sum(len(c.questions) for c in conversations),
        "settings": {
            "max_tokens": cfg.max_tokens,
            "context_chars": cfg.context_chars,
            "window_turns": cfg.window_turns,
            "flush_each_session": cfg.flush_each_session,
            "judge_url": args.judge_url,
        },
        "last_run": {
            "run_id": summary.run_id,
            "answered": dict(summary.answered_now),
            "skipped_already_answered": summary.skipped,
            "errors": summary.errors,
            "seconds": round(elapsed, 1),
            "sessions": summary.sessions,
        },
    }


def _report(summary: RunSummary, elapsed: float) -> str:
    answered = sum(summary.answered_now.values())
    lines = [f"\nrun {summary.run_id}: {answered} answered, {summary.skipped} already in answers.jsonl, "
             f"{summary.errors} refused by the server, {elapsed:.1f}s"]  # fmt: skip
    for s in summary.sessions:
        lines.append(
            f"  {s['sample_id']}: {s['messages']} messages ingested in {s['ingest_requests']} requests "
            f"({s['ingest_s']:.1f}s), flush {s['flush_s']:.1f}s, adapter v{s['adapter_version']} "
            "(summary and tmem share this session)"
        )
    return "\n".join(lines) + "\n"
