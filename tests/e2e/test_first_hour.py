"""What a new user meets in the first hour: separate experiments never share the default run folder,
while the same command keeps resuming its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import own_lines, read_metrics, run_ramp, snapshot

pytestmark = pytest.mark.slow

FIRST = ["train.max_steps=2", "train.seq_len=32", "train.micro_batch_size=2", "logger.wandb.mode=disabled"]


def test_a_different_command_never_trains_in_another_experiments_default_folder(
    tmp_path: Path, cache_dir: Path
) -> None:
    first = run_ramp(FIRST, cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "outputs" / "gpt2-tiny"
    before = snapshot(folder)

    other = run_ramp([*FIRST, "optim.lr=1e-3"], cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert other.returncode == 2
    errors = [line for line in own_lines(other.stderr) if line.startswith("ramp: error:")]
    assert len(errors) == 1, other.stderr
    assert (
        "the default run folder outputs/gpt2-tiny holds another experiment (optim.lr is 0.0006 there, 0.001 here)"
        in errors[0]
    )
    assert "give this one its own run.name=NAME, or pass run.name=gpt2-tiny to resume that run" in errors[0]
    assert "Traceback" not in other.stdout + other.stderr
    assert snapshot(folder) == before, "a refused start must not touch the folder"

    # A change no resume can make (the seed): naming the folder would not help, so it is not offered.
    seeded = run_ramp([*FIRST, "train.seed=7"], cwd=tmp_path, cache_dir=cache_dir, nproc=0)
    assert seeded.returncode == 2
    assert seeded.stderr.strip().endswith(
        "(train.seed is 1337 there, 7 here); give this one its own run.name=NAME"
    )

    same = run_ramp(FIRST, cwd=tmp_path, cache_dir=cache_dir, nproc=0)  # the same command: its own folder
    assert same.returncode == 0
    assert "already reached train.max_steps=2" in same.stdout + same.stderr
    assert "raise train.max_steps with run.name=gpt2-tiny to train further" in same.stdout + same.stderr
    assert snapshot(folder) == before

    named = run_ramp(
        [*FIRST[1:], "train.max_steps=3", "run.name=gpt2-tiny"], cwd=tmp_path, cache_dir=cache_dir, nproc=0
    )  # named: that run, resumed with the change
    assert named.returncode == 0, named.stderr[-3000:]
    assert "resuming from outputs/gpt2-tiny/checkpoints/step_2" in named.stdout + named.stderr
    assert [r["step"] for r in read_metrics(folder)[0]] == [1, 2, 3]
