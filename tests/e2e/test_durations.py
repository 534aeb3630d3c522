"""Lengths in tokens and epochs end to end on 2 ranks: the same steps, at exactly the same LRs, as the run
given in steps, and the records say where each step stands in every unit."""

from __future__ import annotations

import functools
import itertools
import random
import subprocess
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    kill_job,
    kill_when,
    launch_ramp,
    megatron_lrs,
    read_metrics,
    run_ramp,
    simulated_batches,
    train_steps,
)

pytestmark = pytest.mark.slow

COMMON = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "logger.wandb.mode=disabled",
]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    keys = ("step", "lr", "lr/decay", "loss", "grad_norm", "tokens", "samples", "global_batch", "epoch")
    return [tuple(r[k] for k in keys) for r in read_metrics(run_dir)[0]]


def test_a_run_in_tokens_is_the_run_in_steps(tmp_path: Path, cache_dir: Path) -> None:
    """2 ranks x 4 sequences x 64 tokens: 512 tokens a step; 6,144 tokens are 12 steps, 1,536 warm up 3."""
    by_steps = [*COMMON, "schedule=cosine", "train.max_steps=12", "schedule.warmup_steps=3", "run.name=steps"]
    by_tokens = [*COMMON, "schedule=cosine", "train.max_tokens=6144", "schedule.warmup_tokens=1.536k"]
    ok(run_ramp(by_steps, cwd=tmp_path, cache_dir=cache_dir))
    result = ok(run_ramp([*by_tokens, "run.name=tokens"], cwd=tmp_path, cache_dir=cache_dir))
    assert "length 12 steps = 6,144 tokens = 96 samples" in result.stdout
    assert "warmup 3 steps = 1,536 tokens = 24 samples" in result.stdout
    assert series(tmp_path / "outputs" / "tokens") == series(tmp_path / "outputs" / "steps")
    records = read_metrics(tmp_path / "outputs" / "tokens")[0]
    assert [(r["tokens"], r["samples"], r["global_batch"]) for r in records] == [
        (512 * k, 8 * k, 8) for k in range(1, 13)
    ]


def test_a_run_in_epochs_is_the_run_in_the_steps_the_hf_trainer_counts(
    tmp_path: Path, cache_dir: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]:
        (corpus / f"{path.stem}.txt").write_bytes(path.read_bytes())
    data = ["data=text", f"data.files={corpus}", "data.val_fraction=0.2"]
    by_epochs = [
        *COMMON,
        *data,
        "schedule=warmup_stable_decay",
        "train.epochs=0.5",
        "schedule.warmup_epochs=0.1",
    ]
    result = ok(run_ramp([*by_epochs, "run.name=epochs"], cwd=tmp_path, cache_dir=cache_dir))
    records = read_metrics(tmp_path / "outputs" / "epochs")[0]
    steps, warmup = len(records), int(result.stdout.split("| warmup ")[1].split(" steps")[0])
    by_steps = [*COMMON, *data, "schedule=warmup_stable_decay", f"train.max_steps={steps}"]
    ok(
        run_ramp(
            [*by_steps, f"schedule.warmup_steps={warmup}", "run.name=steps"],
            cwd=tmp_path,
            cache_dir=cache_dir,
        )
    )
    assert series(tmp_path / "outputs" / "epochs") == series(tmp_path / "outputs" / "steps")
    assert 0.45 < records[-1]["epoch"] < 0.55  # half a pass over the training samples


# --- train.batch_schedule: 2 ranks x 4 sequences x 64 tokens; 8 sequences a step, 16 from 2,048 tokens (step
# 5), 32 from 5,000 tokens (step 8).
STAGES = [(0, 8), (2000, 16), (5000, 32)]
RAMP_STEPS = 12
RAMP = [
    *COMMON,
    "train.batch_schedule=0:8 2k:16 5k:32",
    f"train.max_steps={RAMP_STEPS}",
    "schedule=cosine",
    "schedule.warmup_tokens=1k",
    "train.ckpt_every=1",
    "run.name=ramp",
]


@pytest.fixture(scope="module")
def ramp_reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("ramp-reference")
    result = ok(run_ramp(RAMP, cwd=cwd, cache_dir=cache_dir))
    return cwd / "outputs" / "ramp", result.stdout


def test_a_batch_schedule_trains_each_stage_at_megatrons_sample_based_lr(
    ramp_reference: tuple[Path, str],
) -> None:
    run_dir, stdout = ramp_reference
    records = read_metrics(run_dir)[0]
    batches = simulated_batches(STAGES, 64, RAMP_STEPS)
    assert batches == [8] * 4 + [16] * 3 + [32] * 5
    assert [r["global_batch"] for r in records] == batches
    samples = list(itertools.accumulate(batches))
    assert [(r["samples"], r["tokens"]) for r in records] == [(s, 64 * s) for s in samples]
    # the sampler handed out exactly the samples claimed: the fraction of the pass grows with them
    assert [r["epoch"] / r["samples"] for r in records] == pytest.approx(
        [records[0]["epoch"] / 8] * RAMP_STEPS
    )
    reference = megatron_lrs(
        batches, 6e-4, lr_decay_style="cosine", lr_warmup_steps=16, lr_decay_steps=samples[-1]
    )
    for record, expected in zip(records, reference, strict=True):
        assert record["lr"] == pytest.approx(expected, rel=1e-12)
        assert record["lr/decay"] == record["lr"]  # what the optimizer stepped with
    assert (
        "from step 5 (2,048 tokens): 16 sequences a step = 1,024 tokens (4 x 64 x 2 ranks x 2 accum)"
        in stdout
    )
    assert (
        "from step 8 (5,120 tokens): 32 sequences a step = 2,048 tokens (4 x 64 x 2 ranks x 4 accum)"
        in stdout
    )


def reached(run_dir: Path, step: int) -> bool:
    return train_steps(run_dir) >= step


def test_a_batch_schedule_run_killed_around_its_batch_changes_resumes_bit_identical(
    tmp_path: Path, cache_dir: Path, ramp_reference: tuple[Path, str]
) -> None:
    """SIGKILL the 2-rank job right after each batch change (steps 5 and 8) and at random moments."""
    run_dir, log = tmp_path / "outputs" / "ramp", tmp_path / "job.log"
    rng = random.Random(15)
    for moment in (5, 8, 0, 0):  # 0: a random moment
        proc = launch_ramp(RAMP, cwd=tmp_path, cache_dir=cache_dir, log=log)
        if moment:
            kill_when(functools.partial(reached, run_dir, moment), proc, log)
        else:
            time.sleep(rng.uniform(0.5, 6.0))
            kill_job(proc)
    ok(run_ramp(RAMP, cwd=tmp_path, cache_dir=cache_dir))
    assert series(run_dir) == series(ramp_reference[0])


DEEPSPEED_RAMP = [*RAMP, "backend=deepspeed", "backend.zero_stage=1", "train.ckpt_every=3", "run.name=ds"]


def test_deepspeed_follows_the_batch_schedule_and_resumes_across_a_change_exactly(
    tmp_path: Path, cache_dir: Path, ramp_reference: tuple[Path, str]
) -> None:
    (tmp_path / "unbroken").mkdir()
    ok(run_ramp(DEEPSPEED_RAMP, cwd=tmp_path / "unbroken", cache_dir=cache_dir))
    unbroken = tmp_path / "unbroken" / "outputs" / "ds"
    ddp = read_metrics(ramp_reference[0])[0]
    records = read_metrics(unbroken)[0]
    assert [(r["lr"], r["global_batch"], r["tokens"]) for r in records] == [
        (r["lr"], r["global_batch"], r["tokens"]) for r in ddp
    ]
    # the same micro-batches accumulated into each step as on DDP: the same losses up to rounding
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in ddp], rel=1e-4)
    run_dir, log = tmp_path / "outputs" / "ds", tmp_path / "job.log"
    proc = launch_ramp(DEEPSPEED_RAMP, cwd=tmp_path, cache_dir=cache_dir, log=log)
    kill_when((run_dir / "checkpoints" / "step_6").exists, proc, log)  # inside the second stage
    result = ok(run_ramp(DEEPSPEED_RAMP, cwd=tmp_path, cache_dir=cache_dir))
    assert "resuming from outputs/ds/checkpoints/step_" in result.stdout
    assert series(run_dir) == series(unbroken)
