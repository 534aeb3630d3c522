"""Schedule branches: a decay off any step equals the warmup-stable-decay run that decays there, to the
last bit; train.stop_at; WSD-S against OLMo-core's formula."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

from trainer.config import compose
from trainer.durations import parse_length
from trainer.errors import ConfigError


def fake_checkpoint(tmp_path: Path, step: int) -> Path:
    """A folder whose meta.json says ``step``: all the schedule reads of a checkpoint."""
    folder = tmp_path / "parent" / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"step": step}))
    return folder


COMMON = ["train.seq_len=64", "train.micro_batch_size=4", "optim.lr=6e-4"]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("unit", ["steps", "tokens"])
def test_a_decay_branched_off_the_stable_stretch_is_the_wsd_decay_to_the_last_bit(
    shape: str, unit: str, tmp_path: Path
) -> None:
    """WSD over 100 steps, 10 of warmup, decaying over the last 30 (after step 70), against a constant
    run of the same warmup branched at its step 70 into a 30-step decay; 512 tokens a step on 2 ranks."""
    decay = {"steps": ["schedule.num_decay_steps=30"], "tokens": ["schedule.decay_tokens=15360"]}[unit]
    wsd = compose(
        [*COMMON, "schedule=warmup_stable_decay", "train.max_steps=100", "schedule.warmup_steps=10", *decay,
         f"schedule.decay_type={shape}", "schedule.warmup_type=linear", "schedule.min_lr_ratio=0"]
    ).schedule_for(2)  # fmt: skip
    parent = fake_checkpoint(tmp_path, 70)
    branch_decay = {"steps": "branch.decay_steps=30", "tokens": "branch.decay_tokens=15360"}[unit]
    branch = compose(
        [*COMMON, "schedule=constant_with_warmup", "train.max_steps=70", "schedule.warmup_steps=10",
         f"branch.checkpoint={parent}", branch_decay, f"branch.decay_type={shape}"]
    ).schedule_for(2)  # fmt: skip
    assert branch.max_steps == wsd.max_steps == 100
    assert branch.decay_start == wsd.decay_start == 70
    assert [branch.lr(k) for k in range(1, 101)] == [wsd.lr(k) for k in range(1, 101)]


def test_a_branch_decays_from_the_lr_in_effect_at_its_step(tmp_path: Path) -> None:
    """Off a cosine's step 40 of 100: the cosine up to 40, then from its LR there to the floor at 60."""
    base = compose(
        [*COMMON, "schedule=cosine", "train.max_steps=100", "schedule.warmup_steps=10"]
    ).schedule_for(1)
    parent = fake_checkpoint(tmp_path, 40)
    branch = compose(
        [*COMMON, "schedule=cosine", "train.max_steps=100", "schedule.warmup_steps=10",
         f"branch.checkpoint={parent}", "branch.decay_steps=20", "branch.decay_type=linear",
         "branch.min_lr_ratio=0.1"]
    ).schedule_for(1)  # fmt: skip
    assert branch.max_steps == 60
    assert [branch.lr(k) for k in range(1, 41)] == [base.lr(k) for k in range(1, 41)]
    start, floor = base.multiplier(40), 0.1
    for k in range(41, 61):
        expected = 6e-4 * ((1.0 - (k - 40) / 20) * (start - floor) + floor)
        assert branch.lr(k) == pytest.approx(expected, rel=1e-12)
    assert branch.lr(60) == pytest.approx(6e-5, rel=1e-12)


def hf_lambdas(name: str, total: int, **kwargs: object) -> list[float]:
    """transformers' LR multipliers of ``get_<name>_schedule_with_warmup`` (no warmup, ``total`` steps)
    after 0..total scheduler steps."""
    import torch
    import transformers

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=6e-4)
    scheduler = getattr(transformers, f"get_{name}_schedule_with_warmup")(
        optimizer, num_warmup_steps=0, num_training_steps=total, **kwargs
    )
    return [fn(k) for fn in scheduler.lr_lambdas for k in range(total + 1)]


@pytest.mark.parametrize(
    ("decay_type", "keys", "reference"),
    [
        ("polynomial", {"power": 2.0, "lr_end": 1e-6}, ("polynomial_decay", {"power": 2.0, "lr_end": 1e-6})),
        ("cosine_with_min_lr", {"min_lr_rate": 0.1}, ("cosine_with_min_lr", {"min_lr_rate": 0.1})),
        ("linear", {}, ("linear", {})),
        # No keys: the preset's (conf/schedule/<name>.yaml), as schedule=<name> would take them.
        ("cosine_with_restarts", {}, ("cosine_with_hard_restarts", {"num_cycles": 2})),
        ("cosine_with_min_lr", {}, ("cosine_with_min_lr", {"min_lr_rate": 0.1})),
        ("cosine", {}, ("cosine", {})),
    ],
)
def test_a_branch_decays_along_any_registered_schedule_as_transformers_computes_it(
    decay_type: str, keys: dict[str, float], reference: tuple[str, dict[str, float]], tmp_path: Path
) -> None:
    """Off a constant run's step 40 (LR 6e-4), a 30-step tail shaped as the registered schedule: each LR
    equals transformers' function of that name over 30 steps, at the steps since the branch."""
    parent = fake_checkpoint(tmp_path, 40)
    given = [f"+branch.decay_keys.{key}={value}" for key, value in keys.items()]
    branch = compose(
        [*COMMON, "schedule=constant_with_warmup", "train.max_steps=40", "schedule.warmup_steps=10",
         f"branch.checkpoint={parent}", "branch.decay_steps=30", f"branch.decay_type={decay_type}", *given]
    ).schedule_for(1)  # fmt: skip
    assert branch.max_steps == 70
    name, kwargs = reference
    expected = hf_lambdas(name, 30, **kwargs)
    for k in range(41, 71):
        assert branch.lr(k) == pytest.approx(6e-4 * expected[k - 40], rel=1e-12, abs=1e-18), k


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            [
                "branch.checkpoint=CKPT",
                "branch.decay_steps=5",
                "branch.decay_type=polynomial",
                "+branch.decay_keys.pwr=2",
            ],
            "branch.decay_keys.pwr is not a key of schedule polynomial; its keys: lr_end, power",
        ),
        (
            [
                "branch.checkpoint=CKPT",
                "branch.decay_steps=5",
                "branch.decay_type=polynomial",
                "+branch.decay_keys.lr_end=1",
            ],
            "branch.decay_type=polynomial: branch.decay_keys.lr_end=1",
        ),
        (
            [
                "branch.checkpoint=CKPT",
                "branch.decay_steps=5",
                "branch.decay_type=cosine",
                "+branch.decay_keys.power=2",
            ],
            "branch.decay_keys sets ['power'], but branch.decay_type=cosine takes none",
        ),
        (["branch.decay_steps=10"], "branch.decay_steps needs branch.checkpoint"),
        (["branch.checkpoint=CKPT"], "needs one decay length"),
        (
            ["branch.checkpoint=CKPT", "branch.decay_steps=5", "branch.decay_tokens=1M"],
            "got branch.decay_steps and",
        ),
        (
            ["branch.checkpoint=CKPT", "branch.decay_steps=5", "branch.decay_type=exp"],
            "branch.decay_type=exp must be linear, cosine, 1-sqrt or a registered schedule: constant, ",
        ),
        (
            ["branch.checkpoint=CKPT", "branch.decay_steps=5", "branch.min_lr_ratio=2"],
            "branch.min_lr_ratio=2",
        ),
        (["branch.checkpoint=NOWHERE", "branch.decay_steps=5"], "is not a ramp checkpoint"),
        (
            ["branch.checkpoint=CKPT", "branch.decay_steps=5", "train.max_steps=20"],
            "past the schedule's 20 steps",
        ),
        (
            ["branch.checkpoint=CKPT", "branch.decay_steps=5", "run.resume=CKPT"],
            "both name where the run starts",
        ),
    ],
)
def test_a_branch_that_cannot_be_is_refused_naming_the_key(
    overrides: list[str], needle: str, tmp_path: Path
) -> None:
    parent = fake_checkpoint(tmp_path, 30)
    overrides = [o.replace("CKPT", str(parent)).replace("NOWHERE", str(tmp_path)) for o in overrides]
    with pytest.raises(ConfigError) as excinfo:
        compose(overrides)
    assert needle in str(excinfo.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (500, (500.0, "steps")),
        ("500", (500.0, "steps")),
        ("500 steps", (500.0, "steps")),
        ("2B tokens", (2e9, "tokens")),
        ("2B_tokens", (2e9, "tokens")),
        ("2Btokens", (2e9, "tokens")),
        ("5k samples", (5e3, "samples")),
        ("0.5 epochs", (0.5, "epochs")),
        ("1 epoch", (1.0, "epochs")),
    ],
)
def test_stop_at_reads_a_count_and_its_unit(text: object, expected: tuple[float, str]) -> None:
    assert parse_length(text, "train.stop_at") == expected


def test_stop_at_is_the_first_step_that_reaches_it() -> None:
    cfg = compose([*COMMON, "train.max_steps=100", "train.stop_at=2k tokens"])  # 256 tokens a step on 1 rank
    assert cfg.stop_step(cfg.batching(1)) == 8
    assert cfg.lr_schedule.max_steps == 100  # the schedule keeps its length
    assert compose(["train.stop_at=40"]).stop_step(cfg.batching(1)) == 40
    for bad in ("2 weeks", "-3", "0"):
        with pytest.raises(ConfigError, match=r"train\.stop_at"):
            compose([f"train.stop_at={bad}"])


def olmo_wsds(
    initial_lr: float,
    current: int,
    *,
    period_lengths: list[int],
    warmup: int,
    decay: int,
    decay_min_lr: float,
) -> float:
    """Transcribed from ai2-olmo-core 3.0.0, olmo_core/optim/scheduler.py, ``WSDS.get_lr`` with
    ``_linear_warmup`` and ``_linear_decay`` (warmup_min_lr 0, no period_lr_multipliers). The package
    installs here with torch pinned, but it pins filelock<4 and, through cached-path, huggingface_hub 1.x:
    it would move the test environment's transformers and datasets off the versions ramp runs with, so
    its formula is copied here instead."""
    adjusted = [period_lengths[0] - warmup, *period_lengths[1:]]
    cum_end = list(itertools.accumulate(adjusted))
    if current < warmup:
        return 0.0 + (initial_lr - 0.0) * min(current, warmup) / warmup
    x = current - warmup
    if x >= cum_end[-1]:
        return decay_min_lr
    pidx = next((i for i, end in enumerate(cum_end) if x <= end), len(cum_end) - 1)
    start = 0 if pidx == 0 else cum_end[pidx - 1]
    length = adjusted[pidx]
    pos = min(max(x - start, 0), length)
    stable = length - decay
    if pos < stable:
        return initial_lr
    t = pos - stable
    return decay_min_lr + (initial_lr - decay_min_lr) * min(decay - t, decay) / decay


@pytest.mark.parametrize(
    ("periods", "warmup", "decay", "floor"),
    [([100, 100, 100], 10, 20, 0.0), ([50, 80, 30, 40], 5, 12, 0.1), ([64], 0, 16, 0.05)],
)
def test_wsd_s_is_olmo_cores_wsds_at_every_step(
    periods: list[int], warmup: int, decay: int, floor: float
) -> None:
    total = sum(periods) + 7  # past the last period the floor holds
    schedule = compose(
        ["schedule=wsd_s", f"schedule.period_steps={periods}", f"schedule.warmup_steps={warmup}",
         f"schedule.num_decay_steps={decay}", f"schedule.min_lr_ratio={floor}", f"train.max_steps={total}"]
    ).lr_schedule  # fmt: skip
    for step in range(1, total + 1):
        expected = olmo_wsds(
            6e-4, step, period_lengths=periods, warmup=warmup, decay=decay, decay_min_lr=floor * 6e-4
        )
        assert math.isclose(schedule.lr(step), expected, rel_tol=1e-12, abs_tol=1e-300), step


def test_wsd_s_periods_that_cannot_hold_their_decay_are_refused() -> None:
    for overrides, needle in [
        (
            ["schedule.period_steps=[10,100]", "schedule.warmup_steps=5", "schedule.num_decay_steps=8"],
            "period 1",
        ),
        (["schedule.period_steps=[100,5]", "schedule.num_decay_steps=8"], "period 2"),
        (["schedule.period_steps=[]"], "schedule.period_steps=[]"),
        (["schedule.period_steps=[200,200]", "train.max_steps=300"], "more than the run's length"),
    ]:
        with pytest.raises(ConfigError) as excinfo:
            compose(["schedule=wsd_s", *overrides])
        assert needle in str(excinfo.value), overrides


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (
            ["init.weights=CKPT", "branch.checkpoint=CKPT", "branch.decay_steps=3"],
            "branch.checkpoint and init.weights both",
        ),
        (["init.weights=CKPT", "run.resume=CKPT"], "init.weights and run.resume="),
        (["init.step=-1"], "init.step=-1 must be >= 0"),
        (["init.data=later"], "init.data=later must be fresh or continue"),
    ],
)
def test_a_start_from_weights_that_cannot_be_is_refused(
    overrides: list[str], needle: str, tmp_path: Path
) -> None:
    parent = fake_checkpoint(tmp_path, 30)
    with pytest.raises(ConfigError) as excinfo:
        compose([o.replace("CKPT", str(parent)) for o in overrides])
    assert needle in str(excinfo.value)


def test_a_floor_above_the_lr_at_the_branch_step_is_refused(tmp_path: Path) -> None:
    """Off a cosine's step 90 of 100 (about 2.4% of the peak), a floor of 0.5 would make the decay rise."""
    parent = fake_checkpoint(tmp_path, 90)
    with pytest.raises(ConfigError, match=r"branch\.min_lr_ratio=0\.5 is above the LR at the branch step 90"):
        compose(
            [*COMMON, "schedule=cosine", "train.max_steps=100", "schedule.warmup_steps=10",
             f"branch.checkpoint={parent}", "branch.decay_steps=5", "branch.min_lr_ratio=0.5"]
        ).schedule_for(1)  # fmt: skip
