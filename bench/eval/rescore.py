"""Re-score an eval run's answers independently of the harness, and compare with what it reported.

    python -m tmem.bench.eval.rescore OUT   # OUT: a fresh --out of `tmem eval locomo` (answers.jsonl, results.json)

The harness scores with its own standard-library code (`tmem.bench.eval.scoring`, a Porter stemmer written
afresh). This script shares none of it: it follows LoCoMo's published `task_eval/evaluation.py`
(normalize → nltk's PorterStemmer → bag-of-tokens F1; multi-hop golds split on commas; open-domain
golds cut at ";"; adversarial questions credited for an abstention) over nltk's own stemmer, then
prints the mean F1 per (mode, category) beside the harness's `results.json` and the largest gap.
Exit status 1 when any cell differs by more than --tolerance. Needs `pip install nltk`.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ABSTAIN = ("no information available", "not mentioned")


def normalize(text: str) -> str:
    text = text.replace(",", "").lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the|and)\b", " ", text)
    return " ".join(text.split())


def f1_single(prediction: str, gold: str, stem: Any) -> float:
    pred = [stem(w) for w in normalize(prediction).split()]
    truth = [stem(w) for w in normalize(gold).split()]
    same = sum((Counter(pred) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def locomo_f1(prediction: str, gold: str, category: int, stem: Any) -> float:
    if category == 5:
        return float(any(phrase in prediction.lower() for phrase in ABSTAIN))
    if category == 1:
        parts = [g.strip() for g in gold.split(",")]
        guesses = [p.strip() for p in prediction.split(",")]
        return sum(max(f1_single(p, g, stem) for p in guesses) for g in parts) / len(parts)
    if category == 3:
        gold = gold.split(";")[0].strip()
    return f1_single(prediction, gold, stem)


def rescore(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean F1 per mode and category, plus "all" per mode (micro-averaged)."""
    from nltk.stem import PorterStemmer

    stem = PorterStemmer().stem
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in records:
        score = locomo_f1(str(r["prediction"]), str(r["gold"]), int(r["category"]), stem)
        sums[(r["mode"], str(r["category"]))].append(score)
        sums[(r["mode"], "all")].append(score)
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for (mode, category), scores in sums.items():
        table[mode][category] = sum(scores) / len(scores)
    return table


def harness_f1(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {mode: {category: cell["f1"] for category, cell in cells.items() if "f1" in cell}
            for mode, cells in results["scores"]["modes"].items()}


def compare(ours: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]]) -> tuple[str, float]:
    lines = [f"{'mode':<14}{'category':>9}{'harness F1':>12}{'rescored F1':>13}{'diff':>10}"]
    worst = 0.0
    for mode in theirs:
        for category in sorted(theirs[mode], key=lambda c: (c == "all", c)):
            a, b = theirs[mode][category], ours.get(mode, {}).get(category, float("nan"))
            worst = max(worst, abs(a - b)) if b == b else float("inf")
            lines.append(f"{mode:<14}{category:>9}{a:>12.4f}{b:>13.4f}{a - b:>10.2e}")
    return "\n".join(lines), worst


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tmem.bench.eval.rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the eval run's output directory")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args(argv)
    results = json.loads((args.out / "results.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (args.out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()]
    modes = set(harness_f1(results))
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:  # a resumed run's log answers each (mode, question) once; the first line counts
        if r["mode"] in modes:
            first.setdefault((r["mode"], r["qid"]), r)
    table, worst = compare(rescore(list(first.values())), harness_f1(results))
    print(table)
    print(f"largest |harness - rescored|: {worst:.2e} over {len(first)} answers (tolerance {args.tolerance:g})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
