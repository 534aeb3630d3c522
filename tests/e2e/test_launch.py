"""The launchers end to end, on real software: two launchers as two nodes meeting through c10d, the
container's entrypoint stopped as `docker stop` does, and real Slurm batch jobs on a one-node cluster
on localhost, one of them signalled before its time limit, checkpointed, requeued and resumed.

Every run trains the same configuration on 2 ranks, so each must log exactly the steps, losses and
learning rates of the two-node run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from launch.run import expand_nodelist
from launch.submit import job_id
from tests.helpers import REPO, free_port, kill_job, ramp_env, read_metrics, train_steps

pytestmark = pytest.mark.slow

MAX_STEPS = 24
BASE = [
    f"train.max_steps={MAX_STEPS}",
    "train.log_every=1",
    "train.ckpt_every=4",
    "train.eval_every=12",
    "train.eval_steps=2",
    "train.seq_len=128",
    "train.micro_batch_size=4",
    # One thread per rank everywhere: the thread count can change float rounding, and the series of
    # runs launched in different ways must be bit-identical.
    "train.threads=1",
    "logger.wandb.mode=disabled",
    "run.name=run",
]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def launch_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """ramp's test environment, without the variables of any Slurm job this test itself runs in."""
    env = {k: v for k, v in ramp_env(cache_dir).items() if not k.startswith("SLURM_")}
    return {**env, **extra}


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    train, evals = read_metrics(run_dir)
    rows = [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"]) for r in train]
    return rows + [(e["step"], e["val_loss"]) for e in evals]


def start(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as handle:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT
        )


def wait_for_step(run_dir: Path, step: int, alive: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while train_steps(run_dir) < step:
        assert alive(), "the run ended before the signal"
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.05)


# -- two launchers as two nodes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, list[str]]:
    """The reference run: two launchers on localhost, one process each, meeting through c10d."""
    cwd = tmp_path_factory.mktemp("two-nodes")
    port = free_port()
    env = launch_env(cache_dir)
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "launch.run", "--nnodes=2", "--nproc-per-node=1"]
            cmd += [f"--node-rank={node}", "--head=127.0.0.1", f"--port={port}", "--run-id=two-nodes"]
            nodes.append(start([*cmd, "--", *BASE], cwd=cwd, env=env, log=cwd / f"node{node}.log"))
        # Until both end, or one fails (the other would wait for it at the rendezvous).
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and any(node.poll() is None for node in nodes):
            if any(node.poll() not in (None, 0) for node in nodes):
                break
            time.sleep(0.2)
        codes = [node.poll() for node in nodes]
    finally:
        for proc in nodes:
            if proc.poll() is None:
                kill_job(proc)
    logs = [(cwd / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return cwd, logs


def test_two_launchers_meet_as_two_nodes_and_train_with_world_size_2(
    two_nodes: tuple[Path, list[str]],
) -> None:
    cwd, logs = two_nodes
    for node, log in enumerate(logs):
        assert f"launch | node {node} of 2 on " in log
        assert "c10d rendezvous at 127.0.0.1:" in log
        assert "(id two-nodes)" in log
        assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in log
    # Rank 0 (on whichever node joined first) speaks for the world of 2.
    spoken = [log for log in logs if "world 2 |" in log]
    assert len(spoken) == 1
    done = re.search(
        rf"ramp \| done: {MAX_STEPS} steps, ([\d,]+) tokens in \d+:\d\d:\d\d \| val_loss (\S+) \|", spoken[0]
    )
    assert done is not None, spoken[0][-2000:]
    train, evals = read_metrics(cwd / "outputs" / "run")
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert [e["step"] for e in evals] == [12, 24]
    assert done.groups() == (
        f"{MAX_STEPS * 4 * 128 * 2:,}",
        f"{evals[-1]['val_loss']:.4f}",
    )  # the final val_loss
    # Per-rank log files, one local rank on each node.
    for node in (0, 1):
        files = list((cwd / "logs" / "two-nodes" / f"node{node}").glob("*/attempt_0/0/stdout.log"))
        assert len(files) == 1
    rank0 = [
        f for f in (cwd / "logs").glob("two-nodes/node*/*/attempt_0/0/stdout.log") if "done:" in f.read_text()
    ]
    assert len(rank0) == 1


# -- the container's entrypoint, on this machine -----------------------------------------------------


def test_entrypoint_trains_and_docker_stop_checkpoints_then_resumes(
    tmp_path: Path, cache_dir: Path, two_nodes: tuple[Path, list[str]]
) -> None:
    """docker/entrypoint.sh as the image runs it (one node, CPU here): `docker stop` sends SIGTERM to
    the container's main process; the trainers checkpoint, and the same command again resumes."""
    env = launch_env(cache_dir, RAMP_WORKDIR=str(tmp_path), RAMP_PYTHON=sys.executable)
    cmd = ["bash", str(REPO / "docker" / "entrypoint.sh"), "--nproc-per-node=2", "--", *BASE]
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "container.log"
    proc = start(cmd, cwd=REPO, env=env, log=log)
    try:
        wait_for_step(run_dir, 4, lambda: proc.poll() is None)
        assert "launch.run" in psutil.Process(proc.pid).cmdline(), "the entrypoint must exec the launcher"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    first = log.read_text()
    assert "launch | SIGTERM: asking the trainers to save a checkpoint and stop" in first
    stopped = re.search(r"ramp \| preempted by SIGTERM \(to the launcher\): saved \S+ at step (\d+)", first)
    assert stopped is not None, first[-3000:]
    assert int(stopped.group(1)) < MAX_STEPS
    again = start(cmd, cwd=REPO, env=env, log=log)
    try:
        assert again.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if again.poll() is None:
            kill_job(again)
    assert f"resuming from outputs/run/checkpoints/step_{stopped.group(1)}" in log.read_text()
    assert series(run_dir) == series(two_nodes[0] / "outputs" / "run")


# -- Slurm -------------------------------------------------------------------------------------------


def scontrol_job(job: str, env: dict[str, str]) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def wait_for_job(job: str, env: dict[str, str], timeout: float) -> dict[str, str]:
    """Poll until the job has ended (`sbatch --wait` polls far more slowly)."""
    deadline = time.monotonic() + timeout
    while (info := scontrol_job(job, env))["JobState"] not in ENDED:
        assert time.monotonic() < deadline, f"job {job} still {info['JobState']} after {timeout}s"
        time.sleep(0.25)
    return info


@contextlib.contextmanager
def submitted(cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """`python -m launch.submit` for one node with 2 CPU processes; the job is cancelled on the way out."""
    cpus = min(2, len(os.sched_getaffinity(0)))  # a job asking for more CPUs than the node has never starts
    cmd = [
        sys.executable,
        "-m",
        "launch.submit",
        "--nodes=1",
        "--nproc-per-node=2",
        f"--cpus-per-node={cpus}",
    ]
    cmd += ["--time=10:00", "--job-name=ramp-test", f"--chdir={cwd}", "--", *BASE]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    job = job_id(result.stdout)
    assert f"job log:       {cwd}/logs/ramp-test-{job}.out" in result.stdout
    try:
        yield job
    finally:
        if scontrol_job(job, env)["JobState"] not in ENDED:
            subprocess.run(["scancel", job], env=env, timeout=30, check=False)


def test_ctrl_c_to_the_launcher_checkpoints_and_the_same_command_resumes(
    tmp_path: Path, cache_dir: Path, two_nodes: tuple[Path, list[str]]
) -> None:
    """SIGINT (Ctrl-C in the launcher's terminal) to launch.run: the trainers save at one step, exit 0;
    the same command continues, and the run ends as an unbroken one."""
    env = launch_env(cache_dir)
    cmd = [sys.executable, "-m", "launch.run", "--nproc-per-node", "2", "--", *BASE]
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "launch.log"
    proc = start(cmd, cwd=tmp_path, env=env, log=log)
    try:
        wait_for_step(run_dir, 4, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    first = log.read_text()
    assert "launch | SIGINT: asking the trainers to save a checkpoint and stop" in first
    stopped = re.search(r"ramp \| preempted by SIGINT \(to the launcher\): saved \S+ at step (\d+)", first)
    assert stopped is not None, first[-3000:]
    again = start(cmd, cwd=tmp_path, env=env, log=log)
    try:
        assert again.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if again.poll() is None:
            kill_job(again)
    assert f"resuming from outputs/run/checkpoints/step_{stopped.group(1)}" in log.read_text()
    assert series(run_dir) == series(two_nodes[0] / "outputs" / "run")


# -- Ctrl-C and SIGTERM without ramp's launcher ---------------------------------------------------------


def signal_at_step(
    cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, step: int, send: Any
) -> tuple[int, str]:
    """Run ``cmd`` in a session of its own (a terminal's job); at ``step``, ``send(proc)`` the signal.
    Returns the exit status and what this run printed."""
    before = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as handle:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_step(cwd / "outputs" / "run", step, lambda: proc.poll() is None)
        send(proc)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    return code, log.read_bytes()[before:].decode()


def stopped_at(printed: str, reason: str) -> int:
    """The step ramp's stop line names; the line must say the same command resumes."""
    stopped = re.search(
        rf"ramp \| preempted by {re.escape(reason)}: saved \S+ at step (\d+); exiting \(the same command resumes from it\)",
        printed,
    )
    assert stopped is not None, printed[-3000:]
    return int(stopped.group(1))


def test_ctrl_c_to_one_process_saves_and_the_same_command_resumes_bit_identically(
    tmp_path: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``python -m trainer.main`` and Ctrl-C (SIGINT to the terminal's process group), once while it
    trains and once during an evaluation (which it does not wait for): a checkpoint at the step reached,
    exit 0, one line and no traceback; the same command evaluates what was cut short, and the run ends
    as an unbroken one, every loss, LR and validation loss equal."""
    env = launch_env(cache_dir)
    cmd = [sys.executable, "-m", "trainer.main", *BASE, "train.eval_steps=300"]  # an evaluation of seconds
    unbroken = tmp_path_factory.mktemp("unbroken")
    done = subprocess.run(cmd, cwd=unbroken, env=env, capture_output=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    log = tmp_path / "run.log"
    code, printed = signal_at_step(
        cmd, cwd=tmp_path, env=env, log=log, step=3, send=lambda proc: os.killpg(proc.pid, signal.SIGINT)
    )
    assert code == 0, printed[-3000:]
    step = stopped_at(printed, "SIGINT (Ctrl-C)")
    lines = printed.split("\n")
    after = lines[[i for i, line in enumerate(lines) if line.startswith("step ")][-1] + 1 :]
    assert [line for line in after if line.strip()] == [
        next(line for line in after if "preempted by" in line)
    ]
    assert "Traceback" not in printed
    assert "KeyboardInterrupt" not in printed
    # Step 12 evaluates; its record is written before the evaluation starts.
    code, printed = signal_at_step(
        cmd, cwd=tmp_path, env=env, log=log, step=12, send=lambda proc: os.killpg(proc.pid, signal.SIGINT)
    )
    assert code == 0, printed[-3000:]
    assert f"resuming from outputs/run/checkpoints/step_{step}" in printed
    assert stopped_at(printed, "SIGINT (Ctrl-C)") == 12, "the evaluation was waited for"
    assert "val_loss" not in printed.split("step 12/")[1]
    again = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from outputs/run/checkpoints/step_12" in again.stdout + again.stderr
    assert series(tmp_path / "outputs" / "run") == series(unbroken / "outputs" / "run")


def test_ctrl_c_and_sigterm_to_plain_torchrun_save_on_every_rank_and_resume_bit_identically(
    tmp_path: Path, cache_dir: Path, two_nodes: tuple[Path, list[str]]
) -> None:
    """``torchrun -m trainer.main`` (no launcher of ramp's): Ctrl-C reaches torchrun and both ranks, and
    later SIGTERM reaches torchrun alone (``docker stop``, Kubernetes), which passes it on. Each time the
    ranks agree on a step, save it and exit 0; the same command resumes, and the run ends as an unbroken
    one. torchrun itself then reports the signal it received (its exit status 1 and traceback: torch's)."""
    env = launch_env(cache_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "trainer.main", *BASE]
    log = tmp_path / "run.log"
    _, printed = signal_at_step(
        cmd, cwd=tmp_path, env=env, log=log, step=3, send=lambda proc: os.killpg(proc.pid, signal.SIGINT)
    )
    first = stopped_at(printed, "SIGINT (Ctrl-C)")
    assert "failed" not in printed.lower(), printed[
        -3000:
    ]  # torchrun reports no rank as failed: all exited 0
    assert "KeyboardInterrupt" not in printed
    _, printed = signal_at_step(
        cmd,
        cwd=tmp_path,
        env=env,
        log=log,
        step=first + 4,
        send=lambda proc: proc.send_signal(signal.SIGTERM),
    )
    assert f"resuming from outputs/run/checkpoints/step_{first}" in printed
    second = stopped_at(printed, "SIGTERM")
    assert second > first
    assert "failed" not in printed.lower(), printed[
        -3000:
    ]  # torchrun reports no rank as failed: all exited 0
    meta = json.loads(
        (tmp_path / "outputs" / "run" / "checkpoints" / f"step_{second}" / "meta.json").read_text()
    )
    assert (meta["step"], meta["world_size"]) == (second, 2)
    done = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert series(tmp_path / "outputs" / "run") == series(two_nodes[0] / "outputs" / "run")


def test_slurm_expands_node_lists_as_the_launcher_does(slurm: dict[str, str]) -> None:
    nodelist = "gpu[007-010],login1,rack[1-2]-n[01,03]"
    shown = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist],
        env={**os.environ, **slurm},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert expand_nodelist(nodelist) == shown.stdout.split()


@pytest.mark.timeout(420)
def test_an_sbatch_job_trains_2_ranks_to_completion_and_a_requeue_after_that_just_exits(
    tmp_path: Path, cache_dir: Path, slurm: dict[str, str], two_nodes: tuple[Path, list[str]]
) -> None:
    env = launch_env(cache_dir, **slurm)
    with submitted(tmp_path, env) as job:
        info = wait_for_job(job, env, timeout=240)
    log = (tmp_path / "logs" / f"ramp-test-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "0", "a run that was not signalled must not be requeued"
    assert f"launch | node 0 of 1 on {expand_nodelist(info['NodeList'])[0]} | Slurm job {job} |" in log
    assert "world 2 |" in log
    assert f"ramp | done: {MAX_STEPS} steps" in log
    assert "SIGUSR1" not in log
    assert "requeue" not in log
    assert series(tmp_path / "outputs" / "run") == series(two_nodes[0] / "outputs" / "run")
    assert list((tmp_path / "logs" / job / "node0").glob("*/attempt_0/1/stdout.log"))
    # Requeued by accident after it finished, the run finds its last checkpoint and just exits.
    subprocess.run(["scontrol", "requeue", job], env=env, timeout=60, check=True)
    info = wait_for_job(job, env, timeout=240)
    again = (tmp_path / "logs" / f"ramp-test-{job}.out").read_text()[len(log) :]
    assert info["JobState"] == "COMPLETED", again
    assert info["Restarts"] == "1", again
    assert f"job {job}, restart 1:" in again
    assert f"outputs/run/checkpoints/step_{MAX_STEPS} already reached train.max_steps={MAX_STEPS}" in again
    assert "step 1/" not in again
    assert "requeueing" not in again
    assert series(tmp_path / "outputs" / "run") == series(two_nodes[0] / "outputs" / "run")


@pytest.mark.timeout(420)
def test_a_signalled_slurm_job_checkpoints_requeues_and_resumes_exactly(
    tmp_path: Path, cache_dir: Path, slurm: dict[str, str], two_nodes: tuple[Path, list[str]]
) -> None:
    env = launch_env(cache_dir, **slurm)
    run_dir = tmp_path / "outputs" / "run"
    with submitted(tmp_path, env) as job:
        wait_for_step(run_dir, 3, lambda: scontrol_job(job, env)["JobState"] not in ENDED)
        # What --signal=B:USR1@<grace> does before the time limit: SIGUSR1 to the batch script only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, timeout=60, check=True)
        info = wait_for_job(job, env, timeout=300)
    log = (tmp_path / "logs" / f"ramp-test-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["Restarts"] == "1", log[-3000:]
    assert "SIGUSR1: asking the trainers to save a checkpoint and stop" in log
    stopped = re.findall(r"ramp \| preempted by SIGUSR1 \(to the launcher\): saved \S+ at step (\d+)", log)
    assert len(stopped) == 1, log[-3000:]
    step = stopped[0]
    assert 3 <= int(step) < MAX_STEPS
    assert f"requeueing job {job}" in log
    assert f"job {job}, restart 1:" in log
    assert f"resuming from outputs/run/checkpoints/step_{step} at step {step}" in log
    train, _ = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))  # each step exactly once
    assert series(run_dir) == series(two_nodes[0] / "outputs" / "run")
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{MAX_STEPS}"
