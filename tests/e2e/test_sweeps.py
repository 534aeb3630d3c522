"""Hydra multirun sweeps end to end: every job in its own folder, equal to the same run started alone, in
one process and under torchrun; a failing job named; an interrupted sweep resumed; the sweep report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.helpers import kill_when, launch_ramp, read_metrics, run_ramp, train_steps

pytestmark = pytest.mark.slow

RUN = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.max_steps=4",
    "train.log_every=1",
    "train.eval_every=2",
    "train.eval_steps=1",
    "train.ckpt_every=1",
    "logger.wandb.mode=disabled",
]
LRS = ["0.0003", "0.001", "0.003"]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    train, evals = read_metrics(run_dir)
    return [(r["step"], r["lr"], r["loss"], r["grad_norm"]) for r in train] + [
        (e["step"], e["val_loss"]) for e in evals
    ]


@pytest.fixture(scope="module")
def one_by_one(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The sweep's three points, each started alone (one process)."""
    cwd = tmp_path_factory.mktemp("one-by-one")
    for lr in LRS:
        ok(run_ramp([*RUN, f"optim.lr={lr}", f"run.name=lr{lr}"], cwd=cwd, cache_dir=cache_dir, nproc=0))
    return {lr: series(cwd / "outputs" / f"lr{lr}") for lr in LRS}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The same three points as one sweep in one process: its folder."""
    cwd = tmp_path_factory.mktemp("sweep")
    ok(
        run_ramp(
            ["-m", *RUN, f"optim.lr={','.join(LRS)}", "run.name=lrs"], cwd=cwd, cache_dir=cache_dir, nproc=0
        )
    )
    assert sorted(p.name for p in cwd.iterdir()) == ["outputs"]  # no multirun/ folder
    return cwd / "outputs" / "lrs"


def test_a_sweep_in_one_process_gives_each_job_its_folder_and_the_run_started_alone(
    swept: Path, one_by_one: dict[str, list[tuple[Any, ...]]]
) -> None:
    assert sorted(p.name for p in swept.iterdir()) == [".hydra", *(f"optim.lr={lr}" for lr in LRS)]
    for lr in LRS:
        assert series(swept / f"optim.lr={lr}") == one_by_one[lr]
        config = yaml.safe_load((swept / f"optim.lr={lr}" / "config.yaml").read_text())
        assert config["logger"]["wandb"]["group"] == "lrs"  # the wandb dashboard groups the sweep
        assert config["run"]["dir"] == f"outputs/lrs/optim.lr={lr}"


def test_the_sweep_report_plots_every_job_and_ranks_them(swept: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    from trainer.plot import main as plot_main

    out = tmp_path / "sweep.png"
    figure = plot_main(["--sweep", str(swept), "--out", str(out)])
    losses, finals, lrs = figure.axes
    assert sorted(str(line.get_label()) for line in losses.lines) == [f"optim.lr={lr}" for lr in LRS]
    assert len(lrs.lines) == 3
    (points,) = finals.collections
    offsets = np.asarray(points.get_offsets())
    assert offsets.shape == (3, 2)
    finals_by_lr = {float(x): float(y) for x, y in offsets}
    for lr in LRS:
        assert finals_by_lr[float(lr)] == read_metrics(swept / f"optim.lr={lr}")[1][-1]["val_loss"]
    assert imread(str(out)).shape[2] in (3, 4)  # a readable PNG


def test_the_sweep_report_table_is_sorted_by_final_validation_loss(swept: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer.plot", "--sweep", str(swept), "--out", str(swept.parent / "s.png")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:4]]
    finals = [float(row[2]) for row in rows]
    assert finals == sorted(finals)
    assert {row[0] for row in rows} == {f"optim.lr={lr}" for lr in LRS}
    assert all(row[-1] == "finished" and row[1] == "4" for row in rows)


def test_a_sweep_under_torchrun_runs_every_job_on_both_ranks(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "alone").mkdir()
    for steps in (2, 3):
        ok(
            run_ramp(
                [*RUN, f"train.max_steps={steps}", f"run.name=s{steps}"],
                cwd=tmp_path / "alone",
                cache_dir=cache_dir,
            )
        )
    ok(
        run_ramp(
            ["--multirun", *RUN, "train.max_steps=2,3", "run.name=steps"], cwd=tmp_path, cache_dir=cache_dir
        )
    )
    sweep = tmp_path / "outputs" / "steps"
    assert sorted(p.name for p in sweep.iterdir()) == [".hydra", "train.max_steps=2", "train.max_steps=3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone", "outputs"]  # no multirun/ per rank
    for steps in (2, 3):
        assert series(sweep / f"train.max_steps={steps}") == series(
            tmp_path / "alone" / "outputs" / f"s{steps}"
        )


def test_a_failing_job_stops_the_sweep_naming_it(tmp_path: Path, cache_dir: Path) -> None:
    result = run_ramp(
        ["-m", *RUN, "optim.lr=0.001,-1", "run.name=bad"], cwd=tmp_path, cache_dir=cache_dir, nproc=0
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ramp: error:")]
    assert errors == [
        "ramp: error: sweep job 2 of 2 (optim.lr=-1): optim.lr=-1.0 must be > 0 (it is the peak learning rate)"
    ]
    first = tmp_path / "outputs" / "bad" / "optim.lr=0.001"
    assert (first / "checkpoints" / "latest").read_text() == "step_4"
    assert not (tmp_path / "outputs" / "bad" / "optim.lr=-1").exists()


def test_a_shared_run_dir_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    result = run_ramp(
        ["-m", *RUN, "optim.lr=0.001,0.002", "run.dir=outputs/one"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("ramp: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith("ramp: error: run.dir=outputs/one is the same for all 2 jobs of this sweep")
    assert not (tmp_path / "outputs").exists()  # Hydra's multirun.yaml included


def test_an_interrupted_sweep_rerun_ends_equal_to_an_unbroken_one(
    tmp_path: Path, cache_dir: Path, swept: Path
) -> None:
    command = ["-m", *RUN, f"optim.lr={','.join(LRS)}", "run.name=lrs"]
    second, log = tmp_path / "outputs" / "lrs" / f"optim.lr={LRS[1]}", tmp_path / "job.log"
    proc = launch_ramp(command, cwd=tmp_path, cache_dir=cache_dir, log=log, nproc=0)
    kill_when(lambda: train_steps(second) >= 2, proc, log)  # inside the second job
    assert not (tmp_path / "outputs" / "lrs" / f"optim.lr={LRS[2]}").exists()
    result = ok(run_ramp(command, cwd=tmp_path, cache_dir=cache_dir, nproc=0))
    assert "already reached train.max_steps=4" in result.stdout + result.stderr  # the first job is skipped
    for lr in LRS:
        assert series(tmp_path / "outputs" / "lrs" / f"optim.lr={lr}") == series(swept / f"optim.lr={lr}")
