"""``python -m trainer.plot RUN_DIR [--out PNG]``: loss, val_loss and lr against the global step.

Reads ``RUN_DIR/metrics.jsonl`` (each step once, a resumed run included) and writes
``RUN_DIR/metrics.png``: training and validation loss on top, the learning rate below, on one
shared axis of optimizer steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def read_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a run, in step order.

    Raises:
        FileNotFoundError: ``run_dir`` holds no metrics.jsonl.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"RUN_DIR {run_dir} has no metrics.jsonl; pass a run folder (run.dir)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = sorted((r for r in records if "loss" in r), key=lambda r: r["step"])
    evals = sorted((r for r in records if "val_loss" in r), key=lambda r: r["step"])
    return train, evals


def draw(train: list[dict[str, Any]], evals: list[dict[str, Any]], title: str) -> Figure:
    """Two panels sharing the step axis; the lines are labelled "loss", "val_loss" and "lr"."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 5), dpi=100, layout="constrained")
    loss_axes, lr_axes = figure.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss", linewidth=1.2)
    if evals:
        loss_axes.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            label="val_loss",
            marker="o",
            markersize=4,
            linewidth=1.2,
        )
    loss_axes.set_ylabel("loss (nats/token)")
    loss_axes.set_title(title, fontsize=10)
    loss_axes.legend(loc="upper right", fontsize=8)
    loss_axes.grid(alpha=0.3)
    lr_axes.plot([r["step"] for r in train], [r["lr"] for r in train], label="lr", color="tab:green")
    lr_axes.set_ylabel("learning rate")
    lr_axes.set_xlabel("global step (optimizer steps)")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_axes.set_ylim(bottom=0)
    lr_axes.grid(alpha=0.3)
    return figure


def main(argv: list[str] | None = None) -> Figure:
    """Plot the run folder named in ``argv`` (default: the command line) into a PNG; the figure.

    Raises:
        SystemExit: status 2 when the folder has no metrics.jsonl or no training step in it yet.
    """
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plot", description="Plot loss, val_loss and lr of a ramp run."
    )
    parser.add_argument("run_dir", type=Path, help="the run folder (run.dir), holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    try:
        train, evals = read_records(args.run_dir)
    except FileNotFoundError as err:
        print(f"plot: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if not train:
        print(f"plot: error: {args.run_dir}/metrics.jsonl holds no training step yet", file=sys.stderr)
        raise SystemExit(2)
    figure = draw(train, evals, f"{args.run_dir.resolve().name}: {len(train)} logged steps")
    out = args.out or args.run_dir / "metrics.png"
    figure.savefig(out)
    print(f"wrote {out}")
    return figure


if __name__ == "__main__":
    main()
