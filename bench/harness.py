"""What every benchmark here shares: its command line (`--out`, `--model`) and how it writes a plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def bench_parser(module: str, doc: str, model: Path | None = None) -> argparse.ArgumentParser:
    """`python -m tmem.bench.MODULE`'s parser: `doc` as help, `--out DIR`, and `--model DIR` if a default is given."""
    parser = argparse.ArgumentParser(prog=f"python -m tmem.bench.{module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the results, the plot and any logs")
    if model is not None:
        parser.add_argument("--model", type=Path, default=model, help=f"model directory (default {model})")
    return parser


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only (never a display), imported when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Lay out `fig`, write it to `path` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
