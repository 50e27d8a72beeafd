"""The update benchmark: a quick in-process run writes its report, and both routes do the same math."""

from __future__ import annotations

import contextlib
import io
import json
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
    """One `--quick` run shared by the tests: (output dir, stdout lines, returned headline)."""
    out = tmp_path_factory.mktemp("update-bench")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        figures = main(["--quick", "--out", str(out), "--repeats", "2", "--max-steps", str(MAX_STEPS)])
    return out, stdout.getvalue().strip().splitlines(), figures


@pytest.mark.slow
def test_results_json_has_every_field(quick_run: tuple[Path, list[str], dict[str, Any]]) -> None:
    out, _, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["quick"] is True
    assert results["meta"]["trainer"]["lr"] == 5e-4 and results["meta"]["trainer"]["epochs"] == 5
    assert [m["label"] for m in results["models"]] == ["tiny", "large"]
    for model in results["models"]:
        assert model["examples"] == len(PAIRS) and model["answer_tokens"] > 0
        assert model["total_tokens"] > model["answer_tokens"]
        assert model["speedup"] > 0 and model["speedup_best"] > 0
        for route in ("ours", "peft"):
            timing = model["routes"][route]
            assert len(timing["seconds"]) == 2 and timing["s_per_update"] > 0
            assert timing["answer_tok_s"] > 0 and timing["total_tok_s"] > timing["answer_tok_s"]
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
    assert headline == figures == json.loads((out / "results.json").read_text())["headline"]
    assert any(line.startswith("tiny ") for line in lines) and any(line.startswith("large ") for line in lines)


@pytest.mark.parametrize(
    ("losses", "threshold", "expected"),
    [([4.0, 3.0, 2.0, 1.0], 2.0, 2), ([4.0, 3.0], 1.0, None), ([1.0, 0.5], 2.0, 0), ([], 1.0, None)],
)
def test_steps_to_threshold(losses: list[float], threshold: float, expected: int | None) -> None:
    assert steps_to_threshold(losses, threshold) == expected
