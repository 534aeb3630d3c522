"""Branches end to end: a decay branched off a checkpoint trains exactly what the warmup-stable-decay run
that decays there trains, on 1 and 2 ranks; the parent is never written; train.stop_at then continue is
the unbroken run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import read_metrics, read_wandb_group, run_ramp, snapshot, wandb_runs
from trainer.config import compose
from trainer.plot import main as plot_main

pytestmark = pytest.mark.slow

COMMON = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "logger.wandb.mode=disabled",
    "schedule.warmup_steps=2",
]
WSD = [
    "schedule=warmup_stable_decay",
    "train.max_steps=12",
    "schedule.num_decay_steps=4",
    "schedule.warmup_type=linear",
]
PARENT = ["schedule=constant_with_warmup", "train.max_steps=8", "run.name=parent"]
TOKENS_A_STEP = {0: 256, 2: 512}  # 4 sequences of 64 tokens on each rank


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    keys = ("step", "lr", "loss", "grad_norm", "tokens", "samples")
    return [tuple(r[k] for k in keys) for r in read_metrics(run_dir)[0]]


@pytest.fixture(scope="module", params=[0, 2], ids=["1-rank", "2-ranks"])
def parent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> tuple[Path, int]:
    """A constant-LR run of the same warmup, finished at step 8 (its checkpoint there)."""
    cwd = tmp_path_factory.mktemp("parent")
    ok(run_ramp([*COMMON, *PARENT], cwd=cwd, cache_dir=cache_dir, nproc=request.param))
    return cwd, request.param


def check_overlay(cwd: Path, parent_dir: Path, names: list[str]) -> None:
    """trainer.plot of the parent and its branches: every run's lr against the step and the tokens."""
    figure = plot_main(
        [str(parent_dir), *(str(cwd / "outputs" / n) for n in names), "--out", str(cwd / "b.png")]
    )
    by_step, by_tokens = figure.axes[2], figure.axes[3]  # the lr panels, against the step and the tokens
    parent_train = read_metrics(parent_dir)[0]
    for name in ["parent", *names]:
        train = read_metrics(cwd / "outputs" / name)[0]
        if name != "parent":  # each branch's curve starts at the parent's step 8
            train = [parent_train[7], *train]
        for axes, key in ((by_step, "step"), (by_tokens, "tokens")):
            (line,) = [line for line in axes.lines if line.get_label() == f"{name} lr"]
            assert list(np.asarray(line.get_xdata())) == [r[key] for r in train]
            assert list(np.asarray(line.get_ydata())) == [r["lr"] for r in train]
    assert (cwd / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_a_decay_branched_off_a_checkpoint_trains_exactly_the_wsd_run(
    shape: str, parent: tuple[Path, int], cache_dir: Path
) -> None:
    cwd, nproc = parent
    parent_dir = cwd / "outputs" / "parent"
    before = snapshot(parent_dir)
    ok(
        run_ramp(
            [*COMMON, *WSD, f"schedule.decay_type={shape}", f"run.name=wsd-{shape}"],
            cwd=cwd,
            cache_dir=cache_dir,
            nproc=nproc,
        )
    )
    unbroken = series(cwd / "outputs" / f"wsd-{shape}")
    checkpoint = parent_dir / "checkpoints" / "step_8"
    for unit, length in (("steps", "4"), ("tokens", str(4 * TOKENS_A_STEP[nproc]))):
        name = f"branch-{shape}-{unit}"
        branch = [
            f"branch.checkpoint={checkpoint}",
            f"branch.decay_{unit}={length}",
            f"branch.decay_type={shape}",
        ]
        result = ok(
            run_ramp(
                [*COMMON, *PARENT, *branch, f"run.name={name}"], cwd=cwd, cache_dir=cache_dir, nproc=nproc
            )
        )
        assert f"branching off {checkpoint} at step 8" in result.stdout + result.stderr
        branched = series(cwd / "outputs" / name)
        assert [row[0] for row in branched] == [9, 10, 11, 12]  # the parent's step axis continues
        assert branched == unbroken[8:], unit
        history = [
            json.loads(line) for line in (cwd / "outputs" / name / "history.jsonl").read_text().splitlines()
        ]
        assert history[0]["start"] == "branched"
        assert history[0]["parent"] == {
            "run": str(parent_dir.resolve()),
            "checkpoint": str(checkpoint.resolve()),
            "step": 8,
            "name": "parent",
        }
    assert snapshot(parent_dir) == before  # the parent is never written
    check_overlay(cwd, parent_dir, [f"branch-{shape}-steps", f"branch-{shape}-tokens"])


def test_stop_at_then_the_same_command_continues_exactly(tmp_path: Path, cache_dir: Path) -> None:
    """Stopped at step 5, inside a log interval of 3 steps, then continued: the unbroken run's records."""
    run = [*COMMON, *WSD, "train.log_every=3", "run.name=run"]
    (tmp_path / "unbroken").mkdir()
    ok(run_ramp(run, cwd=tmp_path / "unbroken", cache_dir=cache_dir))
    result = ok(run_ramp([*run, "train.stop_at=5"], cwd=tmp_path, cache_dir=cache_dir))
    assert "stopped at train.stop_at=5: step 5 of the schedule's 12" in result.stdout + result.stderr
    run_dir = tmp_path / "outputs" / "run"
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_5"
    assert [r["step"] for r in read_metrics(run_dir)[0]] == [1, 3]
    again = ok(run_ramp([*run, "train.stop_at=5"], cwd=tmp_path, cache_dir=cache_dir))
    assert "already at or past train.stop_at" in again.stdout + again.stderr
    ok(run_ramp(run, cwd=tmp_path, cache_dir=cache_dir))
    assert series(run_dir) == series(tmp_path / "unbroken" / "outputs" / "run")


def test_a_branch_off_another_curve_or_into_its_parent_is_refused_and_writes_nothing(
    parent: tuple[Path, int], cache_dir: Path
) -> None:
    cwd, nproc = parent
    if nproc:
        pytest.skip("the refusals come before any process group: one rank shows them")
    parent_dir = cwd / "outputs" / "parent"
    before = snapshot(parent_dir)
    branch = [f"branch.checkpoint={parent_dir / 'checkpoints' / 'step_8'}", "branch.decay_steps=4"]
    cases = [
        (["schedule=cosine", "train.max_steps=8", "run.name=other"], "branch.checkpoint: schedule.name is "
         "constant_with_warmup in"),
        ([*PARENT[:2], "optim.lr=1e-3", "run.name=other"], "optim.lr is 0.0006 in"),
        ([*PARENT], "is the folder of branch.checkpoint="),
    ]  # fmt: skip
    for overrides, message in cases:
        result = run_ramp([*COMMON, *branch, *overrides], cwd=cwd, cache_dir=cache_dir, nproc=0)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("ramp: error:")]
        assert len(errors) == 1, result.stderr[-2000:]
        assert message in errors[0]
        assert not (cwd / "outputs" / "other").exists()
    assert snapshot(parent_dir) == before


def test_a_run_from_weights_alone_has_the_parents_weights_and_its_own_optimizer_and_schedule(
    parent: tuple[Path, int], cache_dir: Path
) -> None:
    """From the parent's step 8: the data continued, the next step's loss and gradient norm are the ones the
    parent computes there (same weights, same batch); the step after differs (a fresh optimizer)."""
    cwd, nproc = parent
    if not nproc:
        pytest.skip("one rank count is enough here: 2 ranks, whose data position is per rank")
    checkpoint = cwd / "outputs" / "parent" / "checkpoints" / "step_8"
    resumed = [*COMMON, *PARENT[:1], "train.max_steps=10", f"run.resume={checkpoint}", "run.name=resumed"]
    ok(run_ramp(resumed, cwd=cwd, cache_dir=cache_dir, nproc=nproc))
    warm = [*COMMON, "schedule=cosine", "train.max_steps=10", f"init.weights={checkpoint}", "run.name=warm"]
    result = ok(
        run_ramp([*warm, "init.step=8", "init.data=continue"], cwd=cwd, cache_dir=cache_dir, nproc=nproc)
    )
    assert (
        f"weights from {checkpoint} (step 8): fresh optimizer, the schedule from step 9"
        in result.stdout + result.stderr
    )
    continued, started = (
        read_metrics(cwd / "outputs" / "resumed")[0],
        read_metrics(cwd / "outputs" / "warm")[0],
    )
    assert [r["step"] for r in started] == [9, 10]
    assert (started[0]["loss"], started[0]["grad_norm"]) == (continued[0]["loss"], continued[0]["grad_norm"])
    assert started[1]["loss"] != continued[1]["loss"]
    schedule = compose(["schedule=cosine", "train.max_steps=10", "schedule.warmup_steps=2"]).lr_schedule
    assert [r["lr"] for r in started] == [schedule.lr(9), schedule.lr(10)]
    history = json.loads((cwd / "outputs" / "warm" / "history.jsonl").read_text().splitlines()[0])
    assert history["start"] == "weights"
    assert history["weights"] == {"checkpoint": str(checkpoint.resolve()), "step": 8, "data": "continue"}
    # from step 1 on fresh data: the parent's weights, not new ones (a lower first loss than the parent's)
    fresh = ok(run_ramp([*warm, "run.name=fresh"], cwd=cwd, cache_dir=cache_dir, nproc=nproc))
    assert "the schedule from step 1, the data from its start" in fresh.stdout + fresh.stderr
    first = read_metrics(cwd / "outputs" / "fresh")[0][0]
    assert first["step"] == 1
    assert first["loss"] < read_metrics(cwd / "outputs" / "parent")[0][0]["loss"] - 1.0


def test_a_branch_is_grouped_with_its_parent_in_wandb(tmp_path: Path, cache_dir: Path) -> None:
    offline = [*(o for o in COMMON if not o.startswith("logger.wandb.mode")), "logger.wandb.mode=offline"]
    ok(
        run_ramp(
            [*offline, "schedule=constant_with_warmup", "train.max_steps=3", "run.name=stable"],
            cwd=tmp_path,
            cache_dir=cache_dir,
            nproc=0,
        )
    )
    checkpoint = tmp_path / "outputs" / "stable" / "checkpoints" / "step_3"
    branch = [f"branch.checkpoint={checkpoint}", "branch.decay_steps=2", "run.name=cool"]
    ok(
        run_ramp(
            [*offline, "schedule=constant_with_warmup", "train.max_steps=3", *branch],
            cwd=tmp_path,
            cache_dir=cache_dir,
            nproc=0,
        )
    )
    (parent_run,), (branch_run,) = (
        wandb_runs(tmp_path / "outputs" / "stable"),
        wandb_runs(tmp_path / "outputs" / "cool"),
    )
    assert read_wandb_group(parent_run) == read_wandb_group(branch_run) == "stable"
