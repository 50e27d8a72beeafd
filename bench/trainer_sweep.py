"""Trainer settings side by side on the real model, in-process (no server): how each one trades recall for retention.

    python -m tmem.bench.trainer_sweep --out DIR [--model .cache/demo-model] [--configs NAME,...]

Each configuration teaches the 20 facts of `tmem.bench.recall_data` to a fresh B with the server's own
trainer (`BatchedTrainer`, anchors from `tmem.adapters.anchors`), either in one update or 2 per update over
10 successive updates (with the server's rehearsal of earlier memories, `replay`), then asks every
fact (greedy, no context) and the 30 general prompts. Recall counts replies naming the fact's keyword;
retention counts general replies whose first 8 words equal the base model's. This is the fast loop
used to calibrate the `default` preset; `tmem.bench.recall_bench` measures the chosen presets end to end
through the API. Output: a table, `trainer_sweep.png`, `results.json`, and one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tmem.adapters.anchors import ANCHOR_PROMPTS
from tmem.adapters.supervision import ContextPair, render_chat_ids
from tmem.adapters.trainer import TrainerConfig
from tmem.bench.harness import bench_parser, pyplot, save_figure
from tmem.bench.recall_data import FACTS, GENERAL_PROMPTS, first_words, recalled

ADAM = {"optimizer": "adam", "lr": 1e-3, "epochs": 12, "batch_size": 16, "max_grad_norm": 1.0, "target_loss": 0.2}
DOWN = {"target_modules": ("down_proj",)}
# name → (trainer settings, successive updates?, memories rehearsed per update, fast-weight spec changes)
CONFIGS: dict[str, tuple[dict[str, Any], bool, int, dict[str, Any]]] = {
    "paper": ({}, False, 0, {}),
    "adam": (ADAM, False, 0, {}),
    "adam+anchors8": ({**ADAM, "anchors": 8}, False, 0, {}),
    "adam+anchors16": ({**ADAM, "anchors": 16}, False, 0, {}),
    "adam+anchors48": ({**ADAM, "anchors": 48}, False, 0, {}),
    "adam+anchors48 down": ({**ADAM, "anchors": 48}, False, 0, DOWN),
    "adam+anchors48 last2": ({**ADAM, "anchors": 48}, False, 0, {"last_layers": 2}),
    "x10 adam+anchors8": ({**ADAM, "anchors": 8}, True, 0, {}),
    "x10 adam+anchors8+replay16": ({**ADAM, "anchors": 8}, True, 16, {}),
    "x10 adam+anchors48+replay16": ({**ADAM, "anchors": 48}, True, 16, {}),
    "x10 adam+replay16": (ADAM, True, 16, {}),
}


class Lab:
    """The frozen model, its fast weights and the base model's answers, loaded once."""

    def __init__(self, model_dir: Path, cache: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tmem.adapters.a_init import model_identity
        from tmem.adapters.anchors import load_or_make_anchors
        from tmem.adapters.fast_weights import FastWeightModel
        from tmem.adapters.spec import FastWeightSpec

        self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.cache = cache
        self.fast = FastWeightModel(self.model, FastWeightSpec(), a0_cache_dir=cache)
        self._fast_by_spec = {self.fast.spec: self.fast}
        identity = model_identity(self.model, self.fast.targets, self.fast.spec)
        # The base model's answers do not depend on the spec: one set, as many as there are prompts.
        self.anchors = load_or_make_anchors(self.model, self.tokenizer, identity, cache, len(ANCHOR_PROMPTS))
        self.base = self.ask(GENERAL_PROMPTS, None)

    def fast_for(self, changes: dict[str, Any]) -> Any:
        """The fast weights of the default spec with `changes` (hooks stay idle unless a B is in use)."""
        from tmem.adapters.fast_weights import FastWeightModel
        from tmem.adapters.spec import FastWeightSpec

        spec = FastWeightSpec(**changes)
        if spec not in self._fast_by_spec:
            self._fast_by_spec[spec] = FastWeightModel(self.model, spec, a0_cache_dir=self.cache)
        self.fast = self._fast_by_spec[spec]
        return self.fast

    def ask(self, prompts: Sequence[str], b: Any, max_new_tokens: int = 16) -> list[str]:
        replies = []
        with self.fast.using(b):
            for prompt in prompts:
                ids = torch.tensor([render_chat_ids(self.tokenizer, [{"role": "user", "content": prompt}])])
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
                replies.append(str(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
        return replies

    def run(self, name: str, settings: dict[str, Any], successive: bool, replay: int,
            spec: dict[str, Any]) -> dict[str, Any]:
        from tmem.adapters.batched import BatchedTrainer

        trainer = BatchedTrainer(self.fast_for(spec), self.tokenizer, TrainerConfig(**settings), anchors=self.anchors)
        pairs = [ContextPair(f.question, f.answer) for f in FACTS]
        updates = [(pairs[max(0, i - replay):i] if replay else [], pairs[i:i + 2]) for i in range(0, 20, 2)] \
            if successive else [([], pairs)]
        b, steps, started = self.fast.zero_b(), 0, time.perf_counter()
        for earlier, new in updates:
            result = trainer.update(b, [*earlier, *new])
            b, steps = result.b, steps + result.steps
        seconds = time.perf_counter() - started
        answers = self.ask([f.question for f in FACTS], b)
        general = self.ask(GENERAL_PROMPTS, b)
        return {"name": name, "updates": len(updates), "steps": steps, "train_s": seconds / len(updates),
                "recall": sum(map(recalled, answers, FACTS)) / len(FACTS),
                "retention": sum(first_words(a) == first_words(c) for a, c in zip(general, self.base,
                                                                                  strict=True)) / len(general),
                "france": general[0], "example": answers[0], "general_replies": general, "base_replies": self.base}


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'configuration':28} {'updates':>7} {'steps':>5} {'recall':>6} {'retention':>9} {'s/update':>8}  "
            "capital of France?")
    lines = [head, "-" * len(head)]
    lines += [f"{r['name']:28} {r['updates']:7} {r['steps']:5} {r['recall']:6.0%} {r['retention']:9.0%} "
              f"{r['train_s']:8.1f}  {r['france'][:40]!r}" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        ax.scatter(r["retention"], r["recall"], s=60)
        ax.annotate(r["name"], (r["retention"], r["recall"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("retention (general replies unchanged, first 8 words)")
    ax.set_ylabel("recall of 20 taught facts (no context)")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("SmolLM2-135M-Instruct: trainer settings, recall vs retention", fontsize=9)
    return save_figure(fig, path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("trainer_sweep", __doc__, model=Path(".cache/demo-model"))
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    from tmem.adapters.demo_model import build_demo_model

    lab = Lab(build_demo_model(args.model) if args.model == Path(".cache/demo-model") else args.model,
              args.out / "cache")
    rows = []
    for name in args.configs.split(","):
        print(f"[sweep] {name}", file=sys.stderr, flush=True)
        rows.append(lab.run(name, *CONFIGS[name]))
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"plot: {plot(rows, args.out / 'trainer_sweep.png')}")
    print(json.dumps({"bench": "trainer_sweep", **{r["name"]: {"recall": round(r["recall"], 3),
                                                               "retention": round(r["retention"], 3)} for r in rows}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
