"""A wrong configuration: one clear message naming the key, a non-zero exit, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import own_lines, ramp_env, run_ramp, snapshot


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.max_stepz=3"], "train.max_stepz"),
        (["train.max_steps=abc"], "train.max_steps"),
        (["train.precision=fp16"], "train.precision"),
        (["schedule=cosine", "schedule.power=2"], "schedule.power"),
        (["model=gpt9"], "model=gpt9 is not a model preset"),
        (
            ["train.max_steps=20", "schedule.warmup_steps=50"],
            "schedule.warmup_steps=50 exceeds the run's 20 steps",
        ),
        (["schedule.warmup_ratio=1.5"], "schedule.warmup_ratio"),
        (["optim.lr=0"], "optim.lr"),
        (["train.seq_len=4096"], "model.max_position_embeddings"),
        (["run.resume=/no/such/checkpoint"], "run.resume"),
        (["logger.wandb.mode=sometimes"], "logger.wandb.mode"),
    ],
)
def test_bad_config_fails_with_one_clear_message(
    overrides: list[str], named: str, tmp_path: Path, cache_dir: Path
) -> None:
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0, timeout=120)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists(), "a failed start must not create the run folder"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            ["train.max_tokens=2B", "train.epochs=1"],
            "train.max_tokens and train.epochs each give the run's length",
        ),
        (["train.max_tokens=2Q"], "train.max_tokens=2Q is not a count"),
        (
            ["train.max_steps=5", "schedule.warmup_tokens=1M"],
            "schedule.warmup_tokens=1M (489 steps) exceeds the run's 5 steps",
        ),
        (
            ["train.max_samples=100", "train.max_tokens=1M"],
            "train.max_tokens and train.max_samples each give",
        ),
        (["schedule.warmup_tokens=1X"], "schedule.warmup_tokens=1X is not a count"),
        (
            ["train.max_tokens=1M", "schedule.warmup_tokens=2M"],
            "schedule.warmup_tokens=2M (977 steps) exceeds the run's 489 steps (train.max_tokens=1M)",
        ),
        (
            ["train.max_steps=5", "schedule.warmup_epochs=2"],
            "schedule.warmup_epochs=2.0 (30512 steps) exceeds the run's 5 steps",
        ),
        (
            ["train.batch_schedule=0:8 1M:18"],
            "train.batch_schedule: a global batch of 18 is not a multiple of",
        ),
        (["train.batch_schedule=0:8 2M:16 1M:32"], "the stages must be in increasing tokens"),
        (["train.batch_schedule=0:8 1M:16", "train.grad_accum_steps=2"], "train.grad_accum_steps"),
        (
            ["train.batch_schedule=0:8 1M:16", "train.max_steps=5", "schedule.warmup_samples=1k"],
            "schedule.warmup_samples=1k (1000 samples) exceeds the run's 40 samples (train.max_steps=5)",
        ),
    ],
)
def test_a_bad_length_or_batch_schedule_is_one_ramp_error_and_exit_2(
    overrides: list[str], named: str, tmp_path: Path, cache_dir: Path
) -> None:
    """Two run lengths, a count in no unit, a warmup longer than the run in any unit, a batch the ranks'
    micro-batches cannot make, stages not increasing in tokens."""
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ramp: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert named in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists(), "a failed start must not create the run folder"


def test_existing_run_folder_is_never_touched(tmp_path: Path, cache_dir: Path) -> None:
    run_dir = tmp_path / "outputs" / "gpt2-tiny"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (run_dir / "notes.txt").write_text("precious")
    before = snapshot(run_dir)
    cases = [
        (["run.resume=never"], "run.dir=outputs/gpt2-tiny already exists and run.resume=never"),
        (["run.resume=auto"], "run.dir=outputs/gpt2-tiny already holds another run with no checkpoint"),
        (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    ]
    for overrides, message in cases:
        result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"ramp: error: {message}"), lines[0]
        assert snapshot(run_dir) == before


def test_a_secret_in_an_error_message_is_scrubbed(tmp_path: Path, cache_dir: Path) -> None:
    env = ramp_env(cache_dir) | {"HF_TOKEN": "hf_planted_0a1b2c3d4e"}
    result = run_ramp(
        ["data=text", "data.files=corpus/hf_planted_0a1b2c3d4e/*.txt"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
        env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "ramp: error: data.files=corpus/***/*.txt matches no file; check the pattern and the working folder"
    )


@pytest.mark.slow
def test_bad_config_under_torchrun_is_reported_once(tmp_path: Path, cache_dir: Path) -> None:
    result = run_ramp(["train.max_steps=10", "schedule.warmup_steps=11"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode != 0
    errors = [line for line in own_lines(result.stderr) if line.startswith("ramp: error:")]
    assert errors == [
        "ramp: error: schedule.warmup_steps=11 exceeds the run's 10 steps (train.max_steps=10); lower it, "
        "lengthen the run or use schedule.warmup_ratio"
    ]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param(
            ["backend=fsdp", "backend.cpu_offload=true"],
            "backend.cpu_offload=true moves state off a GPU, and there is none; remove it",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="refused only without a GPU"),
        ),
        (
            ["backend=deepspeed", "train.ckpt_async=true"],
            "train.ckpt_async=true needs backend=ddp or backend=fsdp",
        ),
    ],
)
def test_a_backend_option_this_run_cannot_have_is_one_ramp_error(
    overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    result = run_ramp(overrides, cwd=tmp_path, cache_dir=cache_dir, nproc=0, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("ramp: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert errors[0].startswith(f"ramp: error: {message}")
    assert not (tmp_path / "outputs").exists(), "a failed start must not create the run folder"


@pytest.mark.slow
def test_a_shard_group_that_does_not_divide_the_ranks_is_reported_once(
    tmp_path: Path, cache_dir: Path
) -> None:
    result = run_ramp(["backend=fsdp", "backend.shard_group_size=3"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode != 0
    assert "/trainer/" not in result.stderr  # torchrun prints its own traceback, never one of ramp's frames
    errors = [line for line in own_lines(result.stderr) if line.startswith("ramp: error:")]
    assert errors == [
        "ramp: error: backend.shard_group_size=3 does not divide the 2 ranks; use a divisor (e.g. the GPUs of "
        "one node) or null"
    ]
    assert not (tmp_path / "outputs").exists()
