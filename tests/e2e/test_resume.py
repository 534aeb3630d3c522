"""Exact resume, preemption and surviving faults, with real processes and real signals."""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import (
    checkpoint_weights,
    kill_job,
    launch_ramp,
    own_lines,
    read_metrics,
    read_wandb_history,
    run_export,
    run_ramp,
    train_steps,
    wandb_runs,
    workers,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 24
BASE = [
    f"train.max_steps={MAX_STEPS}",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.grad_accum_steps=2",
    "train.eval_every=8",
    "train.eval_steps=2",
    "train.seq_len=128",
    "train.micro_batch_size=4",
    "logger.wandb.mode=disabled",
    "run.name=run",
]


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    """Everything that must be bit-identical between an interrupted and an uninterrupted run."""
    train, evals = read_metrics(run_dir)
    rows = [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens"], r["epoch"]) for r in train]
    return rows + [(e["step"], e["val_loss"]) for e in evals]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> list[tuple[Any, ...]]:
    cwd = tmp_path_factory.mktemp("reference")
    result = run_ramp(BASE, cwd=cwd, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = series(cwd / "outputs" / "run")
    assert [r[0] for r in rows[:MAX_STEPS]] == list(range(1, MAX_STEPS + 1))
    return rows


def wait_for_step(run_dir: Path, step: int, proc: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while train_steps(run_dir) < step:
        assert proc.poll() is None, "the job ended early"
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_to_one_rank_checkpoints_all_and_resumes_exactly(
    sig: signal.Signals, tmp_path: Path, cache_dir: Path, reference: list[tuple[Any, ...]]
) -> None:
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    proc = launch_ramp(BASE, cwd=tmp_path, cache_dir=cache_dir, log=log)
    try:
        wait_for_step(run_dir, 5, proc)
        workers(proc)[-1].send_signal(sig)  # one rank only
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            kill_job(proc)
    output = own_lines(log.read_text())
    preempted = [line for line in output if "preempted" in line]
    assert len(preempted) == 1, output
    stopped_at = train_steps(run_dir)
    assert f"checkpoints/step_{stopped_at} at step {stopped_at}" in preempted[0]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"
    assert stopped_at < MAX_STEPS
    result = run_ramp(BASE, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from outputs/run/checkpoints/step_{stopped_at}" in result.stdout
    assert series(run_dir) == reference


def newest_checkpoint(checkpoints: Path) -> int:
    steps = [int(p.name[5:]) for p in checkpoints.glob("step_*")] if checkpoints.exists() else []
    return max(steps, default=0)


def saving_beyond(checkpoints: Path, step: int) -> bool:
    """A save of a step after ``step`` is in progress."""
    if not checkpoints.exists():
        return False
    return any(p.name.startswith(".tmp-step_") and int(p.name[10:]) > step for p in checkpoints.iterdir())


def test_killed_at_random_moments_and_during_saves_ends_bit_identical(
    tmp_path: Path, cache_dir: Path
) -> None:
    """SIGKILL the whole 2-rank job ten times, half of them in the middle of a checkpoint save."""
    overrides = [*BASE, "train.max_steps=60", "train.ckpt_every=2", "train.eval_every=20"]
    (tmp_path / "reference").mkdir()
    assert run_ramp(overrides, cwd=tmp_path / "reference", cache_dir=cache_dir).returncode == 0
    rng = random.Random(20261122)
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    checkpoints = run_dir / "checkpoints"
    kills, kills_mid_save = 0, 0
    while kills < 10:
        resumed_from = newest_checkpoint(checkpoints)
        proc = launch_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, log=log)
        try:
            deadline = time.monotonic() + 180
            if kills % 2 == 0:
                # Let the first save after the resume point finish, then kill inside the next one.
                while not saving_beyond(checkpoints, resumed_from + 2):
                    assert proc.poll() is None, log.read_text()[-3000:]
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.002)
                kill_job(proc)
                # Counted only when the kill left the save unfinished (it may win the race and finish).
                kills_mid_save += saving_beyond(checkpoints, resumed_from + 2)
            else:
                time.sleep(rng.uniform(0.5, 7.0))  # start-up and training alike
                assert proc.poll() is None, "the job finished before its tenth kill"
                kill_job(proc)
        finally:
            if proc.poll() is None:
                kill_job(proc)
        kills += 1
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert kills_mid_save >= 3, f"only {kills_mid_save} of 5 kills landed inside a save"
    assert series(run_dir) == series(tmp_path / "reference" / "outputs" / "run")
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]


def test_torchrun_restarts_a_crashed_rank_and_training_resumes(
    tmp_path: Path, cache_dir: Path, reference: list[tuple[Any, ...]]
) -> None:
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    proc = launch_ramp(BASE, cwd=tmp_path, cache_dir=cache_dir, log=log, torchrun_args=("--max-restarts=1",))
    try:
        wait_for_step(run_dir, 8, proc)  # past the checkpoint of step 6
        workers(proc)[0].kill()  # one rank crashes
        assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert "resuming from outputs/run/checkpoints/step_" in log.read_text()
    assert series(run_dir) == reference


def test_an_open_log_interval_and_dropout_noise_resume_exactly(tmp_path: Path, cache_dir: Path) -> None:
    """SIGKILL after a checkpoint taken inside a log interval (train.log_every=4, a save every 3 steps),
    with dropout on: the resumed run logs what the unbroken one does, which needs the open interval's
    sums and every rank's RNG streams back."""
    keys = {"train.log_every", "train.ckpt_every", "train.max_steps", "train.eval_every"}
    overrides = [o for o in BASE if o.split("=")[0] not in keys]
    overrides += ["train.log_every=4", "train.ckpt_every=3", "train.max_steps=12", "train.eval_every=0"]
    overrides += ["model.dropout=0.1"]
    (tmp_path / "reference").mkdir()
    assert run_ramp(overrides, cwd=tmp_path / "reference", cache_dir=cache_dir).returncode == 0
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    proc = launch_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, log=log)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "latest").exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        kill_job(proc)
    resumed_from = newest_checkpoint(run_dir / "checkpoints")
    assert resumed_from % 4, "the kill must leave a checkpoint inside a log interval"
    assert resumed_from < 12, "the kill came after the end"
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    reference = read_metrics(tmp_path / "reference" / "outputs" / "run")[0]
    assert [r["step"] for r in reference] == [1, 4, 8, 12]
    assert series(run_dir) == series(tmp_path / "reference" / "outputs" / "run")


def test_single_rank_with_accumulation_resumes_exactly(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*BASE, "train.grad_accum_steps=3", "train.max_steps=12"]
    reference_dir = tmp_path / "ref"
    reference_dir.mkdir()
    assert run_ramp(overrides, cwd=reference_dir, cache_dir=cache_dir, nproc=0).returncode == 0
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    proc = launch_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, log=log, nproc=0)
    try:
        wait_for_step(run_dir, 7, proc)
        kill_job(proc)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert result.returncode == 0, result.stderr
    assert series(run_dir) == series(reference_dir / "outputs" / "run")


def test_a_finished_run_extends_to_a_larger_max_steps(tmp_path: Path, cache_dir: Path) -> None:
    short = [*BASE, "train.max_steps=6", "schedule=warmup_stable_decay"]
    assert run_ramp(short, cwd=tmp_path, cache_dir=cache_dir, nproc=0).returncode == 0
    again = run_ramp(short, cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert again.returncode == 0
    assert "already reached train.max_steps=6" in again.stdout
    longer = run_ramp(
        [*BASE, "train.max_steps=9", "schedule=warmup_stable_decay"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
    )
    assert longer.returncode == 0, longer.stderr
    changed = [line for line in longer.stderr.splitlines() if "train.max_steps" in line]
    assert len(changed) == 1, longer.stderr  # reported once, with the LR the run continues at
    assert "train.max_steps: 6 -> 9" in changed[0]
    assert "train.max_steps is now 9" in changed[0]
    train, _ = read_metrics(tmp_path / "outputs" / "run")
    assert [r["step"] for r in train] == list(range(1, 10))
    # The schedule is recomputed over 9 steps: step 7 trains at the 9-step curve's LR, not at the
    # 6-step curve's final 0 (the trap of a resumed run stuck at LR 0).
    assert train[5]["lr"] == 0.0
    assert train[6]["lr"] == pytest.approx(6e-4)
    assert train[6]["lr"] > 0


def test_export_gives_a_transformers_model_with_identical_logits(tmp_path: Path, cache_dir: Path) -> None:

    from transformers import AutoModelForCausalLM

    from trainer.export import load_model

    overrides = [*BASE, "train.max_steps=3", "model=llama-tiny"]
    assert run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0).returncode == 0
    ckpt, out = tmp_path / "outputs" / "run" / "checkpoints" / "step_3", tmp_path / "hf"
    run_export(ckpt, out, cache_dir)
    assert (out / "config.json").exists()
    assert (out / "model.safetensors").exists()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = load_model(ckpt)
    tokens = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, ours(tokens).logits)
    trained = checkpoint_weights(ckpt)
    assert all(
        torch.equal(exported.state_dict()[k], v) for k, v in trained.items() if k in exported.state_dict()
    )


def test_on_nan_halt_stops_before_the_update_with_a_clear_message(tmp_path: Path, cache_dir: Path) -> None:
    overrides = [*BASE, "optim.lr=1e30", "train.max_grad_norm=0", "schedule=constant", "train.ckpt_every=1"]
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert result.returncode == 3
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ramp: error: non-finite gradient norm (nan) at step")
    assert "train.on_nan=skip" in result.stderr
    assert "Traceback" not in result.stderr
    halted_at = train_steps(tmp_path / "outputs" / "run") + 1
    assert not (tmp_path / "outputs" / "run" / "checkpoints" / f"step_{halted_at}").exists()


# ---------------------------------------------------------------------------------------------------
# backend=deepspeed: the same guarantees through the engine's own save and load (ZeRO 3, accumulation)

DEEPSPEED_STEPS = 16
DEEPSPEED = [
    "backend=deepspeed",
    "backend.zero_stage=3",
    f"train.max_steps={DEEPSPEED_STEPS}",
    "train.log_every=1",
    "train.ckpt_every=3",
    "train.grad_accum_steps=2",
    "train.eval_every=5",
    "train.eval_steps=2",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "run.name=run",
]


@pytest.fixture(scope="module")
def deepspeed_reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("deepspeed-reference")
    result = run_ramp([*DEEPSPEED, "logger.wandb.mode=offline"], cwd=cwd, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd / "outputs" / "run", result.stdout + result.stderr


def test_deepspeed_signal_to_one_rank_checkpoints_all_and_resumes_exactly(
    tmp_path: Path, cache_dir: Path, deepspeed_reference: tuple[Path, str]
) -> None:
    overrides = [*DEEPSPEED, "logger.wandb.mode=disabled"]
    run_dir, log = tmp_path / "outputs" / "run", tmp_path / "job.log"
    proc = launch_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, log=log)
    try:
        wait_for_step(run_dir, 4, proc)  # past the checkpoint of step 3, before the one of step 6
        workers(proc)[-1].send_signal(signal.SIGTERM)  # one rank only
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            kill_job(proc)
    stopped_at = train_steps(run_dir)
    assert 4 <= stopped_at < DEEPSPEED_STEPS
    assert any(
        f"saved outputs/run/checkpoints/step_{stopped_at} at step" in line
        for line in own_lines(log.read_text())
    )
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resuming from outputs/run/checkpoints/step_{stopped_at}" in result.stdout
    assert series(run_dir) == series(deepspeed_reference[0])


def test_deepspeed_run_logs_and_checkpoints_like_ddp(
    deepspeed_reference: tuple[Path, str], tmp_path: Path
) -> None:
    from trainer import checkpoint, resume

    run_dir, output = deepspeed_reference
    lines = own_lines(output)
    assert not [line for line, count in Counter(lines).items() if count > 1]
    assert (
        sum(line.startswith("step ") and f"/{DEEPSPEED_STEPS} |" in line for line in lines) == DEEPSPEED_STEPS
    )
    train, _ = read_metrics(run_dir)
    runs = wandb_runs(run_dir)
    assert len(runs) == 1, runs
    logged = {row["step"]: row for row in read_wandb_history(runs[0]) if "lr" in row}
    assert [logged[r["step"]]["loss"] for r in train] == [r["loss"] for r in train]
    # The engine's files sit in a sub-folder; each is checksummed under its relative path.
    newest = run_dir / "checkpoints" / f"step_{DEEPSPEED_STEPS}"
    meta = json.loads((newest / "meta.json").read_text())
    assert meta["backend"] == "deepspeed"
    assert meta["world_size"] == 2
    shards = sorted(name for name in meta["files"] if name.startswith("deepspeed/"))
    assert "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards
    assert all(meta["files"][name] == checkpoint.checksum(newest / name) for name in meta["files"])
    damaged = tmp_path / newest.name  # a copy: the reference run stays whole for other tests
    shutil.copytree(newest, damaged)
    shard = damaged / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    assert resume.problem(damaged) == (
        "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its checksum (truncated or corrupted)"
    )
