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
from trainer import checkpoint

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


def save_in_progress(checkpoints: Path, step: int) -> str | None:
    """How far the save of a step after ``step`` has got, None when there is none: "staging" (its folder
    only), "writing" (``dcp/`` without DCP's ``.metadata``, which the backend's write ends with: under
    train.ckpt_async the background write is under way) or "written" (the write is done, the checkpoint
    is not yet complete). Saves of ``step`` and before are not counted: a killed run's partial save is
    one after its newest checkpoint, and it is left there until the resumed run has started."""
    if not checkpoints.exists():
        return None
    for path in checkpoints.iterdir():
        if path.name.startswith(".tmp-step_") and int(path.name[10:]) > step:
            dcp = path / "dcp"
            return "written" if (dcp / ".metadata").exists() else "writing" if dcp.is_dir() else "staging"
    return None


KILL_AT = {
    "save": ("staging", "writing", "written"),
    "writing": ("writing",),
    "written": ("written",),
}
"""The moments of a save a kill waits for, by the kill's kind ("random" waits for none)."""


def kill_once(kind: str, overrides: list[str], cwd: Path, cache_dir: Path, rng: random.Random) -> str | None:
    """Start the run (resuming), SIGKILL the whole job at a moment of ``kind`` and say how far the save
    after the first one since the resume point had got when the kill landed (None: no save was cut).

    A random kill comes 0.5 to 7 s after the start (start-up and training alike), or sooner, just after
    the run has saved 6 steps past its resume point: each kill then leaves a bounded amount of progress,
    whatever the machine's speed. Any other waits for the first save after the resume point to complete
    and kills inside the next one, at one of the moments :data:`KILL_AT` names."""
    log, checkpoints = cwd / "job.log", cwd / "outputs" / "run" / "checkpoints"
    resumed_from = newest_checkpoint(checkpoints)
    proc = launch_ramp(overrides, cwd=cwd, cache_dir=cache_dir, log=log)
    try:
        start = time.monotonic()
        delay = rng.uniform(0.5, 7.0)
        while (
            time.monotonic() - start < delay and newest_checkpoint(checkpoints) < resumed_from + 6
            if kind == "random"
            else save_in_progress(checkpoints, resumed_from + 2) not in KILL_AT[kind]
        ):
            assert proc.poll() is None, f"the job ended before a {kind} kill: " + log.read_text()[-3000:]
            assert time.monotonic() - start < 180, log.read_text()[-3000:]
            time.sleep(0.002)
    finally:
        kill_job(proc)
    return save_in_progress(checkpoints, resumed_from + 2)


KILLED_RUNS = {
    "ddp": (["train.max_steps=60"], ["save", "random"] * 5),
    "fsdp-async": (
        [
            "backend=fsdp",
            "train.max_steps=40",
            "train.ckpt_async=true",
            "train.seq_len=64",
            "train.micro_batch_size=2",
        ],
        ["writing", "random", "written", "random", "writing", "random"],
    ),
}
"""The runs killed at random moments: their overrides and their kills in order. FSDP2's saves run in the
background (train.ckpt_async) and are killed while DCP writes and after it wrote, before the rename."""


@pytest.mark.parametrize("name", list(KILLED_RUNS))
def test_killed_at_random_moments_and_during_saves_ends_bit_identical(
    name: str, tmp_path: Path, cache_dir: Path
) -> None:
    """SIGKILL the whole 2-rank job again and again, half of the kills in the middle of a checkpoint
    save; the run then ends with the records of an unbroken run (one that saves synchronously)."""
    extra, kinds = KILLED_RUNS[name]
    overrides = [*BASE, "train.ckpt_every=2", "train.eval_every=20", *extra]
    unbroken = [o for o in overrides if o != "train.ckpt_async=true"]
    (tmp_path / "reference").mkdir()
    assert run_ramp(unbroken, cwd=tmp_path / "reference", cache_dir=cache_dir).returncode == 0
    rng = random.Random(20261122)
    landed = [(kind, kill_once(kind, overrides, tmp_path, cache_dir, rng)) for kind in kinds]
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    # Counted only when the kill left the save unfinished (it may win the race and finish first).
    mid_save = [moment for kind, moment in landed if kind != "random" and moment is not None]
    assert len(mid_save) > len(kinds) // 4, f"too few kills landed inside a save: {landed}"
    if "train.ckpt_async=true" in overrides:
        assert "writing" in mid_save, f"no kill landed during a background write: {landed}"
    run_dir, reference = tmp_path / "outputs" / "run", tmp_path / "reference" / "outputs" / "run"
    assert series(run_dir) == series(reference)
    checkpoints = run_dir / "checkpoints"
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
    # The last run's checkpoints (background saves but the last) hold what the synchronous ones do.
    for step_dir in checkpoint.complete_checkpoints(checkpoints):
        expected = checkpoint_weights(reference / "checkpoints" / step_dir.name)
        saved = checkpoint_weights(step_dir)
        assert all(torch.equal(saved[key], value) for key, value in expected.items()), step_dir.name


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
    """The halt also completes the checkpoint of the step before, saved in the background (ckpt_async)."""
    overrides = [*BASE, "optim.lr=1e30", "train.max_grad_norm=0", "schedule=constant", "train.ckpt_every=1"]
    overrides += ["train.ckpt_async=true"]
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert result.returncode == 3
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ramp: error: non-finite gradient norm (nan) at step")
    assert "train.on_nan=skip" in result.stderr
    assert "Traceback" not in result.stderr
    halted_at = train_steps(tmp_path / "outputs" / "run") + 1
    checkpoints = tmp_path / "outputs" / "run" / "checkpoints"
    assert not (checkpoints / f"step_{halted_at}").exists()
    assert (checkpoints / "latest").read_text() == f"step_{halted_at - 1}"  # resumable, as the message says


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
