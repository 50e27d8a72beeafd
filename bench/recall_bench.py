"""Do sessions remember, and stay the model they were? Recall and retention on the real model, per trainer preset.

    python -m bench.recall_bench --out DIR [--presets paper,default] [--model .cache/demo-model]

For each preset, one `tmem serve` (the demo model, SmolLM2-135M-Instruct, fp32) is started and used
through its public API only; the presets run one after the other in the same run, so their numbers
sit side by side:

- **teach**: the 20 facts of `bench.recall_data` sent to `/memories` in one update, then asked with
  `X-TMEM-Context: none`, adapter on vs off (only the weights can answer).
- **teach x10**: the same 20 facts taught 2 per update in 10 successive updates (B accumulates), asked
  again: does memory survive later updates?
- **chat**: the facts stated in passing in a conversation (one statement per user turn), ingested,
  flushed, and asked with `X-TMEM-Context: none`, adapter on vs off: extraction + training end to end.
- **retention**: 30 general prompts, asked of the taught session (adapter on, no context) and of the
  base model: the share whose greedy reply agrees in its first 8 words, after 1 and after 10 updates;
  and the mean per-token KL(base ‖ adapted) on a held-out text, from the downloaded adapter.
- **cost**: seconds per update (the flush's wall time).

Progress goes to stderr. Output: a table, `recall_bench.png`, `results.json` in --out, and last one
JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from bench.recall_data import FACTS, GENERAL_PROMPTS, HELD_OUT_TEXT, first_words, recalled
from bench.serving_bench import ManagedServer
from server.redis_proc import free_port

PLOT_FILE = "recall_bench.png"
CONCURRENCY = 8
RECALL_TOKENS, RETENTION_TOKENS = 20, 16
ACK = "Thanks for telling me!"


def server_command(model: Path, port: int, out: Path, preset: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--port", str(port),
            "--dtype", "float32", "--gpu-memory-utilization", "0.25", "--max-model-len", "2048",
            "--context-tokens", "1536", "--trainer-preset", preset, "--redis-data-dir", str(out / f"redis-{preset}"),
            "--a0-cache-dir", str(out / "a0")]


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
    return {"update_s": seconds, "version": info["adapter_version"], "pairs_kept": report.get("pairs_kept", 0),
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


async def bench_preset(url: str, preset: str, model: Path, out: Path) -> dict[str, Any]:
    api = Api(url)
    try:
        say(f"{preset}: base answers to {len(GENERAL_PROMPTS)} general prompts")
        base = await api.ask_all(GENERAL_PROMPTS, None, False, RETENTION_TOKENS)
        say(f"{preset}: teach {len(FACTS)} facts in one update")
        once = await teach_once(api, f"{preset}-teach")
        once |= {"recall": await recall_of(api, f"{preset}-teach", FACTS),
                 "retention": await retention_of(api, f"{preset}-teach", base),
                 "kl": await kl_to_base(api, f"{preset}-teach", model, out)}
        say(f"{preset}: teach the same facts 2 per update, 10 updates")
        tenfold = await teach_successively(api, f"{preset}-teach10")
        tenfold |= {"recall": await recall_of(api, f"{preset}-teach10", FACTS),
                    "retention": await retention_of(api, f"{preset}-teach10", base),
                    "kl": await kl_to_base(api, f"{preset}-teach10", model, out)}
        say(f"{preset}: ingest a conversation stating the facts in passing")
        chat = await chat_ingest(api, f"{preset}-chat")
        chat |= {"recall": await recall_of(api, f"{preset}-chat", FACTS),
                 "retention": await retention_of(api, f"{preset}-chat", base)}
        return {"preset": preset, "teach": once, "teach10": tenfold, "chat": chat}
    finally:
        await api.http.aclose()


def headline(results: list[dict[str, Any]]) -> dict[str, Any]:
    line: dict[str, Any] = {"bench": "recall", "facts": len(FACTS), "general_prompts": len(GENERAL_PROMPTS)}
    for r in results:
        p = r["preset"]
        for phase in ("teach", "teach10", "chat"):
            line[f"{p}_{phase}_recall_on"] = round(r[phase]["recall"]["on"], 3)
            line[f"{p}_{phase}_recall_off"] = round(r[phase]["recall"]["off"], 3)
            line[f"{p}_{phase}_retention"] = round(r[phase]["retention"]["share"], 3)
            line[f"{p}_{phase}_update_s"] = round(r[phase]["update_s"], 2)
        line[f"{p}_teach_kl"] = round(r["teach"]["kl"], 4)
        line[f"{p}_teach10_kl"] = round(r["teach10"]["kl"], 4)
        line[f"{p}_chat_pairs_kept"] = r["chat"]["pairs_kept"]
    return line


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'preset':9} {'phase':8} {'recall on':>9} {'off':>5} {'on-off':>7} {'retention':>9} {'KL':>7} "
            f"{'s/update':>8}")
    rows = [head, "-" * len(head)]
    for r in results:
        for phase in ("teach", "teach10", "chat"):
            cell = r[phase]
            on, off = cell["recall"]["on"], cell["recall"]["off"]
            kl = f"{cell['kl']:.4f}" if "kl" in cell else "-"
            rows.append(f"{r['preset']:9} {phase:8} {on:9.0%} {off:5.0%} {on - off:+7.0%} "
                        f"{cell['retention']['share']:9.0%} {kl:>7} {cell['update_s']:8.1f}")
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ("teach", "teach10", "chat")
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path(".cache/demo-model"))
    parser.add_argument("--presets", default="paper,default")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from adapters.demo_model import build_demo_model

    if args.model == Path(".cache/demo-model"):
        build_demo_model(args.model)
    results = []
    for preset in args.presets.split(","):
        port = free_port()
        with ManagedServer(f"tmem ({preset})", server_command(args.model, port, args.out, preset), port,
                           args.out / f"server-{preset}.log") as server:
            results.append(asyncio.run(bench_preset(server.url, preset, args.model, args.out)))
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"plot: {plot(results, args.out / PLOT_FILE)}")
    print(json.dumps(headline(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
