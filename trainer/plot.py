"""``python -m trainer.plot RUN_DIR [RUN_DIR ...] [--out PNG]``: loss, val_loss and lr against the global step;
``python -m trainer.plot --sweep SWEEP_DIR``: a sweep's report.

Reads ``RUN_DIR/metrics.jsonl`` (each step once, a resumed run included) and writes
``RUN_DIR/metrics.png``: training and validation loss on top, the learning rate below, on one
shared axis of optimizer steps. Given several run folders (a parent and its branches, see
``branch.*``), it overlays them into ``<last RUN_DIR>/branches.png`` (a branch's folder, never its parent's): loss and val_loss on top, lr
below, against the global step (left) and against tokens (right), one colour per run. Given a sweep's
folder (``--sweep outputs/<sweep name>``, see :mod:`trainer.sweep`), it prints every job's final and
best validation loss, steps and status, best first, and writes ``sweep.png``: the loss curves coloured
by the swept value, the final validation loss against it, and the LR curves.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
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


def starts(run_dir: Path) -> list[dict[str, Any]]:
    """The run's starts, oldest first (history.jsonl: fresh, resumed, changed, branched, weights), each
    with ``config``: the config it trained with (config.yaml, with the keys later starts changed set back)."""
    history = run_dir / "history.jsonl"
    if not history.exists() or not (run_dir / "config.yaml").exists():
        return []
    import yaml

    records = [json.loads(line) for line in history.read_text(encoding="utf-8").splitlines() if line.strip()]
    tree = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    for record in reversed(records):
        record["config"] = json.loads(json.dumps(tree))
        for key, (old, _) in record.get("changed", {}).items():
            *groups, leaf = key.split(".")
            node = tree
            for group in groups:
                node = node.setdefault(group, {})
            if old is None:
                node.pop(leaf, None)
            else:
                node[leaf] = old
    return records


MAX_POINTS = 20_000
"""The most steps a drawn LR curve evaluates; a longer run is drawn at a stride (and at every start's end)."""


def schedule_lrs(runs: list[dict[str, Any]], last_step: int) -> tuple[list[int], list[float]] | None:
    """The LR at every step up to ``last_step`` (at most :data:`MAX_POINTS` of them), each start's schedule (rebuilt from its config: the
    LR is a pure function of the step) over the steps it trained; None when a start did not record its
    world size (an older ramp) or its config no longer builds."""
    from trainer.config import from_tree
    from trainer.errors import ConfigError

    curve: dict[int, float] = {}
    ends = [record["step"] for record in runs[1:]] + [last_step]
    stride = max(1, last_step // MAX_POINTS)
    for record, end in zip(runs, ends, strict=True):
        if "world_size" not in record:
            return None
        try:
            schedule = from_tree(record["config"]).schedule_for(
                record["world_size"], record["samples_per_epoch"]
            )
        except (ValueError, ConfigError):
            return None
        for step in [step for step in curve if step > record["step"]]:
            del curve[step]  # a resume trains again the steps after its checkpoint
        points = [*range(record["step"] + 1, end + 1, stride), end]
        curve.update({step: schedule.lr(step) for step in points if step > record["step"]})
    return sorted(curve), [curve[step] for step in sorted(curve)]


def draw(
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    title: str,
    lr_curve: tuple[list[int], list[float]] | None = None,
    resumes: list[tuple[int, str]] | None = None,
) -> Figure:
    """Two panels sharing the step axis; the lines are labelled "loss", "val_loss" and "lr". With
    ``lr_curve``, the LR is drawn at every step (the logged ones as dots); each of ``resumes`` (step,
    kind) is a dotted vertical line across both panels."""
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
    if lr_curve is None:
        lr_axes.plot([r["step"] for r in train], [r["lr"] for r in train], label="lr", color="tab:green")
    else:
        lr_axes.plot(*lr_curve, label="lr", color="tab:green")
        lr_axes.plot(
            [r["step"] for r in train], [r["lr"] for r in train], "o", markersize=2, color="tab:green"
        )
    for number, (step, _) in enumerate(resumes or []):
        for axes in (loss_axes, lr_axes):
            label = "resume" if axes is lr_axes and not number else None
            axes.axvline(step, linestyle=":", color="grey", label=label)
    if resumes:
        lr_axes.legend(loc="upper right", fontsize=8)
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


@dataclass(frozen=True)
class SweepJob:
    """One job of a sweep folder, read back: its swept values, records and how far it got."""

    folder: str
    """Its run folder's name: the swept overrides, e.g. ``optim.lr=0.001``."""
    values: dict[str, str]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    status: str
    """finished (its last checkpoint is at the run's length), interrupted, or not run."""

    @property
    def final_val_loss(self) -> float:
        """The last evaluation's loss (nan without one)."""
        return float(self.evals[-1]["val_loss"]) if self.evals else math.nan

    @property
    def best_val_loss(self) -> float:
        """The lowest evaluation loss (nan without one)."""
        return min((float(e["val_loss"]) for e in self.evals), default=math.nan)


def _expected_folders(sweep_dir: Path) -> list[str]:
    """The job folders the sweep's command asks for, in its order (from Hydra's multirun.yaml)."""
    import itertools

    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser

    saved = sweep_dir / ".hydra" / "multirun.yaml"
    if not saved.exists():
        return []
    task = yaml.safe_load(saved.read_text())["hydra"]["overrides"]["task"]
    sweeps = [o for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()]
    values = [[f"{o.key_or_group}={v}" for v in o.sweep_string_iterator()] for o in sweeps]
    return [",".join(sorted(combo)) for combo in itertools.product(*values)]


def _status(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / "latest"
    if latest.exists():
        meta = json.loads((run_dir / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())
        if meta.get("max_steps", 0) and meta["step"] >= meta["max_steps"]:
            return "finished"
    return "interrupted" if (run_dir / "metrics.jsonl").exists() else "not run"


def sweep_jobs(sweep_dir: Path) -> list[SweepJob]:
    """Every job of a sweep folder (``outputs/<sweep name>``): those its command asks for, and any other
    run folder in it (not the folders of a run that shares the name: its checkpoints, wandb), each with
    its records and status."""
    found = sorted(
        p.name
        for p in sweep_dir.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "config.yaml").exists()  # a run's folder
    )
    names = _expected_folders(sweep_dir)
    names += [name for name in found if name not in names]
    jobs = []
    for name in names:
        run_dir = sweep_dir / name
        train, evals = read_records(run_dir) if (run_dir / "metrics.jsonl").exists() else ([], [])
        values = dict(item.split("=", 1) for item in name.split(",") if "=" in item)
        jobs.append(SweepJob(name, values, train, evals, _status(run_dir) if run_dir.exists() else "not run"))
    return jobs


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def sweep_figure(jobs: list[SweepJob], title: str) -> Figure:
    """Three panels: every job's loss against the step, coloured by its swept value; the final validation
    loss against the first swept key's value (a log axis for positive numbers); every job's LR curve.
    Each job's lines are labelled with its folder name."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    ran = [job for job in jobs if job.train]
    key = next(iter(ran[0].values), None) if ran else None
    numbers = [_number(job.values.get(key, "")) if key else None for job in ran]
    order = sorted(range(len(ran)), key=lambda i: (numbers[i] is None, numbers[i] or 0.0, ran[i].folder))
    palette = colormaps["viridis"]
    colour = {i: palette(rank / max(1, len(ran) - 1)) for rank, i in enumerate(order)}
    figure = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    losses, finals, lrs = figure.subplots(1, 3)
    for i, job in enumerate(ran):
        steps = [r["step"] for r in job.train]
        losses.plot(steps, [r["loss"] for r in job.train], color=colour[i], label=job.folder, linewidth=1.1)
        lrs.plot(steps, [r["lr"] for r in job.train], color=colour[i], label=job.folder)
    points = sorted(
        (float(number), job.final_val_loss, i)
        for i, (job, number) in enumerate(zip(ran, numbers, strict=True))
        if number is not None and not math.isnan(job.final_val_loss)
    )
    if points:
        finals.plot(
            [p[0] for p in points], [p[1] for p in points], color="0.6", linewidth=1, label="final val_loss"
        )
        finals.scatter(
            [p[0] for p in points], [p[1] for p in points], c=[colour[p[2]] for p in points], zorder=3
        )
        if all(p[0] > 0 for p in points):
            finals.set_xscale("log")
            finals.xaxis.set_minor_formatter(NullFormatter())
    finals.set_xlabel(key or "swept value")
    finals.set_ylabel("final val_loss (nats/token)")
    losses.set_xlabel("global step (optimizer steps)")
    losses.set_ylabel("loss (nats/token)")
    losses.set_title(title, fontsize=10)
    losses.legend(fontsize=7, loc="upper right")
    lrs.set_xlabel("global step (optimizer steps)")
    lrs.set_ylabel("learning rate")
    lrs.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for axes in (losses, finals, lrs):
        axes.grid(alpha=0.3)
    return figure


def sweep_table(jobs: list[SweepJob]) -> str:
    """The jobs sorted by final validation loss (those without one last): overrides, steps, status."""
    ordered = sorted(jobs, key=lambda j: (math.isnan(j.final_val_loss), j.final_val_loss, j.folder))
    width = max([len("job"), *(len(job.folder) for job in jobs)])
    lines = [f"{'job':<{width}}  {'steps':>7}  {'final val':>9}  {'best val':>9}  status"]
    for job in ordered:
        steps = job.train[-1]["step"] if job.train else 0
        lines.append(
            f"{job.folder:<{width}}  {steps:>7}  {job.final_val_loss:>9.4f}  {job.best_val_loss:>9.4f}  {job.status}"
        )
    return "\n".join(lines)


def sweep_report(sweep_dir: Path, out: Path | None) -> Figure:
    """Print the sweep's table and write its figure (default ``SWEEP_DIR/sweep.png``).

    Raises:
        SystemExit: status 2 when the folder holds no job with a training record.
    """
    jobs = sweep_jobs(sweep_dir) if sweep_dir.is_dir() else []
    if not any(job.train for job in jobs):
        print(f"plot: error: --sweep {sweep_dir} holds no job with a training record", file=sys.stderr)
        raise SystemExit(2)
    figure = sweep_figure(jobs, f"{sweep_dir.resolve().name}: {len(jobs)} jobs")
    out = out or sweep_dir / "sweep.png"
    figure.savefig(out)
    print(sweep_table(jobs))
    print(f"wrote {out}")
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
        nargs="*",
        metavar="RUN_DIR",
        help="run folders (run.dir), holding metrics.jsonl",
    )
    parser.add_argument(
        "--sweep", type=Path, default=None, help="a sweep's folder (outputs/<sweep name>): its report"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="PNG path (default: RUN_DIR/metrics.png, or the last RUN_DIR's branches.png for several)",
    )
    args = parser.parse_args(argv)
    if args.sweep is not None:
        return sweep_report(args.sweep, args.out)
    if not args.run_dirs:
        parser.error("give a RUN_DIR, or --sweep SWEEP_DIR")
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
        out = args.out or args.run_dirs[-1] / "branches.png"  # the last one: a parent is never written
    else:
        name, train, evals = runs[0]
        history = starts(first)
        curve = schedule_lrs(history, train[-1]["step"]) if history else None
        resumes = [(r["step"], r["start"]) for r in history[1:]]
        figure = draw(train, evals, f"{name}: {len(train)} logged steps", curve, resumes)
        out = args.out or first / "metrics.png"
    figure.savefig(out)
    print(f"wrote {out}")
    return figure


if __name__ == "__main__":
    main()
