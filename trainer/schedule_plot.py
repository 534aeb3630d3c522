"""``python -m trainer.schedule_plot [overrides] [--out PNG]``: a configuration's LR curve, before any GPU hour.

It composes the same Hydra config as ``trainer.main`` (same ``conf/``, same overrides, same
validation) and builds only the schedule, with the code the trainer uses, so the curve is the LR
each global step will train at. No model, data or process group is built. It writes a PNG with two
panels, the LR against the global step and against the tokens trained on, with every batch change of
``train.batch_schedule`` marked; and it prints the key values (where warmup ends, the peak, the LR of
the last step), the run's length, warmup and decay start in steps, tokens and samples, and the table of
batch stages. Epochs need the data, so the preview leaves them out. ``--world-size`` previews the
run on that many ranks (default: ``WORLD_SIZE``, else 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.config import compose
from trainer.durations import Batching, BatchRamp, Clock, Segment
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


POINTS = 20_000
"""The most steps a curve evaluates: a longer run is drawn every ``max_steps / POINTS`` steps (and its last)."""


def curve(schedule: Schedule) -> tuple[list[int], list[float]]:
    """The LR of every global step 1..max_steps (of every n-th, and the last, past :data:`POINTS` steps)."""
    stride = -(-schedule.max_steps // POINTS)
    steps = list(range(1, schedule.max_steps + 1, stride))
    if steps[-1] != schedule.max_steps:
        steps.append(schedule.max_steps)
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


def _clock(schedule: Schedule) -> Clock:
    if schedule.clock is None:
        raise ValueError("the schedule has no clock: build it with Config.schedule_for to know its tokens")
    return schedule.clock


def tokens_curve(schedule: Schedule) -> tuple[list[int], list[float]]:
    """The LR of every global step against the tokens trained on after it."""
    clock = _clock(schedule)
    steps, lrs = curve(schedule)
    return [clock.samples_after(step) * clock.seq_len for step in steps], lrs


def stages(schedule: Schedule) -> tuple[Segment, ...]:
    """The batch stages the run trains (one with a fixed batch)."""
    return _clock(schedule).segments_until(schedule.max_steps)


def draw(schedule: Schedule) -> Figure:
    """The curve as a matplotlib Figure (no pyplot, no global backend): two panels, against the global
    step and against the tokens trained on, each with the line labelled "lr", the warmup's end and a
    "batch change" line at the first step of every batch stage after the first."""
    from matplotlib.figure import Figure

    steps, lrs = curve(schedule)
    tokens, _ = tokens_curve(schedule)
    points = key_points(schedule)
    seq_len = _clock(schedule).seq_len
    changed = stages(schedule)[1:]  # marked where they start: a step, and the tokens trained before it
    marks = {"step": [s.first_step for s in changed], "tokens": [s.samples_before * seq_len for s in changed]}
    figure = Figure(figsize=(7, 5.6), dpi=100, layout="constrained")
    by_step, by_tokens = figure.subplots(2, 1)
    for axes, xs, unit in ((by_step, steps, "global step (optimizer steps)"), (by_tokens, tokens, "tokens")):
        axes.plot(xs, lrs, label="lr", color="tab:blue", linewidth=1.6)
        if points.warmup_end is not None:
            end = points.warmup_end[0]
            at = end if axes is by_step else _clock(schedule).samples_after(end) * seq_len
            axes.axvline(at, color="0.6", linestyle=":", linewidth=1, label="warmup end")
        for i, mark in enumerate(marks["step" if axes is by_step else "tokens"]):
            label = "batch change" if i == 0 else None
            axes.axvline(mark, color="tab:orange", linestyle="--", linewidth=1, label=label)
        axes.set_xlim(0, xs[-1])
        axes.set_ylim(bottom=0)
        axes.set_xlabel(unit)
        axes.set_ylabel("learning rate")
        axes.ticklabel_format(style="sci", scilimits=(-3, 3))
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right", fontsize=8)
    by_step.set_title(
        f"{schedule.name}: peak {points.peak[1]:.3g}, {schedule.max_steps} steps, {tokens[-1]:,} tokens",
        fontsize=10,
    )
    return figure


def _units(clock: Clock, step: int, samples_exactly: int | None = None) -> str:
    if isinstance(clock, BatchRamp) and samples_exactly is not None:  # a point inside a step
        return f"{samples_exactly:,} samples = {samples_exactly * clock.seq_len:,} tokens, in step {step:,}"
    samples = clock.samples_after(step)
    return f"step {step:,} = {samples * clock.seq_len:,} tokens = {samples:,} samples"


def stage_table(schedule: Schedule) -> list[str]:
    """The batch stages as table lines: from which step and tokens, the global batch, the accumulation."""
    clock = _clock(schedule)
    header = (
        f"  {'from step':>10}  {'from tokens':>14}  {'sequences/step':>14}  {'tokens/step':>12}  {'accum':>5}"
    )
    lines = [header]
    for segment in stages(schedule):
        lines.append(
            f"  {segment.first_step:>10,}  {segment.samples_before * clock.seq_len:>14,}  "
            f"{segment.global_batch:>14,}  {segment.global_batch * clock.seq_len:>12,}  "
            f"{clock.grad_accum(segment.first_step):>5}"
        )
    return lines


def report(schedule: Schedule) -> str:
    """The key points as the four lines the command prints."""
    points = key_points(schedule)
    warmup = f"step {points.warmup_end[0]:<8d} lr {points.warmup_end[1]:.4e}" if points.warmup_end else "none"
    lines = [
        f"schedule {schedule.name}, {schedule.max_steps} steps, optim.lr={schedule.peak_lr:g}",
        f"  warmup end  {warmup}",
        f"  peak        step {points.peak[0]:<8d} lr {points.peak[1]:.4e}",
        f"  end         step {points.end[0]:<8d} lr {points.end[1]:.4e}",
    ]
    if schedule.clock is not None:
        clock = schedule.clock
        world = clock.world_size
        lines += [
            f"length        {_units(clock, schedule.max_steps)}",
            f"warmup        {_units(clock, schedule.warmup_steps, schedule.warmup_units)}",
            f"decay after   {_units(clock, schedule.decay_start, schedule.decay_start_units)}",
            f"batch stages on {world} rank{'s' if world > 1 else ''}"
            + ("" if isinstance(clock, Batching) else " (train.batch_schedule; the LR counts samples)"),
            *stage_table(schedule),
        ]
    return "\n".join(lines)


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
    parser.add_argument(
        "--world-size",
        type=int,
        default=int(os.environ.get("WORLD_SIZE", "1")),
        help="ranks the run trains on (default: WORLD_SIZE, else 1)",
    )
    args = parser.parse_args(argv)
    if args.world_size < 1:
        print(f"schedule_plot: error: --world-size={args.world_size} must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    try:
        schedule = compose(args.overrides).schedule_for(args.world_size)
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
