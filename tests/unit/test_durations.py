"""Run and schedule lengths in tokens, samples and epochs: the same steps, at exactly the same LRs, as the
length in steps they convert to; epochs counted as the Hugging Face Trainer counts them."""

from __future__ import annotations

import bisect
import itertools
import math
import random
from typing import Any

import pytest
import torch

from tests.helpers import megatron_lrs, simulated_batches
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.durations import Batching, BatchRamp, hf_steps_per_epoch, parse_batch_schedule, parse_count
from trainer.errors import ConfigError
from trainer.schedules import SCHEDULES, build_schedule
from trainer.testing import run_distributed

REQUIRED: dict[str, dict[str, Any]] = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 20},
    "wsd_s": {"period_steps": [40, 40, 40], "num_decay_steps": 10},
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


# --- train.batch_schedule -------------------------------------------------------------------------------


def test_the_batch_ramp_follows_the_tokens_trained_on_step_by_step() -> None:
    rng = random.Random(15)
    for _ in range(200):
        micro, world, seq_len = rng.choice([1, 2, 4]), rng.choice([1, 2, 3]), rng.choice([16, 64, 100])
        batches = sorted(rng.sample(range(1, 9), rng.randint(1, 4)))
        starts = [0, *sorted(rng.sample(range(1, 20_000), len(batches) - 1))]
        stages = [(start, b * micro * world) for start, b in zip(starts, batches, strict=True)]
        text = " ".join(f"{start}:{b}" for start, b in stages)
        ramp = BatchRamp(parse_batch_schedule(text), seq_len, micro, world)
        expected = simulated_batches(stages, seq_len, 150)
        samples = list(itertools.accumulate(expected))
        assert [ramp.batch_of(k) for k in range(1, 151)] == expected, text
        assert [ramp.grad_accum(k) for k in range(1, 151)] == [b // (micro * world) for b in expected]
        assert [ramp.samples_after(k) for k in range(1, 151)] == samples, text
        assert [ramp.clock(k) for k in range(1, 151)] == samples
        for units in rng.sample(range(1, samples[-1]), 20):
            assert ramp.steps_until(units) == 1 + bisect.bisect_left(samples, units), (text, units)
        first_steps = [1] + [k + 1 for k in range(1, 150) if expected[k] != expected[k - 1]]
        assert [s.first_step for s in ramp.segments_until(150)] == first_steps, text


def test_the_batch_schedule_reads_megatrons_form_and_counts_in_samples() -> None:
    ramp = BatchRamp(parse_batch_schedule("0:8 2k:16 5k:32"), seq_len=64, micro_batch_size=4, world_size=2)
    assert [(s.first_step, s.samples_before, s.global_batch) for s in ramp.segments] == [
        (1, 0, 8),  # 4 steps of 512 tokens reach 2,048
        (5, 32, 16),  # 3 steps of 1,024 tokens reach 5,120
        (8, 80, 32),
    ]
    assert [ramp.grad_accum(k) for k in (4, 5, 7, 8, 100)] == [1, 2, 2, 4, 4]
    assert ramp.to_units(2.5e3, "tokens", "schedule.warmup_tokens") == 40  # whole samples, rounded up
    assert ramp.to_units(5, "steps", "schedule.warmup_steps") == 48
    assert ramp.run_steps(5120, "tokens", "train.max_tokens") == 7
    assert ramp.run_steps(5121, "tokens", "train.max_tokens") == 8


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0:8 2k:16 1k:32", "increasing tokens"),
        ("0:8 2k:16 2k:32", "increasing tokens"),
        ("1k:8 2k:16", "must start at 0 tokens"),
        ("0-8", "is not TOKENS:BATCH"),
        ("0:8.5", "whole number"),
        ("0:0", "whole number"),
        ("0:8 2X:16", "is not a count"),
        ("", "must start at 0 tokens"),
        ("0:8,2k:16", "separate the stages with spaces"),
        ("0:1e30", "must be a whole number of sequences from 1 to 2,147,483,647"),
    ],
)
def test_a_batch_schedule_that_is_not_one_is_refused_naming_the_key(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"train\.batch_schedule") as excinfo:
        parse_batch_schedule(text)
    assert needle in str(excinfo.value)


def test_a_batch_that_micro_batches_on_every_rank_cannot_make_is_refused() -> None:
    with pytest.raises(ConfigError) as excinfo:
        compose(["train.micro_batch_size=4", "train.batch_schedule=0:8 1M:12"]).schedule_for(2)
    assert "train.batch_schedule: a global batch of 12 is not a multiple of" in str(excinfo.value)
    assert "4 x 2 = 8" in str(excinfo.value)
    with pytest.raises(ConfigError, match=r"train\.grad_accum_steps"):
        compose(["train.grad_accum_steps=2", "train.batch_schedule=0:8 1M:16"])


RAMP = ["train.seq_len=64", "train.micro_batch_size=4", "train.batch_schedule=0:8 2k:16 5k:32 20k:64"]
RAMP_BATCHES = simulated_batches([(0, 8), (2000, 16), (5000, 32), (20000, 64)], 64, 60)
RAMP_SAMPLES = sum(RAMP_BATCHES)
WARMUP = math.ceil(3000 / 64)  # schedule.warmup_tokens=3k, in whole samples
DECAY = math.ceil(30_000 / 64)  # schedule.decay_tokens=30k


@pytest.mark.parametrize(
    ("overrides", "megatron"),
    [
        (["schedule=linear"], {"lr_decay_style": "linear"}),
        (["schedule=cosine"], {"lr_decay_style": "cosine"}),
        (
            ["schedule=cosine_with_min_lr", "schedule.min_lr_rate=0.1"],
            {"lr_decay_style": "cosine", "min_lr": 6e-5},
        ),
        (
            ["schedule=linear", "schedule.warmup_start_lr=1e-4"],
            {"lr_decay_style": "linear", "init_lr": 1e-4},
        ),
        *[
            (
                [
                    "schedule=warmup_stable_decay",
                    "schedule.decay_tokens=30k",
                    f"schedule.decay_type={ours}",
                    "schedule.warmup_type=linear",
                    "schedule.min_lr_ratio=0.05",
                ],
                {
                    "lr_decay_style": "WSD",
                    "lr_wsd_decay_style": theirs,
                    "wsd_decay_steps": DECAY,
                    "init_lr": 3e-5,
                    "min_lr": 3e-5,
                },
            )
            for ours, theirs in [("linear", "linear"), ("cosine", "cosine"), ("1-sqrt", "minus_sqrt")]
        ],
    ],
)
def test_with_a_batch_schedule_every_step_has_megatrons_sample_based_lr(
    overrides: list[str], megatron: dict[str, Any]
) -> None:
    cfg = compose([*RAMP, "train.max_steps=60", "optim.lr=6e-4", "schedule.warmup_tokens=3k", *overrides])
    schedule = cfg.schedule_for(2)
    reference = megatron_lrs(
        RAMP_BATCHES, 6e-4, lr_warmup_steps=WARMUP, lr_decay_steps=RAMP_SAMPLES, **megatron
    )
    ours = [schedule.lr(k) for k in range(1, 61)]
    assert len(set(RAMP_BATCHES)) == 4  # the run goes through every stage
    for step, (lr, expected) in enumerate(zip(ours, reference, strict=True), start=1):
        assert abs(lr - expected) <= 1e-12 * abs(expected), (step, lr, expected)
    assert ours[0] > 0  # step 1 trains past the warmup's first sample


def test_batch_lr_scaling_multiplies_by_the_batch_ratio() -> None:
    """sqrt: the LR times sqrt(batch / first batch), as OLMo-core's BatchSizeSchedulerCallback scales it."""
    common = [*RAMP, "train.max_steps=60", "schedule=cosine", "schedule.warmup_tokens=3k"]
    plain = compose(common).schedule_for(2)
    for scaling, factor in [("sqrt", math.sqrt), ("linear", lambda r: r)]:
        scaled = compose([*common, f"schedule.batch_lr_scaling={scaling}"]).schedule_for(2)
        for step in range(1, 61):
            ratio = RAMP_BATCHES[step - 1] / 8
            assert scaled.lr(step) == pytest.approx(plain.lr(step) * factor(ratio), rel=1e-12)
    with pytest.raises(ConfigError, match=r"schedule\.batch_lr_scaling=sqrt"):
        compose(["schedule.batch_lr_scaling=sqrt"])


def test_one_batch_stage_is_the_fixed_batch_in_samples() -> None:
    common = ["train.seq_len=64", "train.micro_batch_size=4", "train.max_steps=50", "schedule=cosine"]
    fixed = compose([*common, "train.grad_accum_steps=2", "schedule.warmup_steps=10"]).schedule_for(2)
    ramp = compose([*common, "train.batch_schedule=0:16", "schedule.warmup_samples=160"]).schedule_for(2)
    assert ramp.warmup_steps == fixed.warmup_steps == 10
    for step in range(1, 51):
        assert ramp.lr(step) == pytest.approx(fixed.lr(step), rel=1e-12)


def test_a_warmup_that_ends_inside_a_step_is_stated_exactly() -> None:
    """1.2k tokens of warmup are 19 samples: inside step 3 (samples 17..24) of 8 sequences a step."""
    schedule = compose([*RAMP, "train.max_steps=60", "schedule.warmup_tokens=1.2k"]).schedule_for(2)
    assert (schedule.warmup_units, schedule.warmup_steps) == (19, 3)
    assert schedule.lr(1) == pytest.approx(6e-4 * 8 / 19, rel=1e-12)


def test_a_length_past_any_real_run_is_refused_before_anything_is_built() -> None:
    with pytest.raises(
        ConfigError, match=r"train\.max_tokens=1e\+30 is .* optimizer steps, more than ramp's limit"
    ):
        compose(["train.max_tokens=1e30"])
    with pytest.raises(ConfigError, match=r"more than the 100 training samples"):
        BatchRamp(parse_batch_schedule("0:8 1k:128"), 64, 4, 2, samples_per_epoch=100)
