"""The update benchmark: a quick in-process run writes its report, and both routes do the same math."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tmem.bench.update_bench import PAIRS, PLOT_FILE, main, steps_to_threshold

HEADLINE_KEYS = {
    "bench",
    "tiny_speedup",
    "large_speedup",
    "tiny_s_per_update",
    "large_s_per_update",
    "svd_steps",
    "random_steps",
}
MAX_STEPS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, Any]]:
    """One `--quick` run shared by the tests: (output dir, stdout lines, returned headline).

    The run's own wall time is written beside its results, so a test can bound the timings it reports.
    """
    out = tmp_path_factory.mktemp("update-bench")
    stdout = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        figures = main(["--quick", "--out", str(out), "--repeats", "2", "--max-steps", str(MAX_STEPS)])
    (out / "wall_s.txt").write_text(str(time.perf_counter() - started))
    return out, stdout.getvalue().strip().splitlines(), figures


@pytest.mark.slow
def test_results_json_has_every_field(quick_run: tuple[Path, list[str], dict[str, Any]]) -> None:
    out, _, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    wall = float((out / "wall_s.txt").read_text())
    assert results["meta"]["quick"] is True
    epochs = results["meta"]["trainer"]["epochs"]
    assert results["meta"]["trainer"]["lr"] == 5e-4 and epochs == 5
    assert [m["label"] for m in results["models"]] == ["tiny", "large"]
    timed = 0.0
    for model in results["models"]:
        assert model["examples"] == len(PAIRS) and model["answer_tokens"] >= len(PAIRS)  # each answer a token or more
        assert model["total_tokens"] > model["answer_tokens"]
        ours, peft = model["routes"]["ours"], model["routes"]["peft"]
        assert model["speedup"] == pytest.approx(peft["s_per_update"] / ours["s_per_update"])
        assert model["speedup_best"] == pytest.approx(peft["min_s"] / ours["min_s"])
        for timing in (ours, peft):
            # The figures are the measured seconds: median and best of the two repeats, rates derived from them.
            assert len(timing["seconds"]) == 2
            assert timing["s_per_update"] == pytest.approx(statistics.median(timing["seconds"]))
            assert timing["min_s"] == min(timing["seconds"]) <= timing["s_per_update"]
            assert timing["answer_tok_s"] == pytest.approx(model["answer_tokens"] * epochs / timing["s_per_update"])
            assert timing["total_tok_s"] / timing["answer_tok_s"] == pytest.approx(
                model["total_tokens"] / model["answer_tokens"])
            timed += sum(timing["seconds"])
    assert timed < wall  # the timed updates are part of the run, not more than it
    curves = results["curves"]
    assert curves["lr"] == 5e-3 and curves["threshold_fraction"] == 0.5
    for init in ("svd", "random"):
        losses = curves["inits"][init]["losses"]
        assert len(losses) == MAX_STEPS
        assert losses[0] == pytest.approx(curves["initial_loss"], rel=1e-5)  # B0 = 0: both start at the base
    # The SVD A0 carries the base weights' scale, so at the same lr it moves the loss faster.
    assert curves["inits"]["svd"]["losses"][-1] < curves["inits"]["random"]["losses"][-1]


@pytest.mark.slow
def test_both_routes_reach_the_same_loss(quick_run: tuple[Path, list[str], dict[str, Any]]) -> None:
    out, _, _ = quick_run
    for model in json.loads((out / "results.json").read_text())["models"]:
        ours, peft = model["routes"]["ours"], model["routes"]["peft"]
        assert ours["final_loss"] == pytest.approx(peft["final_loss"], rel=1e-3), model["label"]
        assert ours["first_loss"] == pytest.approx(peft["first_loss"], rel=1e-5), model["label"]
        # One update at lr 5e-4 moves the loss by less than 1e-3 relative on these models, so the
        # routes must also agree far more tightly than the update moved it: a PEFT route that trained
        # a different Δ (or nothing) fails here.
        moved = ours["first_loss"] - ours["final_loss"]
        assert moved > 1e-3
        assert abs(ours["final_loss"] - peft["final_loss"]) < 0.01 * moved


@pytest.mark.slow
def test_writes_a_png_plot(quick_run: tuple[Path, list[str], dict[str, Any]]) -> None:
    out, _, _ = quick_run
    assert (out / PLOT_FILE).read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_last_stdout_line_is_the_headline(quick_run: tuple[Path, list[str], dict[str, Any]]) -> None:
    out, lines, figures = quick_run
    headline = json.loads(lines[-1])
    assert set(headline) == HEADLINE_KEYS and headline["bench"] == "update"
    results = json.loads((out / "results.json").read_text())
    assert headline == figures == results["headline"]
    for model in results["models"]:  # the headline quotes the measured figures, rounded
        label = model["label"]
        assert headline[f"{label}_speedup"] == round(model["speedup"], 3)
        assert headline[f"{label}_s_per_update"] == round(model["routes"]["ours"]["s_per_update"], 4)
    assert [headline["svd_steps"], headline["random_steps"]] == [
        results["curves"]["inits"][init]["steps_to_threshold"] for init in ("svd", "random")]
    assert any(line.startswith("tiny ") for line in lines) and any(line.startswith("large ") for line in lines)


@pytest.mark.parametrize(
    ("losses", "threshold", "expected"),
    [([4.0, 3.0, 2.0, 1.0], 2.0, 2), ([4.0, 3.0], 1.0, None), ([1.0, 0.5], 2.0, 0), ([], 1.0, None)],
)
def test_steps_to_threshold(losses: list[float], threshold: float, expected: int | None) -> None:
    assert steps_to_threshold(losses, threshold) == expected
