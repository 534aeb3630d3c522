"""Run and schedule lengths in tokens, samples and epochs: the same steps, at exactly the same LRs, as the
length in steps they convert to; epochs counted as the Hugging Face Trainer counts them."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.durations import Batching, hf_steps_per_epoch, parse_count
from trainer.errors import ConfigError
from trainer.schedules import SCHEDULES, build_schedule
from trainer.testing import run_distributed

REQUIRED: dict[str, dict[str, Any]] = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 20},
}
BATCHING = Batching(seq_len=64, micro_batch_size=4, grad_accum_steps=3, world_size=2, samples_per_epoch=1000)
"""24 samples, 1,536 tokens a step; an epoch of 1,000 samples is 42 steps as the HF Trainer counts them
(125 micro-batches of 4 on each of 2 ranks, in windows of 3)."""


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (2000, 2000.0),
        ("2e9", 2e9),
        ("2B", 2e9),
        ("500M", 5e8),
        ("1.5k", 1500.0),
        ("3T", 3e12),
        ("1_000", 1000.0),
    ],
)
def test_counts_read_as_people_write_them(text: object, value: float) -> None:
    assert parse_count(text, "train.max_tokens") == value


@pytest.mark.parametrize("text", ["2X", "lots", "-5", "", True])
def test_a_count_that_is_not_one_is_refused_naming_the_key(text: object) -> None:
    with pytest.raises(ConfigError, match=r"train\.max_tokens="):
        parse_count(text, "train.max_tokens")


def _hf_trainer_steps(info: DistInfo, samples: int, micro: int, accum: int, epochs: float) -> tuple[int, int]:
    """(steps per epoch, max_steps) from the installed transformers' own Trainer, on this rank."""
    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": torch.tensor([float(i)])}

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": (self.w * x).sum()}

    args = TrainingArguments(
        output_dir=f"/tmp/ramp-hf-{info.rank}", per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
        num_train_epochs=epochs, use_cpu=True, report_to=[], save_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=Model(), args=args, train_dataset=Data())
    values = trainer.set_initial_training_values(args, trainer.get_train_dataloader())
    return int(values[1]), int(values[-1])


CASES = [(1000, 4, 1, 1.0), (1001, 4, 3, 2.5), (7, 4, 2, 1.0), (999, 8, 5, 0.3), (50, 3, 4, 3.0)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_epochs_are_counted_in_steps_as_the_hf_trainer_counts_them(world_size: int) -> None:
    for samples, micro, accum, epochs in CASES:  # some leave a partial accumulation window
        if world_size == 1:
            expected = [
                _hf_trainer_steps(DistInfo(0, 0, 1, 1, torch.device("cpu")), samples, micro, accum, epochs)
            ]
        else:
            expected = run_distributed(_hf_trainer_steps, samples, micro, accum, epochs, timeout=300)
        per_epoch = hf_steps_per_epoch(samples, micro, world_size, accum)
        ours = Batching(64, micro, accum, world_size, samples)
        for steps_per_epoch, max_steps in expected:
            assert (per_epoch, ours.to_units(epochs, "epochs", "train.epochs")) == (
                steps_per_epoch,
                max_steps,
            )


def step_schedule(name: str, **keys: Any) -> list[float]:
    schedule = build_schedule(SCHEDULES[name](**REQUIRED.get(name, {}), **keys), max_steps=120, peak_lr=6e-4)
    return [schedule.lr(step) for step in range(1, 121)]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_warmup_in_tokens_samples_or_epochs_is_exactly_the_warmup_in_steps(name: str) -> None:
    warmup = 0 if name == "constant" else 21
    expected = step_schedule(name, warmup_steps=warmup)
    lengths: tuple[tuple[str, Any], ...] = (
        ("warmup_tokens", warmup * BATCHING.tokens_per_step),
        ("warmup_tokens", f"{max(warmup - 1, 0) * BATCHING.tokens_per_step + min(warmup, 1)}"),  # rounded up
        ("warmup_samples", warmup * BATCHING.global_batch),
        ("warmup_epochs", warmup / 42),
    )
    for key, value in lengths:
        schedule = build_schedule(
            SCHEDULES[name](**REQUIRED.get(name, {}), **{key: value}),
            max_steps=120,
            peak_lr=6e-4,
            clock=BATCHING,
        )
        assert schedule.warmup_steps == warmup, key
        assert [schedule.lr(step) for step in range(1, 121)] == expected, key


@pytest.mark.parametrize(
    ("length", "steps"),
    [
        ("train.max_tokens=368640", 240),
        ("train.max_tokens=368.64k", 240),
        ("train.max_tokens=368000", 240),  # rounded up to whole steps
        ("train.max_samples=5760", 240),
        ("train.epochs=2", 252),
        ("train.epochs=0.5", 63),
    ],
)
def test_a_run_length_in_any_unit_is_the_same_steps_at_the_same_lrs(length: str, steps: int) -> None:
    """Steps of 24 samples of 64 tokens; an epoch of 3,024 samples is 126 steps (378 micro-batches of 4 on
    each of 2 ranks, in windows of 3)."""
    common = [
        "train.seq_len=64",
        "train.micro_batch_size=4",
        "train.grad_accum_steps=3",
        "schedule.warmup_ratio=0.1",
    ]
    in_steps = compose([*common, f"train.max_steps={steps}"]).schedule_for(2, 3024)
    given = compose([*common, length]).schedule_for(2, 3024)
    assert given.max_steps == in_steps.max_steps == steps
    assert [given.lr(k) for k in range(1, steps + 1)] == [in_steps.lr(k) for k in range(1, steps + 1)]


def test_max_steps_wins_over_epochs_and_no_length_means_300_steps() -> None:
    assert compose(["train.max_steps=17", "train.epochs=3"]).schedule_for(1, 10_000).max_steps == 17
    assert compose().lr_schedule.max_steps == 300


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["train.max_tokens=2B", "train.epochs=1"], ["train.max_tokens", "train.epochs"]),
        (["train.max_tokens=2B", "train.max_samples=10"], ["train.max_tokens", "train.max_samples"]),
        (["train.max_steps=10", "train.max_tokens=2B"], ["train.max_steps", "train.max_tokens"]),
        (["train.max_tokens=2Q"], ["train.max_tokens=2Q"]),
        (
            ["train.max_steps=10", "schedule.warmup_tokens=1B"],
            ["schedule.warmup_tokens=1B (", "exceeds the run's 10 steps"],
        ),
        (
            ["train.max_steps=10", "schedule.warmup_samples=10000"],
            ["schedule.warmup_samples=10000 (", "exceeds the run's 10 steps"],
        ),
        (
            ["schedule.warmup_steps=5", "schedule.warmup_tokens=1M"],
            ["schedule.warmup_steps", "schedule.warmup_tokens"],
        ),
        (["schedule.warmup_start_ratio=1.5"], ["schedule.warmup_start_ratio"]),
    ],
)
def test_bad_lengths_are_refused_naming_the_keys(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        compose(overrides)
    for needle in needles:
        assert needle in str(excinfo.value)


def test_warmup_can_start_from_a_floor_as_megatron_does() -> None:
    """megatron/core/optimizer_param_scheduler.py get_lr: init + (max - init) * step / warmup_steps."""
    floor = build_schedule(
        SCHEDULES["linear"](warmup_steps=10, warmup_start_lr=1e-4), max_steps=100, peak_lr=6e-4
    )
    plain = build_schedule(SCHEDULES["linear"](warmup_steps=10), max_steps=100, peak_lr=6e-4)
    for step in range(1, 10):
        assert floor.lr(step) == pytest.approx(1e-4 + (6e-4 - 1e-4) * step / 10, rel=1e-12)
    assert [floor.lr(k) for k in range(10, 101)] == [plain.lr(k) for k in range(10, 101)]
    assert math.isclose(floor.lr(1), 1.5e-4)
