"""ramp end to end, as a user runs it: real torchrun, two gloo ranks, real wandb offline files."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tests.helpers import own_lines, read_metrics, read_wandb_history, run_ramp, transformers_lrs, wandb_runs

pytestmark = pytest.mark.slow

COSINE = ["train.max_steps=20", "schedule=cosine", "schedule.warmup_steps=5", "train.log_every=1"]


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("cosine")
    result = run_ramp(COSINE, cwd=cwd, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return cwd / "outputs" / "gpt2-tiny", result.stdout + result.stderr


def test_two_ranks_write_twenty_records_on_the_transformers_cosine(cosine_run: tuple[Path, str]) -> None:
    run_dir, _ = cosine_run
    train, evals = read_metrics(run_dir)
    assert [r["step"] for r in train] == list(range(1, 21))
    expected = transformers_lrs("cosine", 6e-4, 5, 20)
    for record, lr in zip(train, expected, strict=True):
        assert record["lr"] == pytest.approx(lr, rel=1e-12, abs=1e-18)
        assert record["lr/decay"] == record["lr/no_decay"] == record["lr"]
    assert train[0]["lr"] > 0, "step 1 must not train at LR 0"
    for record in train:
        for key in ("loss", "tokens", "tokens_per_s", "grad_norm", "step_time", "data_wait_s"):
            assert math.isfinite(record[key]), key
    assert [r["tokens"] for r in train] == [4096 * k for k in range(1, 21)]  # 8 x 256 x 2 ranks per step
    losses = [r["loss"] for r in train]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert [e["step"] for e in evals] == [20]
    assert math.isfinite(evals[0]["val_loss"])
    assert evals[0]["val_ppl"] == pytest.approx(math.exp(evals[0]["val_loss"]))


def test_run_folder_holds_resolved_config_and_one_wandb_run(cosine_run: tuple[Path, str]) -> None:
    run_dir, _ = cosine_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["max_steps"] == 20
    assert config["schedule"]["warmup_steps"] == 5
    assert config["run"]["dir"] == "outputs/gpt2-tiny"  # interpolations resolved
    runs = wandb_runs(run_dir)
    assert len(runs) == 1, runs
    history = read_wandb_history(runs[0])
    train, _ = read_metrics(run_dir)
    logged = {row["step"]: row for row in history if "lr" in row}
    assert sorted(logged) == list(range(1, 21))
    for record in train:
        assert logged[record["step"]]["lr"] == record["lr"]
        assert logged[record["step"]]["loss"] == record["loss"]
        assert logged[record["step"]]["_step"] == record["step"]  # x axis: the global step


def test_nothing_is_printed_twice(cosine_run: tuple[Path, str]) -> None:
    _, output = cosine_run
    lines = own_lines(output)
    repeated = [line for line, count in Counter(lines).items() if count > 1]
    assert not repeated, repeated
    assert sum(line.startswith("step ") and "/20 |" in line for line in lines) == 20
    assert sum("ramp | done" in line for line in lines) == 1


def test_gradient_accumulation_keeps_the_global_step_and_lr(
    tmp_path: Path, cache_dir: Path, cosine_run: tuple[Path, str]
) -> None:
    result = run_ramp([*COSINE, "train.grad_accum_steps=3"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    train, _ = read_metrics(tmp_path / "outputs" / "gpt2-tiny")
    reference, _ = read_metrics(cosine_run[0])
    assert [r["step"] for r in train] == list(range(1, 21))
    assert [r["lr"] for r in train] == [r["lr"] for r in reference]
    assert [r["tokens"] for r in train] == [3 * 4096 * k for k in range(1, 21)]


def test_logged_loss_does_not_depend_on_the_world_size(tmp_path: Path, cache_dir: Path) -> None:
    """One rank accumulating 2 micro-batches trains on exactly the samples 2 ranks see in one."""
    common = ["train.max_steps=4", "train.log_every=1", "train.eval_every=0", "logger.wandb.mode=disabled"]
    one = run_ramp(
        [*common, "train.grad_accum_steps=2", "run.name=one"], cwd=tmp_path, cache_dir=cache_dir, nproc=1
    )
    two = run_ramp([*common, "run.name=two"], cwd=tmp_path, cache_dir=cache_dir, nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    one_rank, two_ranks = (
        read_metrics(tmp_path / "outputs" / "one")[0],
        read_metrics(tmp_path / "outputs" / "two")[0],
    )
    assert len(one_rank) == len(two_ranks) == 4
    # Summed in another order, so equal to rounding; the gradient too (clipping and Adam would hide a
    # wrong scale from the losses, not from the pre-clip norm).
    assert [r["loss"] for r in one_rank] == pytest.approx([r["loss"] for r in two_ranks], rel=1e-5)
    assert [r["grad_norm"] for r in one_rank] == pytest.approx([r["grad_norm"] for r in two_ranks], rel=1e-4)


def test_single_process_without_torchrun(tmp_path: Path, cache_dir: Path) -> None:
    result = run_ramp(
        ["train.max_steps=3", "train.log_every=1", "train.eval_every=0", "logger.wandb.mode=disabled"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
    )
    assert result.returncode == 0, result.stderr
    train, _ = read_metrics(tmp_path / "outputs" / "gpt2-tiny")
    assert [r["tokens"] for r in train] == [2048, 4096, 6144]


def test_a_record_of_several_steps_holds_their_token_weighted_mean(
    tmp_path: Path, cache_dir: Path, cosine_run: tuple[Path, str]
) -> None:
    """The default train.log_every=10: the loss of the record at step 10 is the mean of steps 2..10 (all of
    the same tokens) of the same run logged every step; at 20, of steps 11..20."""
    result = run_ramp([c for c in COSINE if c != "train.log_every=1"], cwd=tmp_path, cache_dir=cache_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    every_step = {r["step"]: r for r in read_metrics(cosine_run[0])[0]}
    records = read_metrics(tmp_path / "outputs" / "gpt2-tiny")[0]
    assert [r["step"] for r in records] == [1, 10, 20]
    for record, steps in zip(records, ([1], range(2, 11), range(11, 21)), strict=True):
        mean = sum(every_step[k]["loss"] for k in steps) / len(steps)
        assert record["loss"] == pytest.approx(mean, rel=1e-12), record["step"]
        assert record["grad_norm"] == every_step[record["step"]]["grad_norm"]
        assert record["tokens"] == every_step[record["step"]]["tokens"]
