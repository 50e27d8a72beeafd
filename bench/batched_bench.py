"""Update speed: many sessions per forward, frozen-prefix reuse, head at answers — against one-by-one and PEFT.

    python -m tmem.bench.batched_bench --out DIR [--quick] [--threads N] [--repeats N]

(a) Sessions updated per second (16 sessions × 8 pairs, 5 epochs SGD) at group sizes 1, 4 and 16 vs
    `OnlineTrainer.update` one session at a time, on the default tiny model (4 layers, all adapted) and
    on a 16-layer one where 12 frozen blocks can be computed once per update.
(b) Seconds per update of one session (16 pairs): prefix reuse + head at answers (group of one) vs the
    plain PEFT route (get_peft_model + full-vocab HF loss), on a 16-layer hidden-512 model with 4
    adapted layers, beside the ratio of matmul FLOPs the two strictly need (see `update_flops`).
Every route trains the same Δ from the same start; the max |ΔB| against the reference is reported.
Progress goes to stderr; stdout gets the tables and, last, one JSON line of headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tmem.adapters.batched import BatchedTrainer, UpdateItem
from tmem.adapters.fast_weights import FastWeightModel
from tmem.adapters.supervision import Example, encode_pairs
from tmem.adapters.tiny_model import build_tiny_model
from tmem.adapters.trainer import OnlineTrainer, TrainerConfig, UpdateResult
from tmem.bench.harness import bench_parser, pyplot, save_figure
from tmem.bench.update_bench import (
    PAIRS,
    ModelSize,
    UpdateFn,
    load_base,
    load_tokenizer,
    peft_route,
    spec_for,
    time_routes,
)

SESSIONS, PAIRS_PER_SESSION, GROUP_SIZES = 16, 8, (1, 4, 16)
FULL_SESSION_MODELS = (ModelSize("tiny", 4, 256), ModelSize("deep", 16, 256))
QUICK_SESSION_MODELS = (ModelSize("tiny", 2, 128), ModelSize("deep", 6, 128))
FULL_PEFT_MODEL, QUICK_PEFT_MODEL = ModelSize("large", 16, 512), ModelSize("large", 6, 128)
PLOT_FILE = "batched_bench.png"


def session_items(fast: FastWeightModel) -> list[UpdateItem]:
    """16 new sessions (B = 0), each with 8 of the benchmark pairs, rotated so no two sessions match."""
    return [(fast.zero_b(), [*PAIRS[i:], *PAIRS[:i]][:PAIRS_PER_SESSION]) for i in range(SESSIONS)]


def update_flops(config: Any, first_adapted: int, rank: int, batches: Sequence[Sequence[Example]], *,
                 prefix_once: bool, full_head: bool) -> float:
    """Matmul FLOPs of one update (forward + backward) over `batches`, the steps one session takes.

    Counting assumptions: a (m×k)·(k×n) matmul is 2mkn FLOPs; norms, softmax, rotary, the loss and
    the optimizer are left out. Per token and block: the q/k/v/o and gate/up/down projections, the
    two attention matmuls (QKᵀ, PV) over the padded width, and A0 then B at each of the 3 targets of
    an adapted block. Backward: frozen weights need only the input gradient (1× their forward); the
    attention matmuls cost 2× their forward (dQ, dK, dV, dP); B also needs its weight gradient (2×).
    Blocks below the first adapted one get no backward (nothing there requires grad, in either route);
    the first adapted block is counted whole, though autograd skips its attention (same for both).
    Batches are counted at their padded width, the same for both routes. `prefix_once`: the blocks
    below the first adapted one run once per update (over unpadded examples) instead of every step;
    `full_head`: the LM head runs (and back-propagates) at every position instead of answer positions.
    """
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    proj = h * hd * (2 * heads + 2 * kv) + 3 * h * inter  # MACs per token per block
    lora = 3 * rank * (h + inter)  # A0 and B of gate, up and down
    adapted = config.num_hidden_layers - first_adapted

    def blocks(count: int, tokens: int, width: int, adapted_block: bool) -> float:
        attention = 2 * heads * hd * width
        forward = proj + attention + (lora if adapted_block else 0)
        backward = proj + 2 * attention + 2 * lora if adapted_block else 0
        return 2.0 * count * tokens * (forward + backward)

    total = 0.0
    if prefix_once:  # each example once, unpadded (the same Example objects recur across epochs)
        examples = {id(ex): ex for batch in batches for ex in batch}.values()
        total += sum(blocks(first_adapted, len(ex.input_ids), len(ex.input_ids), False) for ex in examples)
    for batch in batches:
        width = max(len(ex.input_ids) for ex in batch)
        tokens = len(batch) * width
        head_rows = tokens if full_head else sum(ex.answer_tokens for ex in batch)
        total += blocks(adapted, tokens, width, True) + 2 * 2 * head_rows * h * vocab  # head fwd + dx
        if not prefix_once:
            total += blocks(first_adapted, tokens, width, False)
    return total


def session_batches(examples: list[Example], config: TrainerConfig) -> list[list[Example]]:
    """The batches one session trains on, in OnlineTrainer's order."""
    from tmem.adapters.trainer import epoch_schedule

    return [[examples[i] for i in rows] for _, rows in epoch_schedule(examples, config)]


def max_b_diff(results: Sequence[UpdateResult], reference: Sequence[UpdateResult]) -> float:
    """Largest |ΔB| entry over every session and target (inf if any update was rejected)."""
    if not all(r.applied for r in [*results, *reference]):
        return float("inf")
    return max(float((r.b[n] - q.b[n]).abs().max()) for r, q in zip(results, reference, strict=True) for n in r.b)


def bench_sessions(size: ModelSize, model_dir: Path, config: TrainerConfig, repeats: int,
                   clock: str) -> dict[str, Any]:
    """(a): one-by-one vs groups of 1, 4, 16 (and group 1 without prefix reuse where there is a prefix)."""
    tokenizer = load_tokenizer(model_dir)
    fast = FastWeightModel(load_base(model_dir), spec_for(size.layers))
    items = session_items(fast)
    last: dict[str, list[UpdateResult]] = {}

    def route(name: str, run: Callable[[], list[UpdateResult]]) -> UpdateFn:
        def timed() -> tuple[float, float]:
            last[name] = run()
            return last[name][0].losses[0], last[name][0].losses[-1]
        return timed

    online = OnlineTrainer(fast, tokenizer, config)
    routes = {"one-by-one": route("one-by-one", lambda: [online.update(b, p) for b, p in items])}
    first = min(fast.layers)
    if first > 0:
        naive = BatchedTrainer(fast, tokenizer, config, max_group_size=1, reuse_prefix=False)
        routes["g=1 no prefix"] = route("g=1 no prefix", partial(naive.update_many, items))
    for g in GROUP_SIZES:
        trainer = BatchedTrainer(fast, tokenizer, config, max_group_size=g)
        routes[f"g={g}"] = route(f"g={g}", partial(trainer.update_many, items))
    timed = time_routes(size.label, routes, repeats, clock)
    per_session = [session_batches(encode_pairs(tokenizer, p, config.max_seq_len), config) for _, p in items]
    base = timed["one-by-one"]["s_per_update"]
    rows = {}
    for name, t in timed.items():
        prefix_once = name.startswith("g=") and "no prefix" not in name
        flops = sum(update_flops(fast.model.config, first, fast.spec.rank, b, prefix_once=prefix_once,
                                 full_head=False) for b in per_session)
        seconds = t["s_per_update"]  # here: all 16 sessions
        rows[name] = {"wall_s": t["wall_s"], "cpu_s": t["cpu_s"], "s_all": seconds,
                      "sessions_per_s": SESSIONS / seconds, "speedup": base / seconds, "gflop": flops / 1e9,
                      "gflop_s": flops / 1e9 / seconds,
                      "max_b_diff": max_b_diff(last[name], last["one-by-one"])}
    return {**asdict(size), "adapted_layers": fast.layers, "sessions": SESSIONS, "routes": rows}


def bench_vs_peft(size: ModelSize, model_dir: Path, config: TrainerConfig, repeats: int,
                  clock: str) -> dict[str, Any]:
    """(b): one session's update through PEFT, OnlineTrainer and the optimized group of one."""
    tokenizer = load_tokenizer(model_dir)
    spec = spec_for(size.layers)
    fast = FastWeightModel(load_base(model_dir), spec)
    online = OnlineTrainer(fast, tokenizer, config)
    optimized = BatchedTrainer(fast, tokenizer, config, max_group_size=1)

    def losses_of(result: UpdateResult) -> tuple[float, float]:
        if not result.applied:
            raise RuntimeError(f"update rejected: {result.reason}")
        return result.losses[0], result.losses[-1]

    routes: dict[str, UpdateFn] = {
        "peft": peft_route(model_dir, tokenizer, spec, fast.layers, fast.a0, config),
        "online": lambda: losses_of(online.update(fast.zero_b(), PAIRS)),
        "optimized": lambda: losses_of(optimized.update(fast.zero_b(), PAIRS)),
    }
    timed = time_routes(size.label, routes, repeats, clock)
    batches = session_batches(encode_pairs(tokenizer, PAIRS, config.max_seq_len), config)
    first = min(fast.layers)
    flops = {name: update_flops(fast.model.config, first, spec.rank, batches, prefix_once=name == "optimized",
                                full_head=name == "peft") for name in routes}
    peft_s = timed["peft"]["s_per_update"]
    rows = {name: {**t, "speedup_vs_peft": peft_s / t["s_per_update"], "gflop": flops[name] / 1e9,
                   "gflop_s": flops[name] / 1e9 / t["s_per_update"],
                   "loss_diff_vs_peft": abs(t["final_loss"] - timed["peft"]["final_loss"])}
            for name, t in timed.items()}
    return {**asdict(size), "adapted_layers": fast.layers, "routes": rows,
            "flop_ideal_ratio": flops["peft"] / flops["optimized"]}


def format_tables(sessions: list[dict[str, Any]], peft: dict[str, Any], config: TrainerConfig) -> str:
    """(a) routes side by side per model, then (b) with the FLOP ideal beside the measured speed-up."""
    head = (f"{'model':<6} {'shape':>7} {'route':<14} {'s/16 sess':>9} {'sess/s':>7} {'speed-up':>8} "
            f"{'GFLOP':>7} {'GFLOP/s':>7} {'max|ΔB|':>8}")
    lines = [f"(a) {SESSIONS} sessions x {PAIRS_PER_SESSION} pairs: SGD lr {config.lr:g}, {config.epochs} epochs, "
             f"batch {config.batch_size}; speed-up vs one-by-one OnlineTrainer", head, "-" * len(head)]
    for m in sessions:
        for name, r in m["routes"].items():
            lines.append(f"{m['label']:<6} {m['layers']:>3}x{m['hidden']:<3} {name:<14} {r['s_all']:>9.2f} "
                         f"{r['sessions_per_s']:>7.2f} {r['speedup']:>7.2f}x {r['gflop']:>7.1f} "
                         f"{r['gflop_s']:>7.1f} {r['max_b_diff']:>8.1e}")
    head_b = (f"{'route':<10} {'s/update':>9} {'speed-up':>8} {'GFLOP':>7} {'GFLOP/s':>7} {'|Δloss| vs peft':>15}")
    lines += ["", f"(b) one session, {len(PAIRS)} pairs, {peft['layers']}x{peft['hidden']} model, adapted layers "
              f"{peft['adapted_layers']}; speed-up vs PEFT; FLOP-count ideal {peft['flop_ideal_ratio']:.2f}x",
              head_b, "-" * len(head_b)]
    for name, r in peft["routes"].items():
        lines.append(f"{name:<10} {r['s_per_update']:>9.3f} {r['speedup_vs_peft']:>7.2f}x {r['gflop']:>7.1f} "
                     f"{r['gflop_s']:>7.1f} {r['loss_diff_vs_peft']:>15.1e}")
    return "\n".join(lines)


def plot(sessions: list[dict[str, Any]], peft: dict[str, Any], path: Path) -> Path:
    """Left: sessions per second per route and model. Right: (b) seconds per update and the FLOP ideal."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = list(dict.fromkeys(n for m in sessions for n in m["routes"]))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i, m in enumerate(sessions) if name in m["routes"]]
        left.bar(xs, [m["routes"][name]["sessions_per_s"] for m in sessions if name in m["routes"]], width=width,
                 label=name)
    left.set_xticks(range(len(sessions)), [f"{m['label']}\n{m['layers']}x{m['hidden']}" for m in sessions])
    left.set_ylabel("sessions updated per second")
    left.set_title(f"(a) {SESSIONS} sessions x {PAIRS_PER_SESSION} pairs, 5 epochs SGD")
    left.legend(fontsize=8)
    routes = peft["routes"]
    right.bar(list(routes), [r["s_per_update"] for r in routes.values()], color=["grey", "tab:blue", "tab:green"])
    ideal = routes["peft"]["s_per_update"] / peft["flop_ideal_ratio"]
    right.axhline(ideal, color="tab:red", linestyle="--", label=f"FLOP ideal ({peft['flop_ideal_ratio']:.2f}x)")
    right.set_ylabel("seconds per update")
    right.set_title(f"(b) one update, {peft['layers']}x{peft['hidden']} model")
    right.legend()
    return save_figure(fig, path, dpi=120)


def headline(sessions: list[dict[str, Any]], peft: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups people compare across runs."""
    tiny, deep = sessions[0]["routes"], sessions[1]["routes"]
    return {"bench": "batched", "speedup_g4": round(tiny["g=4"]["speedup"], 3),
            "speedup_g16": round(tiny["g=16"]["speedup"], 3),
            "prefix_speedup_16l": round(deep["g=1 no prefix"]["s_all"] / deep["g=1"]["s_all"], 3),
            "vs_peft_speedup": round(peft["routes"]["optimized"]["speedup_vs_peft"], 3),
            "flop_ideal_ratio": round(peft["flop_ideal_ratio"], 3)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = bench_parser("batched_bench", __doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models for a smoke run")
    # One thread by default: on a shared 2-core machine a second spinning thread made runs 10x noisier.
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per route (median reported)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (a) and (b), write results.json and the plot under --out, print the tables and the headline."""
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()  # our bars report progress; HF's save/load bars are noise here
    config = TrainerConfig()
    clock = "cpu" if args.threads == 1 else "wall"
    load_before = os.getloadavg()[0]
    session_sizes = QUICK_SESSION_MODELS if args.quick else FULL_SESSION_MODELS
    peft_size = QUICK_PEFT_MODEL if args.quick else FULL_PEFT_MODEL
    with tempfile.TemporaryDirectory(prefix="batched-bench-") as tmp:
        sessions = []
        for size in session_sizes:
            tqdm.write(f"(a) [{size.label}] {size.layers} layers, hidden {size.hidden}", file=sys.stderr)
            model_dir = build_tiny_model(Path(tmp) / size.label, layers=size.layers, hidden=size.hidden)
            sessions.append(bench_sessions(size, model_dir, config, args.repeats, clock))
        tqdm.write(f"(b) [{peft_size.label}] {peft_size.layers} layers, hidden {peft_size.hidden}", file=sys.stderr)
        model_dir = build_tiny_model(Path(tmp) / peft_size.label, layers=peft_size.layers, hidden=peft_size.hidden)
        peft = bench_vs_peft(peft_size, model_dir, config, args.repeats, clock)
    meta = {"quick": args.quick, "clock": clock, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": args.repeats, "cpu_count": os.cpu_count(), "trainer": config.model_dump(),
            "load_avg_1m": {"start": load_before, "end": os.getloadavg()[0]}}
    figures = headline(sessions, peft)
    (args.out / "results.json").write_text(json.dumps(
        {"meta": meta, "sessions": sessions, "vs_peft": peft, "headline": figures}, indent=2))
    plot(sessions, peft, args.out / PLOT_FILE)
    print(format_tables(sessions, peft, config))
    print(f"\nload average (1 min) {load_before:.1f} at start, {meta['load_avg_1m']['end']:.1f} at end, "
          f"{meta['cpu_count']} CPUs, {meta['threads']} torch thread(s); seconds are {clock} time")
    print(f"wrote {args.out / 'results.json'} and {args.out / PLOT_FILE}")
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
