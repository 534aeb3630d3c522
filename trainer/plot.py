"""``python -m trainer.plot RUN_DIR [RUN_DIR ...] [--out PNG]``: loss, val_loss and lr against the global step.

Reads ``RUN_DIR/metrics.jsonl`` (each step once, a resumed run included) and writes
``RUN_DIR/metrics.png``: training and validation loss on top, the learning rate below, on one
shared axis of optimizer steps. Given several run folders (a parent and its branches, see
``branch.*``), it overlays them into ``<first RUN_DIR>/branches.png``: loss and val_loss on top, lr
below, against the global step (left) and against tokens (right), one colour per run.
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


def branch_point(run_dir: Path, parent: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The parent's record at the step ``run_dir`` branched off (its history.jsonl says which), if logged."""
    history = run_dir / "history.jsonl"
    if not history.exists():
        return None
    first = json.loads(history.read_text(encoding="utf-8").splitlines()[0])
    if first.get("start") != "branched":
        return None
    step = first["parent"]["step"]
    return next((r for r in parent if r["step"] == step), None)


Run = tuple[str, list[dict[str, Any]], list[dict[str, Any]]]
"""(name, training records, evaluation records) of one run folder."""


def overlay(runs: list[Run]) -> Figure:
    """Several runs in one figure: a 2 x 2 grid (loss and val_loss, then lr; against the step, then
    tokens); each run's lines are labelled "<name> loss", "<name> val_loss" and "<name> lr"."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 6), dpi=100, layout="constrained")
    grid = figure.subplots(2, 2, height_ratios=[2, 1], sharex="col")
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for (name, train, evals), colour in zip(runs, colours, strict=True):
        tokens_at = {r["step"]: r["tokens"] for r in train}
        for column, key in enumerate(("step", "tokens")):
            xs = [r[key] for r in train]
            seen = [r for r in evals if key == "step" or r["step"] in tokens_at]
            seen_xs = [r["step"] if key == "step" else tokens_at[r["step"]] for r in seen]
            loss_axes, lr_axes = grid[0][column], grid[1][column]
            loss_axes.plot(xs, [r["loss"] for r in train], label=f"{name} loss", color=colour, linewidth=1.1)
            if seen:
                loss_axes.plot(
                    seen_xs,
                    [r["val_loss"] for r in seen],
                    label=f"{name} val_loss",
                    color=colour,
                    marker="o",
                    markersize=3,
                    linestyle=":",
                )
            lr_axes.plot(xs, [r["lr"] for r in train], label=f"{name} lr", color=colour)
    for column, unit in enumerate(("global step (optimizer steps)", "tokens")):
        grid[0][column].set_ylabel("loss (nats/token)")
        grid[1][column].set_ylabel("learning rate")
        grid[1][column].set_xlabel(unit)
        grid[1][column].set_ylim(bottom=0)
        for axes in (grid[0][column], grid[1][column]):
            axes.grid(alpha=0.3)
            axes.ticklabel_format(style="sci", scilimits=(-3, 4))
    grid[0][0].legend(loc="upper right", fontsize=7)
    grid[0][0].set_title(f"{runs[0][0]} and {len(runs) - 1} more", fontsize=10)
    return figure


def main(argv: list[str] | None = None) -> Figure:
    """Plot the run folder named in ``argv`` (default: the command line) into a PNG; the figure.

    Raises:
        SystemExit: status 2 when the folder has no metrics.jsonl or no training step in it yet.
    """
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plot", description="Plot loss, val_loss and lr of a ramp run."
    )
    parser.add_argument(
        "run_dirs",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="run folders (run.dir), holding metrics.jsonl",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG path (default: RUN_DIR/metrics.png, or branches.png for several)",
    )
    args = parser.parse_args(argv)
    runs: list[Run] = []
    for run_dir in args.run_dirs:
        try:
            train, evals = read_records(run_dir)
        except FileNotFoundError as err:
            print(f"plot: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        if not train:
            print(f"plot: error: {run_dir}/metrics.jsonl holds no training step yet", file=sys.stderr)
            raise SystemExit(2)
        runs.append((run_dir.resolve().name, train, evals))
    first = args.run_dirs[0]
    for run_dir, (_, train, _) in zip(args.run_dirs[1:], runs[1:], strict=True):
        joined = branch_point(run_dir, runs[0][1])
        if joined is not None:  # the branch's curve starts where it left its parent's
            train.insert(0, joined)
    if len(runs) > 1:
        figure = overlay(runs)
        out = args.out or first / "branches.png"
    else:
        name, train, evals = runs[0]
        figure = draw(train, evals, f"{name}: {len(train)} logged steps")
        out = args.out or first / "metrics.png"
    figure.savefig(out)
    print(f"wrote {out}")
    return figure


if __name__ == "__main__":
    main()
