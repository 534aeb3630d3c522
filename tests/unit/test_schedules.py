"""ramp's LR schedules against transformers' schedulers of the same name.

The contract: optimizer step ``k`` (1-based) trains at ``optim.lr * f(k)``, where ``f(k)`` is what the
transformers scheduler reports after ``k`` calls to ``scheduler.step()``. Past ``max_steps`` the value at
``max_steps`` holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from _pytest.mark.structures import ParameterSet

from trainer.errors import ConfigError
from trainer.schedules import SCHEDULES, Schedule, build_schedule

OTHER_REFERENCE = {"wsd_s": "test_wsd_s_is_olmo_cores_wsds_at_every_step"}
"""Schedules transformers does not have, and the test (tests/unit/test_branches.py) that checks each
against its reference instead."""
TRANSFORMERS_SCHEDULES = sorted(set(SCHEDULES) - set(OTHER_REFERENCE))

PEAK_LR = 6e-4
REL_TOL = 1e-12
ABS_TOL_AT_ZERO = 1e-18


def make_schedule(name: str, max_steps: int, peak_lr: float = PEAK_LR, **keys: Any) -> Schedule:
    """ramp's schedule for the config dataclass registered under ``name``, built with ``keys``."""
    return build_schedule(SCHEDULES[name](**keys), max_steps=max_steps, peak_lr=peak_lr)


def transformers_lrs(
    name: str, max_steps: int, warmup: int, peak_lr: float = PEAK_LR, **kwargs: Any
) -> list[float]:
    """transformers' LR after k calls to ``scheduler.step()``, for k = 0..max_steps (index k)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=peak_lr)
    # With an explicit stable phase, transformers' wsd warns if num_training_steps is given too.
    explicit_stable = name == "warmup_stable_decay" and kwargs.get("num_stable_steps") is not None
    scheduler = transformers.get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=None if explicit_stable else max_steps,
        scheduler_specific_kwargs=kwargs,
    )
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(max_steps):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def plain_loop_lrs(name: str, max_steps: int, warmup: int, **kwargs: Any) -> list[float]:
    """The LR each step of a plain ``optimizer.step(); scheduler.step()`` loop trains at.

    Index k holds step k (index 0 is unused), read from the optimizer when it steps.
    """
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4))
    optimizer = torch.optim.AdamW([param], lr=PEAK_LR)
    scheduler = transformers.get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=kwargs,
    )
    trained_at = [math.nan]
    for _ in range(max_steps):
        loss = (param**2).sum()
        loss.backward()
        trained_at.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return trained_at


def same_lr(got: float, expected: float) -> bool:
    if expected == 0:
        return abs(got) < ABS_TOL_AT_ZERO
    return abs(got - expected) / abs(expected) < REL_TOL


def mismatches(schedule: Schedule, expected: list[float]) -> list[tuple[int, float, float]]:
    """(step, ramp, transformers) for every step 1..max_steps where the two disagree."""
    return [
        (step, schedule.lr(step), expected[step])
        for step in range(1, schedule.max_steps + 1)
        if not same_lr(schedule.lr(step), expected[step])
    ]


def case(name: str, max_steps: int, warmup: int, **keys: Any) -> ParameterSet:
    label = "-".join([name, f"N{max_steps}", f"w{warmup}", *(f"{k}={v}" for k, v in keys.items())])
    return pytest.param(name, max_steps, warmup, keys, id=label)


WSD_TYPES = ("linear", "cosine", "1-sqrt")

# (name, max_steps, warmup, the schedule's own keys). The keys go unchanged to both ramp's config and
# transformers' scheduler_specific_kwargs; keys left out test that both use the same defaults.
CASES = [
    case("constant", 100, 0),
    case("constant", 1, 0),
    *(
        case(name, max_steps, warmup)
        for name in ("constant_with_warmup", "linear")
        for max_steps, warmup in ((100, 0), (100, 1), (100, 10), (100, 100), (1, 0), (1, 1), (37, 7))
    ),
    case("cosine", 100, 0),
    case("cosine", 100, 10),
    case("cosine", 100, 100),
    case("cosine", 1, 0),
    case("cosine", 1, 1),
    *(case("cosine", 100, 10, num_cycles=c) for c in (0.25, 0.5, 1.0, 1.5, 3.0)),
    case("cosine", 37, 7, num_cycles=0.75),
    case("cosine_with_restarts", 100, 0),
    *(case("cosine_with_restarts", 100, 10, num_cycles=c) for c in (1, 2, 3, 5)),
    case("cosine_with_restarts", 100, 100, num_cycles=2),
    case("cosine_with_restarts", 1, 0),
    case("cosine_with_restarts", 1, 1, num_cycles=3),
    case("cosine_with_restarts", 37, 7, num_cycles=4),
    case("polynomial", 100, 0),
    case("polynomial", 100, 10),
    case("polynomial", 100, 10, power=2.0, lr_end=1e-5),
    case("polynomial", 100, 10, power=0.5, lr_end=0.0),
    case("polynomial", 37, 7, power=3.0, lr_end=6e-5),
    case("polynomial", 1, 0, power=2.0, lr_end=1e-5),
    case("inverse_sqrt", 100, 0),
    case("inverse_sqrt", 100, 10),
    case("inverse_sqrt", 100, 100),
    case("inverse_sqrt", 100, 0, timescale=7),
    case("inverse_sqrt", 100, 10, timescale=25),
    case("inverse_sqrt", 1, 0),
    case("inverse_sqrt", 1, 1),
    case("cosine_with_min_lr", 100, 10, min_lr_rate=0.1),
    case("cosine_with_min_lr", 100, 10, min_lr=6e-5),
    case("cosine_with_min_lr", 100, 0, min_lr_rate=0.0),
    case("cosine_with_min_lr", 100, 100, min_lr_rate=0.1),
    case("cosine_with_min_lr", 100, 10, num_cycles=1.0, min_lr_rate=0.2),
    case("cosine_with_min_lr", 1, 0, min_lr=1e-5),
    case("cosine_with_min_lr", 1, 1, min_lr_rate=0.1),
    case("cosine_warmup_with_min_lr", 100, 10, min_lr_rate=0.1),
    case("cosine_warmup_with_min_lr", 100, 10, min_lr_rate=0.1, warmup_lr_rate=0.05),
    case("cosine_warmup_with_min_lr", 100, 10, min_lr=1e-5, warmup_lr_rate=0.0),
    case("cosine_warmup_with_min_lr", 100, 0, min_lr_rate=0.1),
    case("cosine_warmup_with_min_lr", 100, 1, min_lr_rate=0.1, warmup_lr_rate=0.5),
    case("cosine_warmup_with_min_lr", 100, 100, min_lr_rate=0.1),
    case("cosine_warmup_with_min_lr", 100, 100, min_lr_rate=0.1, warmup_lr_rate=0.2),
    case("cosine_warmup_with_min_lr", 100, 10, num_cycles=1.5, min_lr_rate=0.3),
    case("cosine_warmup_with_min_lr", 1, 0, min_lr_rate=0.1),
    case("cosine_warmup_with_min_lr", 1, 1, min_lr_rate=0.1, warmup_lr_rate=0.5),
    *(
        case(
            "warmup_stable_decay", 100, 10, num_decay_steps=20, warmup_type=w, decay_type=d, min_lr_ratio=0.1
        )
        for w in WSD_TYPES
        for d in WSD_TYPES
    ),
    case("warmup_stable_decay", 100, 0, num_decay_steps=30),
    case("warmup_stable_decay", 100, 100, num_decay_steps=0),
    case("warmup_stable_decay", 100, 10, num_decay_steps=20, num_stable_steps=70),
    case("warmup_stable_decay", 100, 10, num_decay_steps=20, num_stable_steps=50, min_lr_ratio=0.2),
    case("warmup_stable_decay", 100, 10, num_decay_steps=90, decay_type="cosine", num_cycles=1.0),
    case("warmup_stable_decay", 1, 0, num_decay_steps=1),
    case("warmup_stable_decay", 1, 1, num_decay_steps=0, min_lr_ratio=0.1),
]


def test_cases_cover_every_schedule() -> None:
    assert {param.values[0] for param in CASES} == set(TRANSFORMERS_SCHEDULES)
    for name in TRANSFORMERS_SCHEDULES:
        assert transformers.SchedulerType(name).value == name
    others = (Path(__file__).parent / "test_branches.py").read_text()
    assert all(f"def {test}(" in others for test in OTHER_REFERENCE.values())


@pytest.mark.parametrize(("name", "max_steps", "warmup", "keys"), CASES)
def test_matches_transformers_at_every_step(
    name: str, max_steps: int, warmup: int, keys: dict[str, Any]
) -> None:
    schedule = make_schedule(name, max_steps, warmup_steps=warmup, **keys)
    assert schedule.warmup_steps == warmup
    assert schedule.max_steps == max_steps
    expected = transformers_lrs(name, max_steps, warmup, **keys)
    assert not mismatches(schedule, expected), "(step, ramp, transformers)"


def test_the_peak_lr_scales_the_curve_and_polynomial_ends_at_its_absolute_lr_end() -> None:
    schedule = make_schedule("polynomial", 50, peak_lr=3e-3, warmup_steps=5, power=2.0, lr_end=1e-4)
    expected = transformers_lrs("polynomial", 50, 5, peak_lr=3e-3, power=2.0, lr_end=1e-4)
    assert not mismatches(schedule, expected), "(step, ramp, transformers)"
    assert schedule.lr(50) == pytest.approx(1e-4, rel=1e-12)  # absolute, whatever the peak


def test_polynomial_warmup_equal_to_max_steps_is_refused() -> None:
    # transformers divides by num_training_steps - num_warmup_steps at the last step.
    with pytest.raises(ZeroDivisionError):
        transformers_lrs("polynomial", 10, 10)
    with pytest.raises(ConfigError, match=r"schedule\.warmup_steps") as excinfo:
        make_schedule("polynomial", 10, warmup_steps=10)
    assert "the run's 10 steps" in str(excinfo.value)


# Schedules whose warmup rises linearly from 0 (wsd with its default linear warmup and no floor).
LINEAR_WARMUP = (
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
REQUIRED_KEYS: dict[str, dict[str, Any]] = {
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 20},
}


@pytest.mark.parametrize("warmup", [1, 2, 10, 80])
@pytest.mark.parametrize("name", LINEAR_WARMUP)
def test_first_step_trains_above_zero(name: str, warmup: int) -> None:
    keys = REQUIRED_KEYS.get(name, {})
    schedule = make_schedule(name, 100, warmup_steps=warmup, **keys)
    plain = plain_loop_lrs(name, 100, warmup, **keys)
    assert plain[1] == 0.0
    assert schedule.lr(1) > 0.0
    if warmup > 1:
        assert schedule.lr(1) == pytest.approx(PEAK_LR / warmup, rel=REL_TOL)


@pytest.mark.parametrize("name", TRANSFORMERS_SCHEDULES)
def test_curve_is_plain_loop_moved_one_step_earlier(name: str) -> None:
    warmup = 0 if name == "constant" else 10
    keys = REQUIRED_KEYS.get(name, {})
    schedule = make_schedule(name, 100, warmup_steps=warmup, **keys)
    plain = plain_loop_lrs(name, 100, warmup, **keys)
    assert all(same_lr(schedule.lr(step), plain[step + 1]) for step in range(1, 100))
    # ...and the curves do differ: without the shift, warmup steps would disagree.
    if warmup:
        assert schedule.lr(5) != pytest.approx(plain[5], rel=1e-3)


@pytest.mark.parametrize(
    ("name", "keys", "final_lr"),
    [
        pytest.param("cosine", {"num_cycles": 0.5}, 0.0, id="cosine"),
        pytest.param("cosine", {"num_cycles": 0.75}, PEAK_LR * 0.5, id="cosine-three-quarter-wave"),
        pytest.param("cosine_with_restarts", {"num_cycles": 3}, 0.0, id="cosine_with_restarts"),
        pytest.param("polynomial", {"power": 2.0, "lr_end": 1e-5}, 1e-5, id="polynomial"),
        pytest.param("linear", {}, 0.0, id="linear"),
        pytest.param(
            "warmup_stable_decay",
            {"num_decay_steps": 20, "min_lr_ratio": 0.1},
            PEAK_LR * 0.1,
            id="warmup_stable_decay",
        ),
        pytest.param("inverse_sqrt", {}, PEAK_LR / math.sqrt(10.0), id="inverse_sqrt"),
    ],
)
def test_holds_final_value_past_max_steps(name: str, keys: dict[str, Any], final_lr: float) -> None:
    max_steps = 100
    schedule = make_schedule(name, max_steps, warmup_steps=10, **keys)
    final = schedule.lr(max_steps)
    if final_lr == 0.0:
        assert abs(final) < ABS_TOL_AT_ZERO
    else:
        assert final == pytest.approx(final_lr, rel=1e-9)
    for step in (max_steps + 1, 2 * max_steps, 10 * max_steps):
        assert schedule.lr(step) == final
        assert schedule.multiplier(step) == schedule.multiplier(max_steps)


@pytest.mark.parametrize(
    ("ratio", "max_steps", "warmup"),
    [
        (0.1, 95, 10),
        (0.05, 300, 15),
        (0.1, 100, 10),
        (0.25, 10, 3),
        (0.01, 50, 1),
        (0.0, 100, 0),
        (1.0, 40, 40),
    ],
)
def test_warmup_ratio_rounds_up(ratio: float, max_steps: int, warmup: int) -> None:
    schedule = make_schedule("linear", max_steps, warmup_ratio=ratio)
    assert schedule.warmup_steps == warmup
    assert not mismatches(schedule, transformers_lrs("linear", max_steps, warmup))


@pytest.mark.parametrize("steps", [0, 7])
def test_warmup_steps_win_over_warmup_ratio(steps: int) -> None:
    schedule = make_schedule("cosine", 100, warmup_steps=steps, warmup_ratio=0.5)
    assert schedule.warmup_steps == steps
    assert not mismatches(schedule, transformers_lrs("cosine", 100, steps))


def test_no_warmup_keys_means_no_warmup() -> None:
    schedule = make_schedule("linear", 100)
    assert schedule.warmup_steps == 0
    assert schedule.lr(1) == pytest.approx(PEAK_LR * 99 / 100, rel=REL_TOL)


@pytest.mark.parametrize("name", ["cosine_with_min_lr", "cosine_warmup_with_min_lr"])
def test_min_lr_wins_over_min_lr_rate(name: str) -> None:
    schedule = make_schedule(name, 100, warmup_steps=10, min_lr=6e-5, min_lr_rate=0.5)
    assert not mismatches(schedule, transformers_lrs(name, 100, 10, min_lr=6e-5))
    # The floor is min_lr, not 0.5 * optim.lr (cosine_warmup_with_min_lr reaches it one step early).
    assert min(schedule.lr(step) for step in range(1, 101)) == pytest.approx(6e-5, rel=1e-9)


def test_num_decay_steps_win_over_decay_ratio() -> None:
    schedule = make_schedule("warmup_stable_decay", 100, warmup_steps=10, num_decay_steps=20, decay_ratio=0.5)
    assert not mismatches(schedule, transformers_lrs("warmup_stable_decay", 100, 10, num_decay_steps=20))
    assert schedule.lr(80) == PEAK_LR  # the last stable step; with decay_ratio=0.5 it would be decaying


def test_decay_ratio_rounds_up() -> None:
    # 0.15 * 95 = 14.25 -> 15 decay steps.
    schedule = make_schedule("warmup_stable_decay", 95, warmup_steps=5, decay_ratio=0.15, decay_type="1-sqrt")
    expected = transformers_lrs("warmup_stable_decay", 95, 5, num_decay_steps=15, decay_type="1-sqrt")
    assert not mismatches(schedule, expected)


def error_case(
    name: str, *needles: str, max_steps: int = 100, peak_lr: float = PEAK_LR, **keys: Any
) -> ParameterSet:
    label = "-".join([name, f"N{max_steps}", f"lr{peak_lr}", *(f"{k}={v}" for k, v in keys.items())])
    return pytest.param(name, max_steps, peak_lr, keys, needles, id=label)


@pytest.mark.parametrize(
    ("name", "max_steps", "peak_lr", "keys", "needles"),
    [
        error_case("linear", "schedule.warmup_steps", "the run's 100 steps", warmup_steps=101),
        error_case("cosine", "schedule.warmup_steps", "the run's 5 steps", max_steps=5, warmup_steps=6),
        error_case("linear", "schedule.warmup_steps", warmup_steps=-1),
        error_case("linear", "schedule.warmup_ratio", warmup_ratio=-0.1),
        error_case("linear", "schedule.warmup_ratio", warmup_ratio=1.5),
        error_case("linear", "optim.lr", peak_lr=0.0),
        error_case("cosine", "optim.lr", peak_lr=-1e-3),
        error_case("linear", "train.max_steps", max_steps=0),
        error_case("cosine", "train.max_steps", max_steps=-3),
        error_case("warmup_stable_decay", "schedule.num_decay_steps", warmup_steps=10, num_decay_steps=91),
        error_case("warmup_stable_decay", "schedule.decay_ratio", warmup_steps=10, decay_ratio=0.95),
        error_case(
            "warmup_stable_decay",
            "stable (71)",
            "the run's 100 steps",
            warmup_steps=10,
            num_decay_steps=20,
            num_stable_steps=71,
        ),
        error_case("warmup_stable_decay", "schedule.num_decay_steps", num_decay_steps=-1),
        error_case("warmup_stable_decay", "schedule.decay_ratio", decay_ratio=1.5),
        error_case("warmup_stable_decay", "schedule.decay_type", num_decay_steps=10, decay_type="exp"),
        error_case("warmup_stable_decay", "schedule.warmup_type", num_decay_steps=10, warmup_type="step"),
        error_case("warmup_stable_decay", "schedule.min_lr_ratio", num_decay_steps=10, min_lr_ratio=1.5),
        error_case("warmup_stable_decay", "schedule.num_decay_steps", "schedule.decay_ratio"),
        error_case("polynomial", "schedule.lr_end", lr_end=PEAK_LR),
        error_case("polynomial", "schedule.lr_end", lr_end=1e-3),
        error_case("polynomial", "schedule.lr_end", lr_end=-1e-7),
        error_case("polynomial", "schedule.power", power=0.0),
        error_case("constant", "schedule=constant", "constant_with_warmup", warmup_steps=5),
        error_case("constant", "schedule=constant", "constant_with_warmup", warmup_ratio=0.1),
        error_case("cosine", "schedule.num_cycles", num_cycles=0.0),
        error_case("cosine", "schedule.num_cycles", num_cycles=-0.5),
        error_case("cosine_with_restarts", "schedule.num_cycles", num_cycles=0),
        error_case("cosine_with_min_lr", "schedule.num_cycles", num_cycles=0.0, min_lr_rate=0.1),
        error_case("cosine_with_min_lr", "schedule.min_lr_rate", min_lr_rate=1.5),
        error_case("cosine_with_min_lr", "schedule.min_lr_rate", min_lr_rate=-0.1),
        error_case("cosine_warmup_with_min_lr", "schedule.min_lr_rate", min_lr_rate=1.5),
        error_case("cosine_with_min_lr", "schedule.min_lr", min_lr=1e-3),
        error_case("cosine_with_min_lr", "schedule.min_lr", "schedule.min_lr_rate"),
        error_case(
            "cosine_warmup_with_min_lr", "schedule.warmup_lr_rate", min_lr_rate=0.1, warmup_lr_rate=1.5
        ),
        error_case("inverse_sqrt", "schedule.timescale", timescale=0),
        error_case("inverse_sqrt", "schedule.timescale", warmup_steps=10, timescale=-5),
        pytest.param(
            "cosine_warmup_with_min_lr",
            100,
            PEAK_LR,
            {"num_cycles": 0.0, "min_lr_rate": 0.1},
            ("schedule.num_cycles",),
            id="cosine_warmup_with_min_lr-num_cycles=0.0",
        ),
        pytest.param(
            "warmup_stable_decay",
            100,
            PEAK_LR,
            {"num_decay_steps": 20, "decay_type": "cosine", "num_cycles": 0.0},
            ("schedule.num_cycles",),
            id="warmup_stable_decay-cosine-num_cycles=0.0",
        ),
    ],
)
def test_invalid_settings_name_the_key(
    name: str, max_steps: int, peak_lr: float, keys: dict[str, Any], needles: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        make_schedule(name, max_steps, peak_lr=peak_lr, **keys)
    for needle in needles:
        assert needle in str(excinfo.value)


@pytest.mark.parametrize("step", [0, -1])
def test_step_is_one_based(step: int) -> None:
    schedule = make_schedule("cosine", 100, warmup_steps=10)
    with pytest.raises(ValueError, match="1-based"):
        schedule.lr(step)
    with pytest.raises(ValueError, match="1-based"):
        schedule.multiplier(step)
