"""Do sessions remember, and stay the model they were? Recall and retention on the real model, per trainer preset.

    python -m tmem.bench.recall_bench --out DIR [--presets paper,default] [--model .cache/demo-model]
        [--phases teach,teach10,chat] [--variant LABEL="--flag value ..."]...

For each preset, one `tmem serve` (the demo model, SmolLM2-135M-Instruct, fp32) is started and used
through its public API only; the presets run one after the other in the same run, so their numbers
sit side by side:

- **teach**: the 20 facts of `tmem.bench.recall_data` sent to `/memories` in one update, then asked with
  `X-TMEM-Context: none`, adapter on vs off (only the weights can answer).
- **teach x10**: the same 20 facts taught 2 per update in 10 successive updates (B accumulates), asked
  again: does memory survive later updates?
- **chat**: the facts stated in passing in a conversation (one statement per user turn), ingested,
  flushed, and asked with `X-TMEM-Context: none`, adapter on vs off: extraction + training end to end.
- **retention**: 30 general prompts, asked of the taught session (adapter on, no context) and of the
  base model: the share whose greedy reply agrees in its first 8 words, after 1 and after 10 updates;
  and the mean per-token KL(base ‖ adapted) on a held-out text, from the downloaded adapter.
- **cost**: seconds per update (the flush's wall time).

`--variant` adds runs of each preset with extra `tmem serve` flags (for example
`--variant pairs2="--extraction-max-pairs 2"`), labelled `preset-LABEL`, in the same run.
Progress goes to stderr. Output: a table, `recall_bench.png`, `results.json` in --out, and last one
JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from tmem.bench.harness import bench_parser, pyplot, save_figure
from tmem.bench.processes import HttpServer, tmem_command
from tmem.bench.recall_data import FACTS, GENERAL_PROMPTS, HELD_OUT_TEXT, first_words, recalled
from tmem.server.redis_proc import free_port

PLOT_FILE = "recall_bench.png"
CONCURRENCY = 8
RECALL_TOKENS, RETENTION_TOKENS = 20, 16
ACK = "Thanks for telling me!"


PHASES = ("teach", "teach10", "chat")


def server_command(model: Path, port: int, out: Path, preset: str, label: str, extra: Sequence[str] = ()) -> list[str]:
    return tmem_command("serve", "--model", str(model), "--port", str(port), "--dtype", "float32",
                        "--gpu-memory-utilization", "0.25", "--max-model-len", "2048", "--context-tokens", "1536",
                        "--trainer-preset", preset, "--redis-data-dir", str(out / f"redis-{label}"),
                        "--a0-cache-dir", str(out / "a0"), *extra)


class Api:
    """The few calls the benchmark makes, over one HTTP client, with bounded concurrency for questions."""

    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=900, trust_env=False)
        self.slots = asyncio.Semaphore(CONCURRENCY)

    async def ask(self, question: str, sid: str | None, adapter: bool, max_tokens: int) -> str:
        headers = {"X-TMEM-Record": "false", "X-TMEM-Context": "none", "X-TMEM-Adapter": "on" if adapter else "off"}
        if sid:
            headers["X-Session-ID"] = sid
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
        async with self.slots:
            response = await self.http.post("/v1/chat/completions", json=body, headers=headers)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"] or "")

    async def ask_all(self, questions: Sequence[str], sid: str | None, adapter: bool, max_tokens: int) -> list[str]:
        return list(await asyncio.gather(*(self.ask(q, sid, adapter, max_tokens) for q in questions)))

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.http.post(path, json=body)
        response.raise_for_status()
        return dict(response.json())

    async def flush(self, sid: str) -> tuple[float, dict[str, Any]]:
        """Seconds until every pending update of `sid` is live, and the session's info after it."""
        started = time.perf_counter()
        await self.post(f"/v1/sessions/{sid}/flush", {"timeout": 600})
        elapsed = time.perf_counter() - started
        info = await self.http.get(f"/v1/sessions/{sid}")
        return elapsed, dict(info.json())


def say(message: str) -> None:
    print(f"[recall] {message}", file=sys.stderr, flush=True)


async def recall_of(api: Api, sid: str, facts: Sequence[Any]) -> dict[str, Any]:
    """Facts recalled from the weights alone, adapter on vs off, with the replies."""
    questions = [f.question for f in facts]
    on, off = await asyncio.gather(api.ask_all(questions, sid, True, RECALL_TOKENS),
                                   api.ask_all(questions, sid, False, RECALL_TOKENS))
    return {"on": sum(map(recalled, on, facts)) / len(facts), "off": sum(map(recalled, off, facts)) / len(facts),
            "replies": [{"q": q, "on": a, "off": b} for q, a, b in zip(questions, on, off, strict=True)]}


async def retention_of(api: Api, sid: str, base: list[str]) -> dict[str, Any]:
    """Share of general prompts whose adapted greedy reply agrees with the base model's in its first 8 words."""
    adapted = await api.ask_all(GENERAL_PROMPTS, sid, True, RETENTION_TOKENS)
    same = [first_words(a) == first_words(b) for a, b in zip(adapted, base, strict=True)]
    changed = [{"prompt": p, "base": b, "adapted": a} for p, a, b, s in zip(GENERAL_PROMPTS, adapted, base, same,
                                                                          strict=True) if not s]
    return {"share": sum(same) / len(same), "changed": changed}


async def teach_once(api: Api, sid: str) -> dict[str, Any]:
    pairs = [{"instruction": f.question, "output": f.answer} for f in FACTS]
    await api.post(f"/v1/sessions/{sid}/memories", {"pairs": pairs})
    seconds, info = await api.flush(sid)
    return {"update_s": seconds, "version": info["adapter_version"], "loss": info["last_update"]["final_loss"]}


async def teach_successively(api: Api, sid: str, per_update: int = 2) -> dict[str, Any]:
    times = []
    for start in range(0, len(FACTS), per_update):
        pairs = [{"instruction": f.question, "output": f.answer} for f in FACTS[start:start + per_update]]
        await api.post(f"/v1/sessions/{sid}/memories", {"pairs": pairs})
        seconds, info = await api.flush(sid)
        times.append(seconds)
    return {"update_s": sum(times) / len(times), "version": info["adapter_version"]}


async def chat_ingest(api: Api, sid: str) -> dict[str, Any]:
    messages = [m for f in FACTS for m in ({"role": "user", "content": f.statement},
                                           {"role": "assistant", "content": ACK})]
    await api.post(f"/v1/sessions/{sid}/messages", {"messages": messages})
    seconds, info = await api.flush(sid)
    report = info["last_update"] or {}
    memories = (await api.http.get(f"/v1/sessions/{sid}/memories")).json().get("data", [])
    covered = sum(any(f.keyword in f"{m['instruction']} {m['output']}".lower() for m in memories) for f in FACTS)
    return {"update_s": seconds, "version": info["adapter_version"], "pairs_kept": report.get("pairs_kept", 0),
            "pairs_extracted": report.get("pairs_extracted", 0), "facts_in_pairs": covered,
            "extract_s": report.get("timings", {}).get("extract"),
            "chunks": report.get("chunks", 0), "fallback_chunks": report.get("raw_chunks", 0)}


async def kl_to_base(api: Api, sid: str, model: Path, out: Path) -> float:
    """Mean per-token KL(base ‖ adapted) on the held-out text, with the session's downloaded adapter."""
    import io
    import tarfile

    response = await api.http.get(f"/v1/sessions/{sid}/adapter")
    response.raise_for_status()
    dest = out / f"adapter-{sid}"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    (adapter_dir,) = list(dest.iterdir())
    return await asyncio.to_thread(_kl, model, adapter_dir)


def _kl(model_dir: Path, adapter_dir: Path) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(HELD_OUT_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        p = torch.log_softmax(base(ids).logits.float(), -1)
        adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        q = torch.log_softmax(adapted(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


async def judged(api: Api, sid: str, base: list[str], model: Path, out: Path) -> dict[str, Any]:
    """A taught session's recall, retention and KL to the base model."""
    return {"recall": await recall_of(api, sid, FACTS), "retention": await retention_of(api, sid, base),
            "kl": await kl_to_base(api, sid, model, out)}


async def bench_preset(url: str, preset: str, model: Path, out: Path,
                       phases: Sequence[str] = PHASES) -> dict[str, Any]:
    api = Api(url)
    result: dict[str, Any] = {"preset": preset}
    try:
        say(f"{preset}: base answers to {len(GENERAL_PROMPTS)} general prompts")
        base = await api.ask_all(GENERAL_PROMPTS, None, False, RETENTION_TOKENS)
        if "teach" in phases:
            say(f"{preset}: teach {len(FACTS)} facts in one update")
            result["teach"] = await teach_once(api, f"{preset}-teach")
            result["teach"] |= await judged(api, f"{preset}-teach", base, model, out)
        if "teach10" in phases:
            say(f"{preset}: teach the same facts 2 per update, 10 updates")
            result["teach10"] = await teach_successively(api, f"{preset}-teach10")
            result["teach10"] |= await judged(api, f"{preset}-teach10", base, model, out)
        if "chat" in phases:
            say(f"{preset}: ingest a conversation stating the facts in passing")
            result["chat"] = await chat_ingest(api, f"{preset}-chat")
            result["chat"] |= {"recall": await recall_of(api, f"{preset}-chat", FACTS),
                               "retention": await retention_of(api, f"{preset}-chat", base)}
        return result
    finally:
        await api.http.aclose()


def headline(results: list[dict[str, Any]]) -> dict[str, Any]:
    line: dict[str, Any] = {"bench": "recall", "facts": len(FACTS), "general_prompts": len(GENERAL_PROMPTS)}
    for r in results:
        p = r["preset"]
        for phase in (phase for phase in PHASES if phase in r):
            line[f"{p}_{phase}_recall_on"] = round(r[phase]["recall"]["on"], 3)
            line[f"{p}_{phase}_recall_off"] = round(r[phase]["recall"]["off"], 3)
            line[f"{p}_{phase}_retention"] = round(r[phase]["retention"]["share"], 3)
            line[f"{p}_{phase}_update_s"] = round(r[phase]["update_s"], 2)
        for phase in (phase for phase in ("teach", "teach10") if phase in r):
            line[f"{p}_{phase}_kl"] = round(r[phase]["kl"], 4)
        if "chat" in r:
            for key in ("pairs_extracted", "pairs_kept", "facts_in_pairs", "extract_s"):
                line[f"{p}_chat_{key}"] = r["chat"][key]
    return line


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'preset':9} {'phase':8} {'recall on':>9} {'off':>5} {'on-off':>7} {'retention':>9} {'KL':>7} "
            f"{'s/update':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        for phase in (phase for phase in PHASES if phase in r):
            cell = r[phase]
            on, off = cell["recall"]["on"], cell["recall"]["off"]
            kl = f"{cell['kl']:.4f}" if "kl" in cell else "-"
            rows.append(f"{r['preset']:9} {phase:8} {on:9.0%} {off:5.0%} {on - off:+7.0%} "
                        f"{cell['retention']['share']:9.0%} {kl:>7} {cell['update_s']:8.1f}")
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()

    phases = [phase for phase in PHASES if all(phase in r for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        xs = [i + k * width for i in range(len(phases))]
        axes[0].bar(xs, [r[p]["recall"]["on"] for p in phases], width, label=f"{r['preset']} adapter on")
        axes[0].scatter(xs, [r[p]["recall"]["off"] for p in phases], color="black", zorder=3,
                        label="adapter off" if k == 0 else None)
        axes[1].bar(xs, [r[p]["retention"]["share"] for p in phases], width, label=r["preset"])
    for ax, title in zip(axes, ("recall from the weights alone (X-TMEM-Context: none)",
                                "retention: general replies unchanged (first 8 words)"), strict=True):
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(phases))], phases)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: what a session remembers, and what it keeps")
    return save_figure(fig, path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("recall_bench", __doc__, model=Path(".cache/demo-model"))
    parser.add_argument("--presets", default="paper,default")
    parser.add_argument("--phases", default=",".join(PHASES), help="which of teach,teach10,chat to run")
    parser.add_argument("--variant", action="append", default=[], metavar='LABEL="FLAGS"',
                        help="also run each preset with these extra `tmem serve` flags (repeatable)")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := set(phases) - set(PHASES):
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    variants: list[tuple[str, list[str]]] = [("", []), *(_variant(text, parser) for text in args.variant)]
    args.out.mkdir(parents=True, exist_ok=True)
    from tmem.adapters.demo_model import build_demo_model

    if args.model == Path(".cache/demo-model"):
        build_demo_model(args.model)
    results = []
    for preset in args.presets.split(","):
        for suffix, extra in variants:
            label = f"{preset}-{suffix}" if suffix else preset
            port = free_port()
            with HttpServer(f"tmem ({label})", server_command(args.model, port, args.out, preset, label, extra),
                               port, args.out / f"server-{label}.log") as server:
                results.append(asyncio.run(bench_preset(server.url, label, args.model, args.out, phases)))
            (args.out / "results.json").write_text(json.dumps(results, indent=1))  # kept if a later run fails
    print(table(results))
    print(f"plot: {plot(results, args.out / PLOT_FILE)}")
    print(json.dumps(headline(results)))
    return 0


def _variant(text: str, parser: argparse.ArgumentParser) -> tuple[str, list[str]]:
    label, sep, flags = text.partition("=")
    if not sep or not label:
        parser.error(f'--variant wants LABEL="FLAGS", got {text!r}')
    return label, shlex.split(flags)


if __name__ == "__main__":
    raise SystemExit(main())
