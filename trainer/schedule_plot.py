"""``python -m trainer.schedule_plot [overrides] [--out PNG]``: a configuration's LR curve, before any GPU hour.

It composes the same Hydra config as ``trainer.main`` (same ``conf/``, same overrides, same
validation) and builds only the schedule, with the code the trainer uses, so the curve is the LR
each global step will train at. No model, data or process group is built. It writes a PNG and
prints the key values: where warmup ends, the peak, and the LR of the last step.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import compose
from trainer.errors import ConfigError
from trainer.schedules import Schedule

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass(frozen=True)
class KeyPoints:
    """Where a curve's warmup ends, where it peaks, and where it ends."""

    warmup_end: tuple[int, float] | None
    """(last warmup step, its LR); None without warmup."""
    peak: tuple[int, float]
    """(first step at the highest LR, that LR)."""
    end: tuple[int, float]
    """(train.max_steps, the LR the last step trains at)."""


def curve(schedule: Schedule) -> tuple[list[int], list[float]]:
    """The LR of every global step 1..max_steps."""
    steps = list(range(1, schedule.max_steps + 1))
    return steps, [schedule.lr(step) for step in steps]


def key_points(schedule: Schedule) -> KeyPoints:
    """The schedule's warmup end, peak and last step, with their LRs."""
    steps, lrs = curve(schedule)
    top = max(range(len(lrs)), key=lambda i: (lrs[i], -i))
    warmup = min(schedule.warmup_steps, schedule.max_steps)
    return KeyPoints(
        warmup_end=(warmup, schedule.lr(warmup)) if warmup > 0 else None,
        peak=(steps[top], lrs[top]),
        end=(steps[-1], lrs[-1]),
    )


def draw(schedule: Schedule) -> Figure:
    """The curve as a matplotlib Figure (no pyplot, no global backend): the line labelled "lr"."""
    from matplotlib.figure import Figure

    steps, lrs = curve(schedule)
    points = key_points(schedule)
    figure = Figure(figsize=(7, 3.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.plot(steps, lrs, label="lr", color="tab:blue", linewidth=1.6)
    if points.warmup_end is not None:
        axes.axvline(points.warmup_end[0], color="0.6", linestyle=":", linewidth=1, label="warmup end")
    axes.set_xlim(0, schedule.max_steps)
    axes.set_ylim(bottom=0)
    axes.set_xlabel("global step (optimizer steps)")
    axes.set_ylabel("learning rate")
    axes.set_title(f"{schedule.name}: peak {points.peak[1]:.3g}, {schedule.max_steps} steps", fontsize=10)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    return figure


def report(schedule: Schedule) -> str:
    """The key points as the four lines the command prints."""
    points = key_points(schedule)
    warmup = f"step {points.warmup_end[0]:<8d} lr {points.warmup_end[1]:.4e}" if points.warmup_end else "none"
    return "\n".join(
        [
            f"schedule {schedule.name}, {schedule.max_steps} steps, optim.lr={schedule.peak_lr:g}",
            f"  warmup end  {warmup}",
            f"  peak        step {points.peak[0]:<8d} lr {points.peak[1]:.4e}",
            f"  end         step {points.end[0]:<8d} lr {points.end[1]:.4e}",
        ]
    )


def main(argv: list[str] | None = None) -> Figure:
    """The command line: write the PNG, print the key points; return the figure.

    Raises:
        SystemExit: with code 2 and one ``schedule_plot: error:`` line on a bad configuration.
    """
    parser = argparse.ArgumentParser(
        prog="python -m trainer.schedule_plot",
        description="Draw the LR curve of a ramp configuration (Hydra overrides as for trainer.main).",
    )
    parser.add_argument("overrides", nargs="*", help="e.g. schedule=cosine train.max_steps=1000")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: lr_<schedule>.png)")
    args = parser.parse_args(argv)
    try:
        schedule = compose(args.overrides).lr_schedule
    except ConfigError as err:
        print(f"schedule_plot: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    figure = draw(schedule)
    out = args.out or Path(f"lr_{schedule.name}.png")
    figure.savefig(out)
    print(report(schedule))
    print(f"wrote {out}")
    return figure


if __name__ == "__main__":
    main()
