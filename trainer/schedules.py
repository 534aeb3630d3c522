"""Learning-rate schedules as pure functions of the global step.

Convention: optimizer step ``k`` (the global step, 1-based) trains at ``optim.lr * f(k)``, where
``f(k)`` is what the transformers scheduler of the same name reports after ``k`` calls to
``scheduler.step()``. So step 1 already trains above 0 during warmup. A plain PyTorch loop that calls
``optimizer.step(); scheduler.step()`` trains step ``k`` at ``f(k - 1)``, so its first step runs at
LR 0; ramp's curve is that curve moved one step earlier.

Past ``max_steps`` every schedule holds its value at ``max_steps`` (a cosine never rises again).
The formulas below repeat transformers' arithmetic operation for operation, so the values agree
to the last bit; tests compare them at every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from trainer.config import (
    ConfigError,
    CosineSchedule,
    CosineWarmupWithMinLRSchedule,
    CosineWithMinLRSchedule,
    CosineWithRestartsSchedule,
    InverseSqrtSchedule,
    PolynomialSchedule,
    ScheduleConfig,
    WarmupStableDecaySchedule,
)

Multiplier = Callable[[int], float]


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: ``lr(step)`` is the LR that optimizer step ``step`` trains at."""

    name: str
    max_steps: int
    peak_lr: float
    warmup_steps: int
    multiplier_fn: Multiplier

    def multiplier(self, step: int) -> float:
        if step < 1:
            raise ValueError(f"the global step is 1-based; got {step}")
        return float(self.multiplier_fn(min(step, self.max_steps)))

    def lr(self, step: int) -> float:
        return self.peak_lr * self.multiplier(step)


def _warmup(step: int, warmup_steps: int) -> float:
    return float(step) / float(max(1, warmup_steps))


def constant(step: int) -> float:
    return 1.0


def constant_with_warmup(step: int, *, warmup_steps: int) -> float:
    if step < warmup_steps:
        return float(step) / float(max(1.0, warmup_steps))
    return 1.0


def linear(step: int, *, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, float(max_steps - step) / float(max(1, max_steps - warmup_steps)))


def cosine(
    step: int, *, warmup_steps: int, max_steps: int, num_cycles: float, min_lr_rate: float = 0.0
) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, max_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    if min_lr_rate:
        factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0.0, factor)


def cosine_with_restarts(step: int, *, warmup_steps: int, max_steps: int, num_cycles: int) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, max_steps - warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def polynomial(
    step: int, *, warmup_steps: int, max_steps: int, lr_end: float, power: float, lr_init: float
) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    if step > max_steps:
        return lr_end / lr_init
    lr_range = lr_init - lr_end
    decay_steps = max_steps - warmup_steps
    pct_remaining = 1 - (step - warmup_steps) / decay_steps
    return (lr_range * pct_remaining**power + lr_end) / lr_init


def inverse_sqrt(step: int, *, warmup_steps: int, timescale: int) -> float:
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    shift = timescale - warmup_steps
    return 1.0 / math.sqrt((step + shift) / timescale)


def cosine_warmup_with_min_lr(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    num_cycles: float,
    min_lr_rate: float,
    warmup_lr_rate: float | None,
) -> float:
    current, warmup, total = float(step), float(warmup_steps), float(max_steps)
    if current < warmup:
        if warmup_lr_rate is None:
            return (current + 1.0) / max(1.0, warmup)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * current / max(1, warmup - 1)
    progress = (current - warmup + 1.0) / max(1.0, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _shape(kind: str, progress: float, num_cycles: float, rising: bool) -> float:
    if kind == "linear":
        return progress if rising else 1.0 - progress
    if kind == "cosine":
        if rising:
            return 0.5 * (1.0 - math.cos(math.pi * progress))
        return 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    # 1-sqrt
    return 1.0 - math.sqrt(1.0 - progress) if rising else 1.0 - math.sqrt(progress)


def warmup_stable_decay(
    step: int,
    *,
    warmup_steps: int,
    stable_steps: int,
    decay_steps: int,
    warmup_type: str,
    decay_type: str,
    min_lr_ratio: float,
    num_cycles: float,
) -> float:
    if step < warmup_steps:
        progress = float(step) / float(max(1, warmup_steps))
        factor = _shape(warmup_type, progress, num_cycles, rising=True)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup_steps + stable_steps:
        return 1.0
    if step < warmup_steps + stable_steps + decay_steps:
        progress = float(step - warmup_steps - stable_steps) / float(max(1, decay_steps))
        factor = _shape(decay_type, progress, num_cycles, rising=False)
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve_warmup(cfg: ScheduleConfig, max_steps: int) -> int:
    """warmup_steps wins over warmup_ratio when both are set (as in transformers' TrainingArguments)."""
    if cfg.warmup_steps is not None:
        _check(cfg.warmup_steps >= 0, f"schedule.warmup_steps={cfg.warmup_steps} must be >= 0")
        warmup = cfg.warmup_steps
    elif cfg.warmup_ratio is not None:
        _check(
            0.0 <= cfg.warmup_ratio <= 1.0,
            f"schedule.warmup_ratio={cfg.warmup_ratio} must be in [0, 1] (a fraction of train.max_steps)",
        )
        warmup = math.ceil(cfg.warmup_ratio * max_steps)
    else:
        warmup = 0
    _check(
        warmup <= max_steps,
        f"schedule.warmup_steps={warmup} exceeds train.max_steps={max_steps}; "
        "lower it or use schedule.warmup_ratio",
    )
    return warmup


def _min_lr_rate(cfg: CosineWithMinLRSchedule, peak_lr: float) -> float:
    """An absolute schedule.min_lr wins over schedule.min_lr_rate, as steps win over ratios."""
    if cfg.min_lr is not None:
        _check(
            0.0 <= cfg.min_lr <= peak_lr,
            f"schedule.min_lr={cfg.min_lr} must be in [0, optim.lr={peak_lr}]",
        )
        return cfg.min_lr / peak_lr
    _check(
        cfg.min_lr_rate is not None,
        "set schedule.min_lr (absolute) or schedule.min_lr_rate (a fraction of optim.lr)",
    )
    assert cfg.min_lr_rate is not None
    _check(0.0 <= cfg.min_lr_rate <= 1.0, f"schedule.min_lr_rate={cfg.min_lr_rate} must be in [0, 1]")
    return cfg.min_lr_rate


def _wsd(cfg: WarmupStableDecaySchedule, warmup: int, max_steps: int) -> Multiplier:
    for key in ("warmup_type", "decay_type"):
        value = getattr(cfg, key)
        _check(
            value in ("linear", "cosine", "1-sqrt"),
            f"schedule.{key}={value} must be linear, cosine or 1-sqrt",
        )
    _check(0.0 <= cfg.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={cfg.min_lr_ratio} must be in [0, 1]")
    _check(cfg.num_cycles > 0, f"schedule.num_cycles={cfg.num_cycles} must be > 0")
    if cfg.num_decay_steps is not None:
        _check(cfg.num_decay_steps >= 0, f"schedule.num_decay_steps={cfg.num_decay_steps} must be >= 0")
        decay = cfg.num_decay_steps
    else:
        _check(
            cfg.decay_ratio is not None,
            "warmup_stable_decay needs schedule.num_decay_steps or schedule.decay_ratio",
        )
        assert cfg.decay_ratio is not None
        _check(0.0 <= cfg.decay_ratio <= 1.0, f"schedule.decay_ratio={cfg.decay_ratio} must be in [0, 1]")
        decay = math.ceil(cfg.decay_ratio * max_steps)
    stable = max_steps - warmup - decay if cfg.num_stable_steps is None else cfg.num_stable_steps
    _check(
        stable >= 0 and warmup + stable + decay <= max_steps,
        f"schedule: warmup ({warmup}) + stable ({stable}) + decay ({decay}) steps do not fit in "
        f"train.max_steps={max_steps}; shorten schedule.num_stable_steps, schedule.num_decay_steps / "
        "schedule.decay_ratio or the warmup",
    )
    return partial(
        warmup_stable_decay,
        warmup_steps=warmup,
        stable_steps=stable,
        decay_steps=decay,
        warmup_type=cfg.warmup_type,
        decay_type=cfg.decay_type,
        min_lr_ratio=cfg.min_lr_ratio,
        num_cycles=cfg.num_cycles,
    )


def _multiplier(cfg: ScheduleConfig, warmup: int, max_steps: int, peak_lr: float) -> Multiplier:
    name = cfg.name
    if name == "constant":
        _check(
            warmup == 0,
            f"schedule.warmup_steps={warmup}: schedule=constant has no warmup; use schedule=constant_with_warmup",
        )
        return constant
    if name == "constant_with_warmup":
        return partial(constant_with_warmup, warmup_steps=warmup)
    if name == "linear":
        return partial(linear, warmup_steps=warmup, max_steps=max_steps)
    if isinstance(cfg, CosineWarmupWithMinLRSchedule):
        _check(cfg.num_cycles > 0, f"schedule.num_cycles={cfg.num_cycles} must be > 0")
        _check(
            cfg.warmup_lr_rate is None or 0.0 <= cfg.warmup_lr_rate <= 1.0,
            f"schedule.warmup_lr_rate={cfg.warmup_lr_rate} must be in [0, 1]",
        )
        return partial(
            cosine_warmup_with_min_lr,
            warmup_steps=warmup,
            max_steps=max_steps,
            num_cycles=cfg.num_cycles,
            min_lr_rate=_min_lr_rate(cfg, peak_lr),
            warmup_lr_rate=cfg.warmup_lr_rate,
        )
    if isinstance(cfg, CosineWithMinLRSchedule):
        _check(cfg.num_cycles > 0, f"schedule.num_cycles={cfg.num_cycles} must be > 0")
        return partial(
            cosine,
            warmup_steps=warmup,
            max_steps=max_steps,
            num_cycles=cfg.num_cycles,
            min_lr_rate=_min_lr_rate(cfg, peak_lr),
        )
    if isinstance(cfg, CosineSchedule):
        _check(cfg.num_cycles > 0, f"schedule.num_cycles={cfg.num_cycles} must be > 0")
        return partial(cosine, warmup_steps=warmup, max_steps=max_steps, num_cycles=cfg.num_cycles)
    if isinstance(cfg, CosineWithRestartsSchedule):
        _check(cfg.num_cycles >= 1, f"schedule.num_cycles={cfg.num_cycles} must be at least 1")
        return partial(
            cosine_with_restarts, warmup_steps=warmup, max_steps=max_steps, num_cycles=cfg.num_cycles
        )
    if isinstance(cfg, PolynomialSchedule):
        _check(cfg.power > 0, f"schedule.power={cfg.power} must be > 0")
        _check(
            0.0 <= cfg.lr_end < peak_lr,
            f"schedule.lr_end={cfg.lr_end} must be >= 0 and below optim.lr={peak_lr}",
        )
        _check(
            warmup < max_steps,
            f"schedule=polynomial needs a decay: schedule.warmup_steps={warmup} must be below "
            f"train.max_steps={max_steps}",
        )
        return partial(
            polynomial,
            warmup_steps=warmup,
            max_steps=max_steps,
            lr_end=cfg.lr_end,
            power=cfg.power,
            lr_init=peak_lr,
        )
    if isinstance(cfg, InverseSqrtSchedule):
        timescale = cfg.timescale if cfg.timescale is not None else (warmup or 10_000)
        _check(timescale >= 1, f"schedule.timescale={cfg.timescale} must be at least 1")
        return partial(inverse_sqrt, warmup_steps=warmup, timescale=timescale)
    if isinstance(cfg, WarmupStableDecaySchedule):
        return _wsd(cfg, warmup, max_steps)
    raise ConfigError(f"schedule={name} is unknown; pick one of the files in conf/schedule/")


def build_schedule(cfg: ScheduleConfig, *, max_steps: int, peak_lr: float) -> Schedule:
    """Resolve a schedule config for a run of ``max_steps`` optimizer steps peaking at ``peak_lr``."""
    _check(max_steps >= 1, f"train.max_steps={max_steps} must be at least 1")
    _check(peak_lr > 0, f"optim.lr={peak_lr} must be > 0")
    warmup = resolve_warmup(cfg, max_steps)
    fn = _multiplier(cfg, warmup, max_steps, peak_lr)
    return Schedule(
        name=cfg.name, max_steps=max_steps, peak_lr=peak_lr, warmup_steps=warmup, multiplier_fn=fn
    )
