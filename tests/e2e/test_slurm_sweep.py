"""A Hydra sweep on the real one-node Slurm cluster on localhost, one Slurm job per point through Hydra's
submitit launcher (hydra/launcher=ramp_slurm), each point trained by ramp's launcher on 2 ranks.

Each point must log exactly the steps, losses and learning rates of the same run started directly with
torchrun; a point signalled as before its time limit saves, requeues itself and resumes, and still does."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import kill_job, ramp_env, read_metrics, run_ramp, train_steps
from trainer.plot import sweep_jobs

pytestmark = pytest.mark.slow

TINY = [
    "train.max_steps=6",
    "train.log_every=1",
    "train.seq_len=32",
    "train.micro_batch_size=2",
    # One thread per rank: the direct runs and the Slurm jobs must round alike.
    "train.threads=1",
    "logger.wandb.mode=disabled",
]
LONGER = [  # long enough to be signalled mid-run
    "train.max_steps=24",
    "train.log_every=1",
    "train.ckpt_every=4",
    "train.seq_len=128",
    "train.micro_batch_size=4",
    "train.threads=1",
    "logger.wandb.mode=disabled",
]


SWEEP = (sys.executable, "-m", "trainer.main", "-m", "hydra/launcher=ramp_slurm")


def records(run_dir: Path) -> list[tuple[Any, ...]]:
    train, evals = read_metrics(run_dir)
    return [(r["step"], r["lr"], r["loss"]) for r in train] + [(e["step"], e["val_loss"]) for e in evals]


def direct(overrides: list[str], run_dir: Path, cache_dir: Path) -> Path:
    """The same run started directly into ``run_dir``: torchrun, 2 ranks."""
    result = run_ramp([*overrides, f"run.dir={run_dir}"], cwd=run_dir.parent, cache_dir=cache_dir, nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


@contextmanager
def sweep(
    cwd: Path, env: dict[str, str], name: str, overrides: list[str]
) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m trainer.main -m hydra/launcher=ramp_slurm ...`` running (it waits for every job); on the
    way out it is stopped and the sweep's jobs cancelled."""
    cpus = min(2, len(os.sched_getaffinity(0)))  # a whole node per job: the points run one after another
    cmd = list(SWEEP)
    cmd += [f"hydra.launcher.cpus_per_task={cpus}", "hydra.launcher.timeout_min=10", f"run.name={name}"]
    with open(cwd / "sweep.log", "ab") as log:
        proc = subprocess.Popen(
            [*cmd, *overrides],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_job(proc)
        subprocess.run(["scancel", f"--name={name}"], env=env, timeout=30, check=False)


def sweep_env(cache_dir: Path, slurm: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in ramp_env(cache_dir).items() if not k.startswith("SLURM_")}
    return {**env, **slurm, "RAMP_NPROC_PER_NODE": "2"}


def job_logs(cwd: Path, name: str) -> str:
    """Every job's stdout and stderr (submitit's log of it), in job order."""
    logs = sorted((cwd / "outputs" / name / ".hydra" / ".submitit").glob("*/*_log.out"))
    return "\n".join(path.read_text() for path in logs)


@pytest.mark.timeout(420)
def test_a_slurm_sweep_runs_each_point_as_a_job_on_2_ranks_like_a_direct_run(
    tmp_path: Path, cache_dir: Path, slurm: dict[str, str]
) -> None:
    env = sweep_env(cache_dir, slurm)
    with sweep(tmp_path, env, "sw", [*TINY, "optim.lr=1e-3,2e-3"]) as proc:
        code = proc.wait(timeout=300)
    logs, submitted = job_logs(tmp_path, "sw"), (tmp_path / "sweep.log").read_text()
    assert code == 0, submitted[-3000:] + logs[-3000:]
    # Every point in one line once all have ended, then the sweep: no traceback, no sacct warning per poll.
    assert "ramp | sweep job 1 of 2 (optim.lr=0.001): finished (Slurm job " in submitted
    assert "ramp | sweep job 2 of 2 (optim.lr=0.002): finished (Slurm job " in submitted
    assert "ramp | sweep sw: 2 of 2 point(s) finished" in submitted
    assert "Traceback" not in submitted
    assert submitted.count("sacct") <= 1
    assert logs.count("launch | node 0 of 1 on ") == 2
    assert logs.count("2 processes per node") == 2
    assert logs.count("world 2 |") == 2
    sweep_dir = tmp_path / "outputs" / "sw"
    for lr, folder in (("1e-3", "optim.lr=0.001"), ("2e-3", "optim.lr=0.002")):
        run_dir = sweep_dir / folder
        done = rf"ramp \| done: 6 steps, 768 tokens in \d+:\d\d:\d\d( \| val_loss \S+)? \| outputs/sw/{re.escape(folder)}\n"
        assert re.search(done, logs), logs[-3000:]
        assert records(run_dir) == records(direct([*TINY, f"optim.lr={lr}"], tmp_path / f"lr{lr}", cache_dir))
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (saved["run"]["name"], saved["logger"]["wandb"]["group"]) == (f"sw/{folder}", "sw")
        # Per-rank logs, one folder per point: logs/<run.name>/<job id>/node0/<torchrun id>/attempt_0/<rank>.
        ranks = [
            list((tmp_path / "logs" / "sw" / folder).glob(f"*/node0/*/attempt_0/{r}/stdout.log"))
            for r in (0, 1)
        ]
        assert [len(files) for files in ranks] == [1, 1], folder
        assert "ramp | done: 6 steps" in ranks[0][0].read_text()
    # The sweep report reads a Slurm sweep as it reads a local one.
    assert [(job.folder, job.status) for job in sweep_jobs(sweep_dir)] == [
        ("optim.lr=0.001", "finished"),
        ("optim.lr=0.002", "finished"),
    ]


@pytest.mark.timeout(300)
def test_a_point_that_fails_in_its_job_is_reported_in_one_line_and_a_bad_point_submits_nothing(
    tmp_path: Path, cache_dir: Path, slurm: dict[str, str]
) -> None:
    env = sweep_env(cache_dir, slurm)
    # A value no check can refuse before the job reads the data: the point fails there.
    with sweep(tmp_path, env, "gone", [*TINY, "data=text", "data.files=nope.txt"]) as proc:
        code = proc.wait(timeout=200)
    logs, submitted = job_logs(tmp_path, "gone"), (tmp_path / "sweep.log").read_text()
    assert code == 1, submitted[-3000:] + logs[-3000:]
    assert (
        "ramp: error: sweep job 1 of 1 (no swept key): ramp's launcher exited with status 2; its output is in "
        in submitted
    ), submitted[-3000:]
    assert "ramp | sweep gone: 0 of 1 point(s) finished" in submitted
    assert "Traceback" not in submitted
    assert logs.count("ramp: error: data.files=nope.txt") == 1
    # A value a check refuses: one line, exit 2, before anything is written or submitted.
    refused = subprocess.run(
        [*SWEEP, "run.name=bad", *TINY, "optim.lr=1e-3,-1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        "ramp: error: sweep job 2 of 2 (optim.lr=-1): optim.lr=-1.0 must be > 0 (it is the peak learning rate)"
    ]
    assert not (tmp_path / "outputs" / "bad").exists()


@pytest.mark.timeout(420)
def test_a_point_signalled_before_its_time_limit_saves_requeues_and_resumes_exactly(
    tmp_path: Path, cache_dir: Path, slurm: dict[str, str]
) -> None:
    env = sweep_env(cache_dir, slurm)
    run_dir = tmp_path / "outputs" / "pre"  # a sweep of one point: its run folder is the sweep's folder
    with sweep(tmp_path, env, "pre", [*LONGER, "optim.lr=1e-3"]) as proc:
        deadline = time.monotonic() + 180
        while train_steps(run_dir) < 3:
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.monotonic() < deadline, job_logs(tmp_path, "pre")[-3000:]
            time.sleep(0.05)
        running = subprocess.run(
            ["squeue", "-h", "-t", "R", "-n", "pre", "-o", "%i"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        assert len(running) == 1, running
        # The same sweep again while its job runs would train the same folder twice: refused, nothing submitted.
        again = subprocess.run(
            [*SWEEP, "hydra.launcher.timeout_min=10", "run.name=pre", *LONGER, "optim.lr=1e-3"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert again.returncode == 2, again.stderr[-3000:]
        assert again.stderr.strip().splitlines()[-1] == (
            f"ramp: error: 1 Slurm job(s) of sweep pre are still queued or running ({running[0]}), and would "
            "train the same run folders; wait for them to end or cancel them (scancel --name=pre), then run "
            "this command again: it resumes the sweep"
        )
        # What --signal=USR1@<signal_delay_s> does before the time limit: SIGUSR1 to every process of the job.
        subprocess.run(["scancel", "--signal=USR1", running[0]], env=env, timeout=60, check=True)
        code = proc.wait(timeout=240)
    logs = job_logs(tmp_path, "pre")
    assert code == 0, (tmp_path / "sweep.log").read_text()[-3000:] + logs[-3000:]
    stopped = re.findall(r"ramp \| preempted by SIGUSR1 \(to the launcher\): saved \S+ at step (\d+)", logs)
    assert len(stopped) == 1, logs[-3000:]
    step = stopped[0]
    assert 3 <= int(step) < 24
    assert logs.index(f"at step {step}; exiting") < logs.index("Calling checkpoint method.")  # saved first
    assert f"Requeued job {running[0]}" in logs
    assert f"resuming from outputs/pre/checkpoints/step_{step} at step {step}" in logs
    assert "ramp | done: 24 steps" in logs
    train, _ = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, 25))  # each step exactly once
    assert records(run_dir) == records(direct([*LONGER, "optim.lr=1e-3"], tmp_path / "direct", cache_dir))
