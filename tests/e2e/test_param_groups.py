"""Per-group learning rates and weight decay through a real run: every group's LR is its multiplier times
the schedule's at every step, and its weight decay is what the optimizer state on disk holds."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import ddp_param_groups, deepspeed_param_groups, read_metrics, run_ramp

pytestmark = pytest.mark.slow

GROUPS = (
    "optim.groups=[{name: embed, match: ['*wte*', '*wpe*'], lr_mult: 0.1, weight_decay: 0.0},"
    " {name: vectors, ndim: 1, lr_mult: 2.0, weight_decay: 0.05}]"
)
RUN = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.eval_every=0",
    "train.log_every=1",
    "train.max_steps=6",
    "schedule.warmup_steps=2",
    "logger.wandb.mode=disabled",
    "optim.weight_decay=0.2",
    GROUPS,
]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize(("backend", "nproc"), [("ddp", 2), ("deepspeed", 0)])
def test_every_group_trains_at_its_multiple_of_the_schedule_with_its_own_decay(
    backend: str, nproc: int, tmp_path: Path, cache_dir: Path
) -> None:
    ok(run_ramp([*RUN, f"backend={backend}", "run.name=run"], cwd=tmp_path, cache_dir=cache_dir, nproc=nproc))
    records = read_metrics(tmp_path / "outputs" / "run")[0]
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:  # read from the optimizer as it stepped
        assert record["lr/decay"] == record["lr"]
        assert record["lr/embed"] == record["lr"] * 0.1
        assert record["lr/vectors"] == record["lr"] * 2.0
        assert "lr/no_decay" not in record  # every vector is in "vectors"
    saved = tmp_path / "outputs" / "run" / "checkpoints" / "step_6"
    groups = {g["name"]: g for g in (ddp_param_groups if backend == "ddp" else deepspeed_param_groups)(saved)}
    assert {name: g["weight_decay"] for name, g in groups.items()} == {
        "decay": 0.2,
        "embed": 0.0,
        "vectors": 0.05,
    }


def test_a_group_that_takes_nothing_or_a_parameter_twice_is_one_error(
    tmp_path: Path, cache_dir: Path
) -> None:
    cases = [
        ("optim.groups=[{name: head, match: ['*lm_head_bias*']}]", "optim.groups.head: pattern '*lm_head_bias*'"),
        ("optim.groups=[{name: a, match: ['*wte*']}, {name: b, ndim: 2}]", "transformer.wte.weight is taken by both a and b"),
    ]  # fmt: skip
    for override, message in cases:
        result = run_ramp([*RUN[:-1], override], cwd=tmp_path, cache_dir=cache_dir, nproc=0)
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("ramp: error:")]
        assert len(errors) == 1, result.stderr[-2000:]
        assert message in errors[0]
        assert not (tmp_path / "outputs").exists()
