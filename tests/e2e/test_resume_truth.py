"""Resume tells the truth: the given configuration is the one that trains, what a checkpoint cannot honour
is refused before anything is written, a no-op start writes nothing, a kill before the first checkpoint
is recoverable, exit codes survive the launcher, each event is said once, and no rank outlives torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import (
    ddp_param_groups,
    deepspeed_param_groups,
    kill_job,
    launch_ramp,
    own_lines,
    ramp_env,
    read_metrics,
    run_ramp,
    snapshot,
    train_steps,
    workers,
)

pytestmark = pytest.mark.slow

SMALL = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.log_every=1",
    "logger.wandb.mode=disabled",
]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)[0]]


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    """What must be bit-identical between a recovered and an unbroken run."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"]) for r in read_metrics(run_dir)[0]]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_changed_optimizer_settings_train_and_are_saved(
    backend: str, tmp_path: Path, cache_dir: Path
) -> None:
    """Fault 1: weight decay and betas given on resume are the ones that train, and the ones saved."""
    common = [*SMALL, f"backend={backend}", "model=gpt2-tiny"]
    ok(run_ramp([*common, "train.max_steps=10", "run.name=a"], cwd=tmp_path, cache_dir=cache_dir, nproc=0))
    parent = tmp_path / "outputs" / "a" / "checkpoints" / "step_10"
    resumed = [*common, "train.max_steps=20", f"run.resume={parent}"]
    ok(run_ramp([*resumed, "run.name=same"], cwd=tmp_path, cache_dir=cache_dir, nproc=0))
    changed = [*resumed, "run.name=changed", "optim.weight_decay=0.01", "optim.betas=[0.8,0.9]"]
    result = ok(run_ramp(changed, cwd=tmp_path, cache_dir=cache_dir, nproc=0))
    assert "changed on resume, and it changes the math: optim.weight_decay: 0.1 -> 0.01" in result.stderr
    same, differs = losses(tmp_path / "outputs" / "same"), losses(tmp_path / "outputs" / "changed")
    assert [s for s, _ in same] == [s for s, _ in differs] == list(range(11, 21))
    assert same[0][1] == differs[0][1]  # step 11's loss is computed before its update
    assert all(a != b for (_, a), (_, b) in zip(same[1:], differs[1:], strict=True))
    saved = tmp_path / "outputs" / "changed" / "checkpoints" / "step_20"
    groups = {g["name"]: g for g in (ddp_param_groups if backend == "ddp" else deepspeed_param_groups)(saved)}
    assert groups["decay"]["weight_decay"] == 0.01
    assert groups["no_decay"]["weight_decay"] == 0.0
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups.values())


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A finished 6-step run (2 ranks) in ``<cwd>/outputs/done``; the tests copy nothing, they must not touch it."""
    cwd = tmp_path_factory.mktemp("finished")
    ok(run_ramp([*SMALL, "train.max_steps=6", "run.name=done"], cwd=cwd, cache_dir=cache_dir))
    return cwd


@pytest.mark.parametrize(
    ("change", "key", "ranks"),
    [
        ("model.hidden_size=256", "model.hidden_size", 1),
        ("optim.no_decay=[]", "optim.no_decay", 1),
        ("backend=deepspeed", "backend.name", 1),
        ("model.num_layers=2", "model.num_layers", 2),
    ],
)
def test_a_change_the_checkpoint_cannot_honour_is_refused_and_nothing_is_written(
    change: str, key: str, ranks: int, finished: Path, cache_dir: Path
) -> None:
    """Fault 2: refused with one line naming the key, in place and into a new folder; both untouched.
    One rank runs as ``python -m trainer.main``, two through ``launch.run`` (plain torchrun exits 1)."""
    before = snapshot(finished / "outputs")
    checkpoint = finished / "outputs" / "done" / "checkpoints" / "step_6"
    for target in (["run.name=done"], ["run.name=elsewhere", f"run.resume={checkpoint}"]):
        overrides = [*SMALL, "train.max_steps=8", change, *target]
        if ranks == 1:
            result = run_ramp(overrides, cwd=finished, cache_dir=cache_dir, nproc=0)
        else:
            result = launcher(overrides, finished, cache_dir)
        assert result.returncode == 2, result.stderr[-3000:]
        errors = [line for line in own_lines(result.stderr) if "ramp: error:" in line]
        assert len(errors) == 1, result.stderr[-3000:]
        assert errors[0].endswith(errors[0][errors[0].index("ramp: error:") :])
        assert f"ramp: error: run.resume: {key} is " in errors[0]
        assert f'File "{Path(__file__).parents[2] / "trainer"}' not in result.stderr  # no traceback of ramp's
        assert snapshot(finished / "outputs") == before


def test_a_start_with_nothing_to_train_writes_nothing(finished: Path, cache_dir: Path) -> None:
    """Fault 3: a finished run asked for fewer steps exits 0 and leaves its folder byte-identical."""
    before = snapshot(finished / "outputs")
    result = ok(run_ramp([*SMALL, "train.max_steps=3", "run.name=done"], cwd=finished, cache_dir=cache_dir))
    assert "already reached train.max_steps=3 (it is at step 6): nothing to train" in result.stdout
    assert snapshot(finished / "outputs") == before


def test_a_kill_during_the_first_save_is_started_over_by_the_same_command(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Fault 4: SIGKILL while the first checkpoint is being written; the same command then ends exactly as
    an unbroken run, and says it starts over."""
    overrides = [*SMALL, "train.max_steps=8", "train.ckpt_every=4", "run.name=run"]
    (tmp_path / "reference").mkdir()
    ok(run_ramp(overrides, cwd=tmp_path / "reference", cache_dir=cache_dir))
    checkpoints, log = tmp_path / "outputs" / "run" / "checkpoints", tmp_path / "job.log"
    proc = launch_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, log=log)
    try:
        deadline = time.monotonic() + 180
        while not (
            checkpoints.is_dir() and any(p.name.startswith(".tmp-step_") for p in checkpoints.iterdir())
        ):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        kill_job(proc)
    assert not [p for p in checkpoints.iterdir() if p.name.startswith("step_")], "killed too late"
    result = ok(run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir))
    assert "holds no complete checkpoint of this run: starting over" in result.stdout
    assert series(tmp_path / "outputs" / "run") == series(tmp_path / "reference" / "outputs" / "run")


def launcher(overrides: list[str], cwd: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m launch.run --nproc-per-node 2 -- overrides`` as a user runs it."""
    cmd = [sys.executable, "-m", "launch.run", "--nproc-per-node", "2", "--", *overrides]
    return subprocess.run(
        cmd, cwd=cwd, env=ramp_env(cache_dir), capture_output=True, text=True, timeout=300, check=False
    )


def test_the_launcher_exits_with_the_trainers_code_and_each_event_is_said_once(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Faults 5 and 6: launch.run returns 2 for a configuration error and 3 for a halted run; every skipped
    update is one warning line, not one per rank."""
    assert launcher(["optim.lr=0"], tmp_path, cache_dir).returncode == 2
    halting = [*SMALL, "optim.lr=1e30", "train.max_grad_norm=0", "schedule=constant", "train.on_nan=skip"]
    result = launcher([*halting, "train.max_steps=40", "run.name=halts"], tmp_path, cache_dir)
    assert result.returncode == 3, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    skipped = [line for line in output.splitlines() if "update skipped" in line]
    assert len(skipped) == 24, skipped  # each skipped step once; the 25th in a row halts the run
    assert not [line for line in skipped if "[rank" in line]


def trainer_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The ranks under a launched torchrun, once both have started."""
    deadline = time.monotonic() + 60
    while len(found := [p for p in workers(proc) if p.pid != proc.pid]) < 2:
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)
    return found


@pytest.mark.parametrize("moment", ["start-up", "training", "save"])
def test_no_rank_outlives_a_killed_torchrun(moment: str, tmp_path: Path, cache_dir: Path) -> None:
    """Fault 7: SIGKILL torchrun's process group (the ranks each run in a session of their own) during
    start-up, training or a save; within 15 s no rank is left."""
    overrides = [*SMALL, "train.max_steps=200", "train.ckpt_every=3", "run.name=run"]
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    proc = launch_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, log=log)
    try:
        ranks = trainer_processes(proc)
        deadline = time.monotonic() + 120
        while (moment == "training" and train_steps(run_dir) < 2) or (
            moment == "save" and not saving(run_dir)
        ):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(ranks, timeout=15)
        assert not alive, f"ranks left behind after {moment}: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            kill_job(proc)


def saving(run_dir: Path) -> bool:
    checkpoints = run_dir / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith(".tmp-step_") for p in checkpoints.iterdir())


def test_history_records_each_accepted_start(finished: Path) -> None:
    """The finished run's folder holds one history record, of its fresh start."""
    history = (finished / "outputs" / "done" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["start"] for line in history] == ["fresh"]
