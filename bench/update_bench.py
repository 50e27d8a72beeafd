"""Cost of one online update: our hooked trainer vs a plain PEFT training loop, and SVD vs random A0.

    python -m tmem.bench.update_bench --out DIR [--quick] [--threads N] [--lr-curve 5e-3] [--max-steps 200]

Both routes train the same Δ = B·A0 (same A0, same examples, same batches and order, SGD on B only),
so their final losses must agree; only the cost differs. The second part counts SGD steps until the
answer loss falls to a fraction of its starting value, for the SVD and the random A-init.
Progress goes to stderr; stdout gets the tables and, last, one JSON line of headline figures.
On a machine shared with other jobs, `--threads 1` gives far steadier timings than torch's default.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tmem.adapters.fast_weights import FastWeightModel
from tmem.adapters.spec import AInit, FastWeightSpec
from tmem.adapters.supervision import Example, collate, encode_pairs, padding_id
from tmem.adapters.tiny_model import build_tiny_model
from tmem.adapters.trainer import OnlineTrainer, TrainerConfig, epoch_schedule, make_optimizer
from tmem.bench.harness import bench_parser, pyplot, save_figure

PAPER_LAST_LAYERS = 4
PLOT_FILE = "update_bench.png"


@dataclass
class QAPair:  # not frozen: supervision.Pair is a protocol with plain (settable) attributes
    """One extracted question–answer pair, as the update worker would receive it."""

    instruction: str
    output: str


PAIRS: tuple[QAPair, ...] = (
    QAPair("What is the user's name?", "The user's name is Maria."),
    QAPair("Where does Maria live?", "Maria lives in Lisbon."),
    QAPair("What does Maria do for a living?", "She works as a nurse."),
    QAPair("Who is Maria's sister?", "Her sister is Olivia."),
    QAPair("Where does Olivia live?", "Olivia lives in Toronto."),
    QAPair("When is Maria's birthday?", "Maria's birthday is on March 14."),
    QAPair("What drink does Maria prefer in the morning?", "She prefers green tea."),
    QAPair("Which sport does Maria play?", "Maria plays tennis on Saturdays."),
    QAPair("Where is Maria travelling in July?", "She is going to Tokyo in July 2025."),
    QAPair("Who is going to Tokyo with Maria?", "Her friend Chen is going with her."),
    QAPair("What is Maria's favorite food?", "Her favorite food is sushi."),
    QAPair("When did Maria start learning the piano?", "She started in 2019."),
    QAPair("What is the name of Maria's dog?", "Her dog is called Biscuit."),
    QAPair("When is the team meeting?", "The team meeting is on Monday at 10 o'clock."),
    QAPair("Which book is Maria reading?", "She is reading a book about the history of Rome."),
    QAPair("What music does Maria dislike?", "Maria does not like rock music."),
)


@dataclass(frozen=True)
class ModelSize:
    """A random-weight model to benchmark: its label in the report and its shape."""

    label: str
    layers: int
    hidden: int


FULL_SIZES = (ModelSize("tiny", 4, 256), ModelSize("large", 16, 512))
QUICK_SIZES = (ModelSize("tiny", 2, 128), ModelSize("large", 4, 256))

UpdateFn = Callable[[], tuple[float, float]]  # one update from B = 0 -> (first, final) step loss


def spec_for(layers: int, a_init: AInit = "svd") -> FastWeightSpec:
    """The paper's spec, adapting every layer when a smoke-test model has fewer than four."""
    return FastWeightSpec(last_layers=min(PAPER_LAST_LAYERS, layers), a_init=a_init)


def load_base(model_dir: Path) -> Any:
    """A fresh float32 copy of the base model, so one route's hooks or wrappers never reach another."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def ours_route(model_dir: Path, tokenizer: Any, spec: FastWeightSpec,
               config: TrainerConfig) -> tuple[UpdateFn, FastWeightModel]:
    """One update through FastWeightModel + OnlineTrainer from B = 0."""
    fast = FastWeightModel(load_base(model_dir), spec)
    trainer = OnlineTrainer(fast, tokenizer, config)

    def update() -> tuple[float, float]:
        result = trainer.update(fast.zero_b(), PAIRS)
        if not result.applied or not result.losses:
            raise RuntimeError(f"our update was rejected: {result.reason}")
        return result.losses[0], result.losses[-1]

    return update, fast


def install_a0(peft_model: Any, a0: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Copy our A0 into every lora_A and freeze it; return the lora_B weights (the only trained tensors)."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    lora_names = {name for name, module in base.named_modules() if isinstance(module, LoraLayer)}
    if lora_names != set(a0):
        raise RuntimeError(f"PEFT adapted {sorted(lora_names)} but A0 covers {sorted(a0)}")
    b_params: list[torch.Tensor] = []
    for name in sorted(a0):
        module = base.get_submodule(name)
        lora_a, lora_b = module.lora_A["default"].weight, module.lora_B["default"].weight
        with torch.no_grad():
            lora_a.copy_(a0[name])
        lora_a.requires_grad_(False)
        b_params.append(lora_b)
    return b_params


def peft_route(model_dir: Path, tokenizer: Any, spec: FastWeightSpec, layers: list[int],
               a0: dict[str, torch.Tensor], config: TrainerConfig) -> UpdateFn:
    """One update through `get_peft_model` and a standard loop with the full-vocab HF loss."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=spec.rank, lora_alpha=spec.rank, target_modules=list(spec.target_modules),
                      layers_to_transform=layers, layers_pattern="layers", lora_dropout=0.0)
    model = get_peft_model(load_base(model_dir), lora)
    model.eval()  # no dropout anywhere; eval() only makes that explicit
    b_params = install_a0(model, a0)
    pad_id = padding_id(tokenizer)  # OnlineTrainer's padding

    def update() -> tuple[float, float]:
        with torch.no_grad():
            for b in b_params:
                b.zero_()  # every update starts a new session at B = 0, as ours does
        examples = encode_pairs(tokenizer, PAIRS, config.max_seq_len, config.system_prompt)
        return peft_train(model, b_params, examples, config, pad_id)

    return update


def peft_train(model: Any, b_params: list[torch.Tensor], examples: list[Example], cfg: TrainerConfig,
               pad_id: int) -> tuple[float, float]:
    """The trainer's optimizer on lora_B, with the trainer's batches in the trainer's order (`epoch_schedule`).

    Returns the loss of the first and of the last step.
    """
    optimizer = make_optimizer(cfg, b_params)
    losses: list[float] = []
    for _, rows in epoch_schedule(examples, cfg):
        ids, mask, labels = collate([examples[i] for i in rows], pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    return losses[0], losses[-1]


def time_routes(label: str, routes: dict[str, UpdateFn], repeats: int, clock: str = "wall") -> dict[str, Any]:
    """One untimed warm-up per route, then `repeats` timed rounds.

    The routes alternate within each round (and swap order every round) so that load from other
    processes on a shared machine falls on all alike. Both clocks are kept (`wall_s`, `cpu_s`); `clock` picks
    the one reported as `seconds`, its median and its least. With one torch thread the process CPU time is
    the time the work itself took, which stays meaningful on a machine shared with other jobs (wall time
    there mostly measures the neighbours).
    """
    for route in routes.values():
        route()
    wall: dict[str, list[float]] = {name: [] for name in routes}
    cpu: dict[str, list[float]] = {name: [] for name in routes}
    losses: dict[str, tuple[float, float]] = {}
    names = list(routes)
    with tqdm(total=repeats * len(names), desc=f"{label:<12}", unit="run") as bar:
        for round_ in range(repeats):
            for name in names if round_ % 2 == 0 else reversed(names):
                wall_0, cpu_0 = time.perf_counter(), time.process_time()
                losses[name] = routes[name]()
                cpu[name].append(time.process_time() - cpu_0)
                wall[name].append(time.perf_counter() - wall_0)
                bar.update(1)
    chosen = cpu if clock == "cpu" else wall
    return {name: {"seconds": chosen[name], "wall_s": wall[name], "cpu_s": cpu[name],
                   "s_per_update": statistics.median(chosen[name]), "min_s": min(chosen[name]),
                   "first_loss": losses[name][0], "final_loss": losses[name][1]} for name in names}


def add_rates(route: dict[str, Any], answer_tokens: int, total_tokens: int, epochs: int) -> dict[str, Any]:
    """Tokens per second: every epoch trains on every token once."""
    seconds = route["s_per_update"]
    route["answer_tok_s"] = answer_tokens * epochs / seconds
    route["total_tok_s"] = total_tokens * epochs / seconds
    return route


def bench_model(size: ModelSize, model_dir: Path, config: TrainerConfig, repeats: int) -> dict[str, Any]:
    """Time both routes on one model and check that they reached the same loss."""
    tokenizer = load_tokenizer(model_dir)
    spec = spec_for(size.layers)
    examples = encode_pairs(tokenizer, PAIRS, config.max_seq_len, config.system_prompt)
    answer_tokens = sum(ex.answer_tokens for ex in examples)
    total_tokens = sum(len(ex.input_ids) for ex in examples)
    ours_update, fast = ours_route(model_dir, tokenizer, spec, config)
    params, layers = sum(p.numel() for p in fast.model.parameters()), fast.layers
    peft_update = peft_route(model_dir, tokenizer, spec, layers, fast.a0, config)
    timed = time_routes(size.label, {"ours": ours_update, "peft": peft_update}, repeats)
    ours, peft = timed["ours"], timed["peft"]
    diff = abs(ours["final_loss"] - peft["final_loss"])
    return {
        **asdict(size), "params": params, "adapted_layers": layers, "examples": len(examples),
        "answer_tokens": answer_tokens, "total_tokens": total_tokens,
        "routes": {"ours": add_rates(ours, answer_tokens, total_tokens, config.epochs),
                   "peft": add_rates(peft, answer_tokens, total_tokens, config.epochs)},
        "speedup": peft["s_per_update"] / ours["s_per_update"],
        "speedup_best": peft["min_s"] / ours["min_s"],  # robust to bursts of load on a shared machine
        "loss_abs_diff": diff, "loss_rel_diff": diff / max(abs(peft["final_loss"]), 1e-12),
    }


def loss_curve(model_dir: Path, layers: int, a_init: AInit, lr: float, max_steps: int) -> list[float]:
    """Training loss per SGD step over chained one-epoch updates (B carried over, as within a session)."""
    fast = FastWeightModel(load_base(model_dir), spec_for(layers, a_init))
    trainer = OnlineTrainer(fast, load_tokenizer(model_dir), TrainerConfig(lr=lr, epochs=1))
    b, losses = fast.zero_b(), list[float]()
    with tqdm(total=max_steps, desc=f"curve {a_init:<6}", unit="step") as bar:
        while len(losses) < max_steps:
            result = trainer.update(b, PAIRS)
            losses.extend(result.losses)
            bar.update(result.steps)
            if not result.applied:
                tqdm.write(f"{a_init}: update rejected ({result.reason}); curve stops at {len(losses)} steps",
                           file=sys.stderr)
                break
            b = result.b
    return losses[:max_steps]


def steps_to_threshold(losses: Sequence[float], threshold: float) -> int | None:
    """SGD steps taken before the loss first fell to `threshold` (None: not within the curve)."""
    return next((step for step, loss in enumerate(losses) if loss <= threshold), None)


def bench_curves(size: ModelSize, model_dir: Path, lr: float, max_steps: int, fraction: float) -> dict[str, Any]:
    """SVD vs random A0 on one model; both start at the base loss since B0 = 0."""
    inits: tuple[AInit, ...] = ("svd", "random")
    curves = {init: loss_curve(model_dir, size.layers, init, lr, max_steps) for init in inits}
    initial = curves["svd"][0]
    threshold = fraction * initial
    return {
        "model": size.label, "lr": lr, "max_steps": max_steps, "threshold_fraction": fraction,
        "initial_loss": initial, "threshold_loss": threshold,
        "inits": {init: {"losses": curve, "steps_to_threshold": steps_to_threshold(curve, threshold),
                         "final_loss": curve[-1] if curve else math.nan} for init, curve in curves.items()},
    }


def format_tables(models: list[dict[str, Any]], curves: dict[str, Any], config: TrainerConfig) -> str:
    """Plain-text tables: both routes side by side per model, then steps to the loss threshold."""
    head = (f"{'model':<6} {'shape':>7} {'params':>7} {'s/upd ours':>10} {'s/upd peft':>10} "
            f"{'speed-up':>8} {'(best)':>6} "
            f"{'ans tok/s ours':>14} {'ans tok/s peft':>14} {'tok/s ours':>10} {'tok/s peft':>10} "
            f"{'loss ours':>9} {'loss peft':>9} {'|Δloss|':>8}")
    lines = [f"One update: SGD lr {config.lr:g}, {config.epochs} epochs, batch {config.batch_size}, "
             f"{len(PAIRS)} pairs; median of timed updates after one warm-up "
             "(best: ratio of the fastest)", head, "-" * len(head)]
    for m in models:
        ours, peft = m["routes"]["ours"], m["routes"]["peft"]
        lines.append(
            f"{m['label']:<6} {m['layers']:>3}x{m['hidden']:<3} {m['params'] / 1e6:>6.1f}M "
            f"{ours['s_per_update']:>10.3f} {peft['s_per_update']:>10.3f} "
            f"{m['speedup']:>7.2f}x {m['speedup_best']:>5.2f}x "
            f"{ours['answer_tok_s']:>14.0f} {peft['answer_tok_s']:>14.0f} {ours['total_tok_s']:>10.0f} "
            f"{peft['total_tok_s']:>10.0f} {ours['final_loss']:>9.5f} {peft['final_loss']:>9.5f} "
            f"{m['loss_abs_diff']:>8.1e}")
    lines += ["", f"Steps to loss <= {curves['threshold_fraction']:g} x initial "
              f"({curves['initial_loss']:.3f} -> {curves['threshold_loss']:.3f}) on {curves['model']}: "
              f"SGD lr {curves['lr']:g}, batch {config.batch_size}, at most {curves['max_steps']} steps",
              f"{'A-init':<7} {'steps':>12} {'final loss':>10}"]
    for init, data in curves["inits"].items():
        steps = data["steps_to_threshold"]
        lines.append(f"{init:<7} {'not reached' if steps is None else steps:>12} {data['final_loss']:>10.4f}")
    return "\n".join(lines)


def plot(models: list[dict[str, Any]], curves: dict[str, Any], path: Path) -> Path:
    """Left: seconds per update per model and route. Right: SVD vs random loss curves and the threshold."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(models))
    for offset, route in ((-0.2, "ours"), (0.2, "peft")):
        left.bar([i + offset for i in x], [m["routes"][route]["s_per_update"] for m in models], width=0.4,
                 label="FastWeightModel + OnlineTrainer" if route == "ours" else "PEFT + standard loop")
    left.set_xticks(list(x), [f"{m['label']}\n{m['layers']}x{m['hidden']}" for m in models])
    left.set_yscale("log")  # the models differ by ~10x; a linear axis hides the small one
    left.set_ylabel("seconds per update")
    left.set_title("One update (median)")
    left.legend()
    for init, data in curves["inits"].items():
        right.plot(range(len(data["losses"])), data["losses"], label=f"{init} A0")
    right.axhline(curves["threshold_loss"], color="grey", linestyle="--", label="threshold")
    right.set_xlabel("SGD step")
    right.set_ylabel("answer loss")
    right.set_title(f"A-init on {curves['model']} (SGD lr {curves['lr']:g})")
    right.legend()
    return save_figure(fig, path, dpi=120)


def headline(models: list[dict[str, Any]], curves: dict[str, Any]) -> dict[str, Any]:
    """The figures people compare across runs: speed-ups, our seconds per update, steps to threshold."""
    by_label = {m["label"]: m for m in models}
    return {
        "bench": "update",
        "tiny_speedup": round(by_label["tiny"]["speedup"], 3),
        "large_speedup": round(by_label["large"]["speedup"], 3),
        "tiny_s_per_update": round(by_label["tiny"]["routes"]["ours"]["s_per_update"], 4),
        "large_s_per_update": round(by_label["large"]["routes"]["ours"]["s_per_update"], 4),
        "svd_steps": curves["inits"]["svd"]["steps_to_threshold"],
        "random_steps": curves["inits"]["random"]["steps_to_threshold"],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = bench_parser("update_bench", __doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models for a smoke run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timed updates per route (median reported)")
    parser.add_argument("--lr-curve", type=float, default=5e-3, help="SGD lr for the A-init curves")
    parser.add_argument("--max-steps", type=int, default=200, help="SGD steps per A-init curve")
    parser.add_argument("--threshold", type=float, default=0.5, help="target loss as a fraction of the initial")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.max_steps < 1 or not 0 < args.threshold < 1:
        parser.error("--repeats and --max-steps must be >= 1 and --threshold in (0, 1)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write results.json and the PNG plot under --out, print tables and headline.

    Returns the headline figures (also the last line printed to stdout).
    """
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bars report progress; HF's save/load bars are noise here
    try:
        figures = run(args)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models, time both routes, trace the A-init curves; write and print the results."""
    config = TrainerConfig()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    models: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="update-bench-") as tmp:
        dirs = {}
        for size in sizes:
            tqdm.write(f"[{size.label}] building random model: {size.layers} layers, hidden {size.hidden}",
                       file=sys.stderr)
            dirs[size.label] = build_tiny_model(Path(tmp) / size.label, layers=size.layers, hidden=size.hidden)
            models.append(bench_model(size, dirs[size.label], config, args.repeats))
        curves = bench_curves(sizes[0], dirs[sizes[0].label], args.lr_curve, args.max_steps, args.threshold)
    meta = {"quick": args.quick, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": args.repeats, "pairs": len(PAIRS), "trainer": config.model_dump()}
    return report(args.out, meta, models, curves, config)


def report(out: Path, meta: dict[str, Any], models: list[dict[str, Any]], curves: dict[str, Any],
           config: TrainerConfig) -> dict[str, Any]:
    """Write results.json and the plot, print the tables and, last, the headline JSON line."""
    figures = headline(models, curves)
    results = {"meta": meta, "models": models, "curves": curves, "headline": figures}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(models, curves, out / PLOT_FILE)
    print(format_tables(models, curves, config))
    print(f"\nwrote {out / 'results.json'} and {out / PLOT_FILE}")
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
