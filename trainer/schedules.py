"""Learning-rate schedules: a registry of schedule classes, each next to the pure function it computes.

Convention: optimizer step ``k`` (the global step, 1-based) trains at ``optim.lr * f(k)``, where
``f(k)`` is what the transformers scheduler of the same name reports after ``k`` calls to
``scheduler.step()`` (``transformers.get_scheduler``, transformers 5.x). So step 1 already trains
above 0 during warmup. A plain PyTorch loop that calls ``optimizer.step(); scheduler.step()`` trains
step ``k`` at ``f(k - 1)``, so its first step runs at LR 0; ramp's curve is that curve moved one step
earlier.

The schedule's argument is its *clock* (:mod:`trainer.durations`): the global step with a fixed batch,
where a length in tokens, samples or epochs becomes whole steps and the run is exactly the run given
in steps; the samples trained on under ``train.batch_schedule``, where every length is counted in
samples and step ``k`` trains at ``f(samples after k)``, as Megatron-LM's sample-based
``OptimizerParamScheduler`` (megatron-core 0.16) does after ``k`` increments, so the curve runs on
through every batch change.

Past ``max_steps`` every schedule holds its value at ``max_steps`` (a cosine never rises again).
The formulas below repeat transformers' arithmetic operation for operation, so the values agree
to the last bit; tests compare them at every step.

Each schedule is one class: its name, its own keys (each documented where it is declared), their
checks and its multiplier. :func:`register` adds it to :data:`SCHEDULES`, from which the Hydra
schemas, the README's key table and the tests are all derived. Adding a schedule means adding one
class here and one YAML file under ``conf/schedule/``. This module imports neither torch nor any
other part of ramp but its errors, the key declaration and the durations.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, TypeVar

from trainer.durations import Clock, parse_count
from trainer.errors import ConfigError
from trainer.schema import MISSING, OnResume, setting

Multiplier = Callable[[int], float]
"""``f(step)``: the LR multiplier optimizer step ``step`` trains at, for steps 1..max_steps."""


@dataclass(frozen=True)
class Schedule:
    """A resolved schedule: ``lr(step)`` is the LR that optimizer step ``step`` trains at.

    With a fixed batch, ``f`` is evaluated at the global step; with a batch schedule, at the samples
    trained on after the step (``clock``), so the curve is continuous through every batch change.
    """

    name: str
    max_steps: int
    peak_lr: float
    warmup_steps: int
    """The first global step at or past the warmup's end (0 without warmup)."""
    decay_start: int
    """The last global step before the decay begins (the warmup's end, or a stable phase's)."""
    multiplier_fn: Multiplier
    """``f`` of the schedule's clock: the global step, or the samples trained on."""
    clock: Clock | None = None
    """What each step takes (:mod:`trainer.durations`); None: a fixed batch that is not known here."""
    batch_lr_scaling: str = "none"
    """With a batch schedule: none, or the LR times sqrt or the ratio of the step's batch to the first."""
    branch_step: int | None = None
    """With branch.*: the checkpoint's global step, after which the branch's decay replaces the schedule."""
    warmup_units: int | None = None
    """The warmup's length in the clock's unit, exactly (samples under a batch schedule, where a step may
    straddle its end); None: ``warmup_steps``."""
    decay_start_units: int | None = None
    """Where the decay begins in the clock's unit, exactly; None: ``decay_start``."""

    def multiplier(self, step: int) -> float:
        """``f`` after global step ``step`` (times the batch scaling), held at its value at ``max_steps``
        past the end.

        Raises:
            ValueError: ``step`` is below 1 (the global step is 1-based).
        """
        if step < 1:
            raise ValueError(f"the global step is 1-based; got {step}")
        step = min(step, self.max_steps)
        if self.clock is None:
            return float(self.multiplier_fn(step))
        value = float(self.multiplier_fn(self.clock.clock(step)))
        if self.batch_lr_scaling == "none":
            return value
        ratio = self.clock.batch_of(step) / self.clock.batch_of(1)
        return value * (math.sqrt(ratio) if self.batch_lr_scaling == "sqrt" else ratio)

    def lr(self, step: int) -> float:
        """The LR of optimizer step ``step``: ``peak_lr * multiplier(step)``.

        Raises:
            ValueError: ``step`` is below 1.
        """
        return self.peak_lr * self.multiplier(step)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class ScheduleConfig:
    """The keys every schedule takes; pick a schedule with ``schedule=<name>`` (``conf/schedule/``).

    Names, keys and formulas follow ``transformers.get_scheduler`` (``wsd_s``, which transformers lacks,
    follows OLMo-core's ``WSDS``). A count always wins over the
    matching ratio (``warmup_steps`` over ``warmup_ratio``), as in transformers' ``TrainingArguments``.
    """

    name: str = setting(MISSING, on_resume=OnResume.changes_math)
    """The schedule; pick it with schedule=<name>."""
    warmup_steps: int | None = setting(None, on_resume=OnResume.changes_math)
    """Linear warmup length in optimizer steps; wins over warmup_ratio when set."""
    warmup_ratio: float | None = setting(None, on_resume=OnResume.changes_math)
    """Warmup length as a fraction of train.max_steps, rounded up."""
    warmup_tokens: Any = setting(None, on_resume=OnResume.changes_math)
    """Warmup length in tokens (2e9, 2B, 500M), rounded up to whole steps."""
    warmup_samples: Any = setting(None, on_resume=OnResume.changes_math)
    """Warmup length in samples (sequences), rounded up to whole steps."""
    warmup_epochs: float | None = setting(None, on_resume=OnResume.changes_math)
    """Warmup length in epochs (passes over the training samples), rounded up to whole steps."""
    warmup_start_lr: float | None = setting(None, on_resume=OnResume.changes_math)
    """The LR warmup starts from (Megatron's lr_warmup_init); wins over warmup_start_ratio; default 0."""
    warmup_start_ratio: float | None = setting(None, on_resume=OnResume.changes_math)
    """The LR warmup starts from, as a fraction of optim.lr; default 0."""
    batch_lr_scaling: str = setting("none", on_resume=OnResume.changes_math)
    """With train.batch_schedule: none (as Megatron-LM), sqrt (the LR times sqrt(batch / first batch), as
    OLMo-core's batch-size scheduler) or linear (times batch / first batch)."""

    def decay_start(self, warmup: int, total: int, clock: Clock | None = None) -> int:
        """Where the decay begins, in the clock's unit: after the warmup (a stable phase's end for WSD)."""
        return warmup

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """This schedule's ``f`` for a run of ``max_steps``, its own keys checked. ``warmup_steps`` and
        ``max_steps`` are in the clock's unit: steps, or samples under a batch schedule (``clock.unit``).

        Raises:
            ConfigError: one of the schedule's keys is out of range, naming it and the fix.
            NotImplementedError: the base class; every registered schedule defines its own.
        """
        raise NotImplementedError(f"schedule {self.name} defines no multiplier")


Schema = TypeVar("Schema", bound=ScheduleConfig)

SCHEDULES: dict[str, type[ScheduleConfig]] = {}
"""Every schedule class by its name, in the order registered."""


def register(schema: type[Schema]) -> type[Schema]:
    """Add a schedule class to :data:`SCHEDULES` under its ``name`` (a class decorator)."""
    SCHEDULES[schema.name] = schema
    return schema


# Each schedule: its pure function, then its class. Each function repeats the arithmetic of the
# transformers 5.x function named in its docstring (transformers/optimization.py) to the last bit.


def _warmup(step: int, warmup_steps: int) -> float:
    return float(step) / float(max(1, warmup_steps))


def constant(step: int) -> float:
    """1 at every step (``get_constant_schedule``)."""
    return 1.0


@register
@dataclass
class ConstantSchedule(ScheduleConfig):
    """``optim.lr`` at every step; no warmup (use ``constant_with_warmup`` for one)."""

    name: str = setting("constant", on_resume=OnResume.changes_math)
    """Selected with schedule=constant."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`constant`; refuses a warmup."""
        _check(
            warmup_steps == 0,
            f"schedule.warmup_steps={warmup_steps}: schedule=constant has no warmup; "
            "use schedule=constant_with_warmup",
        )
        return constant


def constant_with_warmup(step: int, *, warmup_steps: int) -> float:
    """Linear warmup to 1, then 1 (``_get_constant_schedule_with_warmup_lr_lambda``)."""
    if step < warmup_steps:
        return float(step) / float(max(1.0, warmup_steps))
    return 1.0


@register
@dataclass
class ConstantWithWarmupSchedule(ScheduleConfig):
    """Linear warmup, then ``optim.lr``."""

    name: str = setting("constant_with_warmup", on_resume=OnResume.changes_math)
    """Selected with schedule=constant_with_warmup."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`constant_with_warmup`."""
        return partial(constant_with_warmup, warmup_steps=warmup_steps)


def linear(step: int, *, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup, then linear decay to 0 at ``max_steps`` (``_get_linear_schedule_with_warmup_lr_lambda``)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    return max(0.0, float(max_steps - step) / float(max(1, max_steps - warmup_steps)))


@register
@dataclass
class LinearSchedule(ScheduleConfig):
    """Linear warmup, then a linear decay to 0 at ``train.max_steps``."""

    name: str = setting("linear", on_resume=OnResume.changes_math)
    """Selected with schedule=linear."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`linear`."""
        return partial(linear, warmup_steps=warmup_steps, max_steps=max_steps)


def cosine(
    step: int, *, warmup_steps: int, max_steps: int, num_cycles: float, min_lr_rate: float = 0.0
) -> float:
    """Linear warmup, then ``num_cycles`` cosine waves over the decay, floored at ``min_lr_rate``.

    ``_get_cosine_schedule_with_warmup_lr_lambda`` (with ``min_lr_rate``: the one behind
    ``get_cosine_with_min_lr_schedule_with_warmup``).
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, max_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    if min_lr_rate:
        factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0.0, factor)


@register
@dataclass
class CosineSchedule(ScheduleConfig):
    """Linear warmup, then a cosine decay to 0 at ``train.max_steps``."""

    name: str = setting("cosine", on_resume=OnResume.changes_math)
    """Selected with schedule=cosine."""
    num_cycles: float = setting(0.5, on_resume=OnResume.changes_math)
    """Cosine waves over the decay; 0.5 is one half-wave from peak to 0."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`cosine`."""
        _check(self.num_cycles > 0, f"schedule.num_cycles={self.num_cycles} must be > 0")
        return partial(cosine, warmup_steps=warmup_steps, max_steps=max_steps, num_cycles=self.num_cycles)


def cosine_with_restarts(step: int, *, warmup_steps: int, max_steps: int, num_cycles: int) -> float:
    """Linear warmup, then ``num_cycles`` half-cosines from 1 to 0, each restarting at 1.

    ``_get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda``.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = float(step - warmup_steps) / float(max(1, max_steps - warmup_steps))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


@register
@dataclass
class CosineWithRestartsSchedule(ScheduleConfig):
    """Linear warmup, then hard restarts: the decay split into ``num_cycles`` half-cosines."""

    name: str = setting("cosine_with_restarts", on_resume=OnResume.changes_math)
    """Selected with schedule=cosine_with_restarts."""
    num_cycles: int = setting(1, on_resume=OnResume.changes_math)
    """Hard restarts: the decay is split into this many half-cosines."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`cosine_with_restarts`."""
        _check(self.num_cycles >= 1, f"schedule.num_cycles={self.num_cycles} must be at least 1")
        return partial(
            cosine_with_restarts, warmup_steps=warmup_steps, max_steps=max_steps, num_cycles=self.num_cycles
        )


def polynomial(
    step: int, *, warmup_steps: int, max_steps: int, lr_end: float, power: float, lr_init: float
) -> float:
    """Linear warmup, then ``(lr_init - lr_end) * remaining**power + lr_end``, over ``lr_init``.

    ``_get_polynomial_decay_schedule_with_warmup_lr_lambda``.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    if step > max_steps:
        return lr_end / lr_init
    lr_range = lr_init - lr_end
    decay_steps = max_steps - warmup_steps
    pct_remaining = 1 - (step - warmup_steps) / decay_steps
    return (lr_range * pct_remaining**power + lr_end) / lr_init


@register
@dataclass
class PolynomialSchedule(ScheduleConfig):
    """Linear warmup, then a polynomial decay to ``lr_end`` at ``train.max_steps``."""

    name: str = setting("polynomial", on_resume=OnResume.changes_math)
    """Selected with schedule=polynomial."""
    lr_end: float = setting(1e-7, on_resume=OnResume.changes_math)
    """Absolute LR reached at train.max_steps; must be below optim.lr."""
    power: float = setting(1.0, on_resume=OnResume.changes_math)
    """Exponent of the decay; 1.0 is linear."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`polynomial`; needs a decay of at least one step."""
        _check(self.power > 0, f"schedule.power={self.power} must be > 0")
        _check(
            0.0 <= self.lr_end < peak_lr,
            f"schedule.lr_end={self.lr_end} must be >= 0 and below optim.lr={peak_lr}",
        )
        _check(
            warmup_steps < max_steps,
            f"schedule=polynomial needs a decay: schedule.warmup_steps (or the warmup given: {warmup_steps} "
            f"{_unit(clock)}) must end before the run's {max_steps} {_unit(clock)}",
        )
        return partial(
            polynomial,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            lr_end=self.lr_end,
            power=self.power,
            lr_init=peak_lr,
        )


def inverse_sqrt(step: int, *, warmup_steps: int, timescale: int) -> float:
    """Linear warmup, then ``1 / sqrt((step + timescale - warmup) / timescale)``.

    ``_get_inverse_sqrt_schedule_lr_lambda``.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    shift = timescale - warmup_steps
    return 1.0 / math.sqrt((step + shift) / timescale)


@register
@dataclass
class InverseSqrtSchedule(ScheduleConfig):
    """Linear warmup, then a decay as one over the square root of the step."""

    name: str = setting("inverse_sqrt", on_resume=OnResume.changes_math)
    """Selected with schedule=inverse_sqrt."""
    timescale: int | None = setting(None, on_resume=OnResume.changes_math)
    """Steps over which the LR falls by sqrt(2) after warmup; default: the warmup, or 10000 without warmup."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`inverse_sqrt`."""
        _check(
            self.timescale is None or self.timescale >= 1,
            f"schedule.timescale={self.timescale} must be at least 1",
        )
        timescale = self.timescale if self.timescale is not None else (warmup_steps or 10_000)
        if clock is not None and (self.timescale is not None or not warmup_steps):
            timescale = clock.to_units(
                timescale, "steps", "schedule.timescale"
            )  # in samples with a batch schedule
        return partial(inverse_sqrt, warmup_steps=warmup_steps, timescale=timescale)


@register
@dataclass
class CosineWithMinLRSchedule(ScheduleConfig):
    """Linear warmup, then a cosine decay down to a floor."""

    name: str = setting("cosine_with_min_lr", on_resume=OnResume.changes_math)
    """Selected with schedule=cosine_with_min_lr."""
    num_cycles: float = setting(0.5, on_resume=OnResume.changes_math)
    """Cosine waves over the decay; 0.5 is one half-wave from peak to the floor."""
    min_lr: float | None = setting(None, on_resume=OnResume.changes_math)
    """Absolute floor of the cosine; wins over min_lr_rate when set."""
    min_lr_rate: float | None = setting(None, on_resume=OnResume.changes_math)
    """Floor as a fraction of optim.lr."""

    def min_rate(self, peak_lr: float) -> float:
        """The floor as a fraction of ``peak_lr``: ``min_lr`` wins over ``min_lr_rate``.

        Raises:
            ConfigError: neither is set, or the one set is out of range.
        """
        if self.min_lr is not None:
            _check(
                0.0 <= self.min_lr <= peak_lr,
                f"schedule.min_lr={self.min_lr} must be in [0, optim.lr={peak_lr}]",
            )
            return self.min_lr / peak_lr
        _check(
            self.min_lr_rate is not None,
            "set schedule.min_lr (absolute) or schedule.min_lr_rate (a fraction of optim.lr)",
        )
        assert self.min_lr_rate is not None
        _check(0.0 <= self.min_lr_rate <= 1.0, f"schedule.min_lr_rate={self.min_lr_rate} must be in [0, 1]")
        return self.min_lr_rate

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`cosine` with a floor."""
        _check(self.num_cycles > 0, f"schedule.num_cycles={self.num_cycles} must be > 0")
        return partial(
            cosine,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            num_cycles=self.num_cycles,
            min_lr_rate=self.min_rate(peak_lr),
        )


def cosine_warmup_with_min_lr(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    num_cycles: float,
    min_lr_rate: float,
    warmup_lr_rate: float | None,
) -> float:
    """Warmup from ``warmup_lr_rate`` (default ``1 / warmup_steps``), then a cosine down to ``min_lr_rate``.

    ``_get_cosine_with_min_lr_schedule_with_warmup_lr_rate_lambda``.
    """
    current, warmup, total = float(step), float(warmup_steps), float(max_steps)
    if current < warmup:
        if warmup_lr_rate is None:
            return (current + 1.0) / max(1.0, warmup)
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * current / max(1, warmup - 1)
    progress = (current - warmup + 1.0) / max(1.0, total - warmup)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


@register
@dataclass
class CosineWarmupWithMinLRSchedule(CosineWithMinLRSchedule):
    """A warmup that starts at ``warmup_lr_rate``, then a cosine decay down to a floor."""

    name: str = setting("cosine_warmup_with_min_lr", on_resume=OnResume.changes_math)
    """Selected with schedule=cosine_warmup_with_min_lr."""
    warmup_lr_rate: float | None = setting(None, on_resume=OnResume.changes_math)
    """First warmup step's LR as a fraction of optim.lr; default 1/warmup_steps."""

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`cosine_warmup_with_min_lr`."""
        _check(self.num_cycles > 0, f"schedule.num_cycles={self.num_cycles} must be > 0")
        _check(
            self.warmup_lr_rate is None or 0.0 <= self.warmup_lr_rate <= 1.0,
            f"schedule.warmup_lr_rate={self.warmup_lr_rate} must be in [0, 1]",
        )
        return partial(
            cosine_warmup_with_min_lr,
            warmup_steps=warmup_steps,
            max_steps=max_steps,
            num_cycles=self.num_cycles,
            min_lr_rate=self.min_rate(peak_lr),
            warmup_lr_rate=self.warmup_lr_rate,
        )


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
    """Warmup, a constant stretch, then a decay to ``min_lr_ratio`` (``_get_wsd_scheduler_lambda``).

    Shapes: ``linear``, ``cosine`` or ``1-sqrt`` (Hägele et al. 2024) for warmup and decay alike.
    """
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


SHAPES = ("linear", "cosine", "1-sqrt")


@register
@dataclass
class WarmupStableDecaySchedule(ScheduleConfig):
    """Warmup, a long constant stretch, then a decay (MiniCPM; Hägele et al. 2024)."""

    name: str = setting("warmup_stable_decay", on_resume=OnResume.changes_math)
    """Selected with schedule=warmup_stable_decay."""
    num_decay_steps: int | None = setting(None, on_resume=OnResume.changes_math)
    """Decay length in steps; wins over decay_ratio when set."""
    decay_ratio: float | None = setting(None, on_resume=OnResume.changes_math)
    """Decay length as a fraction of train.max_steps, rounded up."""
    decay_tokens: Any = setting(None, on_resume=OnResume.changes_math)
    """Decay length in tokens, rounded up to whole steps."""
    decay_samples: Any = setting(None, on_resume=OnResume.changes_math)
    """Decay length in samples, rounded up to whole steps."""
    decay_epochs: float | None = setting(None, on_resume=OnResume.changes_math)
    """Decay length in epochs, rounded up to whole steps."""
    num_stable_steps: int | None = setting(None, on_resume=OnResume.changes_math)
    """Constant stretch in steps; default: what warmup and decay leave of train.max_steps."""
    stable_tokens: Any = setting(None, on_resume=OnResume.changes_math)
    """Constant stretch in tokens, rounded up to whole steps."""
    stable_samples: Any = setting(None, on_resume=OnResume.changes_math)
    """Constant stretch in samples, rounded up to whole steps."""
    stable_epochs: float | None = setting(None, on_resume=OnResume.changes_math)
    """Constant stretch in epochs, rounded up to whole steps."""
    warmup_type: str = setting("linear", on_resume=OnResume.changes_math)
    """Shape of the warmup: linear, cosine or 1-sqrt."""
    decay_type: str = setting("cosine", on_resume=OnResume.changes_math)
    """Shape of the decay: linear, cosine or 1-sqrt."""
    min_lr_ratio: float = setting(0.0, on_resume=OnResume.changes_math)
    """Floor of warmup and decay as a fraction of optim.lr."""
    num_cycles: float = setting(0.5, on_resume=OnResume.changes_math)
    """Cosine waves of a cosine decay; 0.5 is one half-wave."""

    def decay_steps(self, max_steps: int, clock: Clock | None = None) -> int:
        """``num_decay_steps`` (or the decay in tokens, samples or epochs), else ``decay_ratio`` of
        ``max_steps`` rounded up.

        Raises:
            ConfigError: none is set, two are, or the one set is out of range.
        """
        counts = {"num_decay_steps": "steps", "decay_tokens": "tokens", "decay_samples": "samples"}
        given = length_of(self, {**counts, "decay_epochs": "epochs"}, clock)
        if given is not None:
            return given
        _check(
            self.decay_ratio is not None,
            "warmup_stable_decay needs schedule.num_decay_steps (or decay_tokens, decay_samples, decay_epochs) "
            "or schedule.decay_ratio",
        )
        assert self.decay_ratio is not None
        _check(0.0 <= self.decay_ratio <= 1.0, f"schedule.decay_ratio={self.decay_ratio} must be in [0, 1]")
        return math.ceil(self.decay_ratio * max_steps)

    def phases(self, warmup: int, total: int, clock: Clock | None = None) -> tuple[int, int]:
        """(stable, decay) lengths in the clock's unit; by default the stable phase is what warmup and
        decay leave of the run.

        Raises:
            ConfigError: warmup, stable and decay do not fit in the run, or a length out of range.
        """
        decay = self.decay_steps(total, clock)
        counts = {"num_stable_steps": "steps", "stable_tokens": "tokens", "stable_samples": "samples"}
        given = length_of(self, {**counts, "stable_epochs": "epochs"}, clock)
        stable = total - warmup - decay if given is None else given
        unit = "steps" if clock is None else clock.unit
        _check(
            stable >= 0 and warmup + stable + decay <= total,
            f"schedule: warmup ({warmup}) + stable ({stable}) + decay ({decay}) {unit} do not fit in the run's "
            f"{total} {unit}; shorten schedule.num_stable_steps, schedule.num_decay_steps / "
            "schedule.decay_ratio or the warmup",
        )
        return stable, decay

    def decay_start(self, warmup: int, total: int, clock: Clock | None = None) -> int:
        """After warmup and the stable phase."""
        return warmup + self.phases(warmup, total, clock)[0]

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`warmup_stable_decay`; warmup, stable and decay must fit in ``max_steps``."""
        for key in ("warmup_type", "decay_type"):
            value = getattr(self, key)
            _check(value in SHAPES, f"schedule.{key}={value} must be linear, cosine or 1-sqrt")
        _check(
            0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
        )
        _check(self.num_cycles > 0, f"schedule.num_cycles={self.num_cycles} must be > 0")
        stable, decay = self.phases(warmup_steps, max_steps, clock)
        return partial(
            warmup_stable_decay,
            warmup_steps=warmup_steps,
            stable_steps=stable,
            decay_steps=decay,
            warmup_type=self.warmup_type,
            decay_type=self.decay_type,
            min_lr_ratio=self.min_lr_ratio,
            num_cycles=self.num_cycles,
        )


def wsd_s(
    step: int,
    *,
    warmup_steps: int,
    period_ends: tuple[int, ...],
    decay_starts: tuple[int, ...],
    decay_type: str,
    min_lr_ratio: float,
) -> float:
    """Warmup, then periods that each hold the peak and end with a decay to ``min_lr_ratio``; training
    goes on at the peak after each decay (WSD-S, Wen et al. 2024, arXiv:2410.05192). OLMo-core's
    ``WSDS.get_lr`` (ai2-olmo-core 3.0.0, olmo_core/optim/scheduler.py) with its linear decay.

    ``period_ends[i]`` is period ``i``'s last step (its decay reaches the floor there); its decay
    starts after ``decay_starts[i]``. Past the last period the floor holds.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    if step >= period_ends[-1]:
        return min_lr_ratio
    index = bisect.bisect_left(period_ends, step)  # the first period whose end is at or after the step
    decay_start, end = decay_starts[index], period_ends[index]
    if step < decay_start:
        return 1.0
    progress = float(step - decay_start) / float(max(1, end - decay_start))
    factor = _shape(decay_type, progress, 0.5, rising=False)
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


@register
@dataclass
class WSDSSchedule(ScheduleConfig):
    """Periodic decays (WSD-S): after warmup, periods that each hold the peak and end with a decay; the
    decayed model at each period's end is a usable checkpoint, and training continues from it."""

    name: str = setting("wsd_s", on_resume=OnResume.changes_math)
    """Selected with schedule=wsd_s."""
    period_steps: list[int] = setting(factory=list, on_resume=OnResume.changes_math)
    """Each period's length in steps, the warmup inside the first (OLMo-core's period_lengths)."""
    num_decay_steps: int | None = setting(None, on_resume=OnResume.changes_math)
    """Each period's decay in steps; wins over decay_ratio."""
    decay_ratio: float | None = setting(None, on_resume=OnResume.changes_math)
    """Each period's decay as a fraction of it, rounded to the nearest step as OLMo-core's WSDS does."""
    decay_type: str = setting("linear", on_resume=OnResume.changes_math)
    """Shape of each decay: linear (OLMo-core's), cosine or 1-sqrt."""
    min_lr_ratio: float = setting(0.0, on_resume=OnResume.changes_math)
    """The floor each decay ends at, as a fraction of optim.lr."""

    def periods(self, warmup: int, clock: Clock | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(each period's end, each decay's start) in the clock's unit.

        Raises:
            ConfigError: no period, a period or decay out of range, or the warmup and the first decay
                longer than the first period.
        """
        _check(
            bool(self.period_steps) and all(int(p) >= 1 for p in self.period_steps),
            f"schedule.period_steps={list(self.period_steps)} must list each period's steps (each at least 1), "
            "e.g. schedule.period_steps=[1000,1000]",
        )
        _check(
            self.num_decay_steps is not None or self.decay_ratio is not None,
            "wsd_s needs schedule.num_decay_steps or schedule.decay_ratio (each period's decay)",
        )
        _check(
            self.decay_ratio is None or 0.0 <= self.decay_ratio <= 1.0,
            f"schedule.decay_ratio={self.decay_ratio} must be in [0, 1]",
        )
        to_units = (lambda step: step) if clock is None else clock.clock
        ends, starts, end = [], [], 0
        for index, length in enumerate(int(p) for p in self.period_steps):
            decay = (
                self.num_decay_steps
                if self.num_decay_steps is not None
                else round((self.decay_ratio or 0.0) * length)
            )
            begin = end + (warmup if index == 0 else 0)
            _check(
                decay >= 0 and begin + decay <= end + length,
                f"schedule: period {index + 1} of {length} steps cannot hold its decay of {decay} steps"
                + (f" after {warmup} warmup steps" if index == 0 and warmup else "")
                + "; lengthen it in schedule.period_steps or shorten the decay",
            )
            end += length
            ends.append(to_units(end))
            starts.append(to_units(end - decay))
        return tuple(ends), tuple(starts)

    def multiplier(
        self, warmup_steps: int, max_steps: int, peak_lr: float, clock: Clock | None = None
    ) -> Multiplier:
        """:func:`wsd_s`; the periods must fit in the run."""
        _check(
            self.decay_type in SHAPES,
            f"schedule.decay_type={self.decay_type} must be linear, cosine or 1-sqrt",
        )
        _check(
            0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
        )
        warmup = warmup_steps if clock is None else clock.steps_until(warmup_steps)
        ends, starts = self.periods(warmup, clock)
        _check(
            ends[-1] <= max_steps,
            f"schedule.period_steps sum to {sum(int(p) for p in self.period_steps)} steps, more than the run's "
            "length: lengthen the run or shorten the periods",
        )
        return partial(
            wsd_s,
            warmup_steps=warmup_steps,
            period_ends=ends,
            decay_starts=starts,
            decay_type=self.decay_type,
            min_lr_ratio=self.min_lr_ratio,
        )

    def decay_start(self, warmup: int, total: int, clock: Clock | None = None) -> int:
        """After the first period's stable stretch."""
        steps = warmup if clock is None else clock.steps_until(warmup)
        return self.periods(steps, clock)[1][0]


def shape_tail(units: int, *, decay_type: str, decay: int) -> float:
    """A WSD decay shape (linear, cosine, 1-sqrt) ``units`` into a decay of ``decay`` units: 1 down to 0."""
    progress = min(float(units) / float(max(1, decay)), 1.0)
    return _shape(decay_type, progress, 0.5, rising=False)


def schedule_tail(units: int, *, schedule: Multiplier, decay: int) -> float:
    """A registered schedule's multiplier (built without warmup over ``decay`` units) ``units`` into the
    decay; it stays at its last value past the decay's end."""
    return schedule(min(units, decay))


def branched(
    units: int,
    *,
    base: Multiplier,
    at: int,
    tail: Multiplier,
    min_lr_ratio: float,
) -> float:
    """``base`` up to the clock's ``at``, then ``tail`` (1 at the branch, 0 at the decay's end for a
    shape) scaled from ``base(at)`` down to ``min_lr_ratio``: ``tail * (base(at) - floor) + floor``, in
    :func:`warmup_stable_decay`'s arithmetic (so a branch off a constant stretch at 1.0 is that schedule's
    decay to the last bit)."""
    if units <= at:
        return base(units)
    start = base(at)
    factor = tail(units - at)
    return max(0.0, factor * (start - min_lr_ratio) + min_lr_ratio)


def decay_tail(decay_type: str, decay: int, keys: dict[str, Any], peak_lr: float) -> Multiplier:
    """The multiplier of a branch's decay, 1 at the branch: a WSD shape (linear, cosine, 1-sqrt), or any
    registered schedule by name, built with its own ``keys`` and no warmup over ``decay`` units (the
    schedule's own formula and source, e.g. ``polynomial`` after transformers'
    ``get_polynomial_decay_schedule_with_warmup``).

    Raises:
        ConfigError: a name that is neither a shape nor a registered schedule, keys the schedule lacks
            or refuses, or a shape given keys.
    """
    if decay_type in SHAPES:
        _check(
            not keys, f"branch.decay_keys sets {sorted(keys)}, but branch.decay_type={decay_type} takes none"
        )
        return partial(shape_tail, decay_type=decay_type, decay=decay)
    _check(
        decay_type in SCHEDULES,
        f"branch.decay_type={decay_type} must be linear, cosine, 1-sqrt or a registered schedule: "
        f"{', '.join(SCHEDULES)}",
    )
    cls = SCHEDULES[decay_type]
    known = {f.name for f in fields(cls)} - {f.name for f in fields(ScheduleConfig)}
    unknown = sorted(set(keys) - known)
    _check(
        not unknown,
        f"branch.decay_keys.{unknown[0] if unknown else ''} is not a key of schedule {decay_type}; its keys: "
        f"{', '.join(sorted(known)) or 'none'}",
    )
    try:
        schedule = cls(**keys).multiplier(0, decay, peak_lr)
    except ConfigError as err:
        raise ConfigError(
            f"branch.decay_type={decay_type}: {str(err).replace('schedule.', 'branch.decay_keys.')}"
        ) from None
    return partial(schedule_tail, schedule=schedule, decay=decay)


def branch_schedule(
    base: Schedule,
    *,
    at_step: int,
    decay: int,
    decay_type: str,
    min_lr_ratio: float,
    decay_keys: dict[str, Any] | None = None,
) -> Schedule:
    """``base`` through global step ``at_step`` (a checkpoint's), then a decay of ``decay`` clock units
    (steps, or samples under a batch schedule) from the LR in effect at ``at_step`` down to
    ``min_lr_ratio x peak``, shaped by :func:`decay_tail`; the run ends at the first step that completes
    the decay.

    Raises:
        ConfigError: ``at_step`` beyond ``base``'s run, a floor above the LR at ``at_step``, or a decay
            :func:`decay_tail` refuses.
    """
    tail = decay_tail(decay_type, decay, dict(decay_keys or {}), base.peak_lr)
    _check(
        at_step <= base.max_steps,
        f"branch.checkpoint is at step {at_step}, past the schedule's {base.max_steps} steps: give the "
        "parent run's length (train.max_steps, ...) so the schedule reaches the branch step",
    )
    clock = base.clock
    at = at_step if clock is None else clock.clock(at_step)
    end = at + decay if clock is None else clock.steps_until(at + decay)
    start = base.multiplier_fn(at)
    _check(
        min_lr_ratio <= start,
        f"branch.min_lr_ratio={min_lr_ratio:g} is above the LR at the branch step {at_step} ({start:.4g} x "
        f"optim.lr): the decay would rise; give a floor of at most {start:.4g}",
    )
    multiplier = partial(
        branched,
        base=base.multiplier_fn,
        at=at,
        tail=tail,
        min_lr_ratio=min_lr_ratio,
    )
    return replace(
        base,
        max_steps=max(end, at_step + 1),
        warmup_steps=min(base.warmup_steps, at_step),
        warmup_units=None if base.warmup_units is None else min(base.warmup_units, at),
        decay_start=at_step,
        decay_start_units=at,
        multiplier_fn=multiplier,
        branch_step=at_step,
    )


def given_length(cfg: object, keys: dict[str, str], clock: Clock | None) -> tuple[str, int] | None:
    """The one length among ``keys`` (key -> unit) that ``cfg`` sets, as (its key, its length in the
    clock's unit: steps, or samples under a batch schedule); None when none is set.

    Raises:
        ConfigError: two are set, one is not a count of 0 or more, or a unit other than steps without
            the batch to convert it with.
    """
    given = [(key, unit) for key, unit in keys.items() if getattr(cfg, key) is not None]
    if len(given) > 1:
        raise ConfigError(f"schedule.{given[0][0]} and schedule.{given[1][0]} are both set; keep one")
    if not given:
        return None
    key, unit = given[0]
    name, value = f"schedule.{key}", getattr(cfg, key)
    if unit == "steps":
        _check(value >= 0, f"{name}={value} must be >= 0")
        if clock is None:
            return name, int(value)
    _check(clock is not None, f"{name} needs the run's batch to be counted in steps")
    assert clock is not None
    return name, clock.to_units(parse_count(value, name), unit, name)


def length_of(cfg: object, keys: dict[str, str], clock: Clock | None) -> int | None:
    """:func:`given_length`'s length alone."""
    given = given_length(cfg, keys, clock)
    return None if given is None else given[1]


WARMUP_KEYS = {
    "warmup_steps": "steps",
    "warmup_tokens": "tokens",
    "warmup_samples": "samples",
    "warmup_epochs": "epochs",
}


def _unit(clock: Clock | None) -> str:
    return "steps" if clock is None else clock.unit


def resolve_warmup(
    cfg: ScheduleConfig, max_steps: int, clock: Clock | None = None, length_key: str = "train.max_steps"
) -> int:
    """Warmup length in the clock's unit: a count (in steps, tokens, samples or epochs) wins over
    ``warmup_ratio`` (a fraction of ``max_steps``, the run's length in that unit, rounded up), as
    ``warmup_steps`` does in ``TrainingArguments``. ``length_key`` names the key the run's length came
    from, for the message.

    Raises:
        ConfigError: two counts, a negative one, a ratio outside [0, 1], or a warmup longer than the run,
            naming the key.
    """
    given = given_length(cfg, WARMUP_KEYS, clock)
    if given is None and cfg.warmup_ratio is not None:
        _check(
            0.0 <= cfg.warmup_ratio <= 1.0,
            f"schedule.warmup_ratio={cfg.warmup_ratio} must be in [0, 1] (a fraction of the run)",
        )
        given = ("schedule.warmup_ratio", math.ceil(cfg.warmup_ratio * max_steps))
    if given is None:
        return 0
    key, warmup = given
    value, unit = getattr(cfg, key.split(".")[1]), _unit(clock)
    in_units = "" if (key, unit) == ("schedule.warmup_steps", "steps") else f" ({warmup} {unit})"
    _check(
        warmup <= max_steps,
        f"{key}={value}{in_units} exceeds the run's {max_steps} {unit} ({length_key}); lower it, lengthen the "
        "run or use schedule.warmup_ratio",
    )
    return warmup


def warmup_start_ratio(cfg: ScheduleConfig, peak_lr: float) -> float:
    """The LR warmup starts from, as a fraction of ``peak_lr``: ``warmup_start_lr`` wins over the ratio.

    Raises:
        ConfigError: outside [0, optim.lr] (or [0, 1] as a ratio).
    """
    if cfg.warmup_start_lr is not None:
        _check(
            0.0 <= cfg.warmup_start_lr <= peak_lr,
            f"schedule.warmup_start_lr={cfg.warmup_start_lr} must be in [0, optim.lr={peak_lr}]",
        )
        return cfg.warmup_start_lr / peak_lr
    ratio = cfg.warmup_start_ratio or 0.0
    _check(0.0 <= ratio <= 1.0, f"schedule.warmup_start_ratio={ratio} must be in [0, 1]")
    return ratio


def warmup_from(step: int, *, multiplier: Multiplier, warmup_steps: int, start: float) -> float:
    """During warmup, the curve lifted to start at ``start`` (a fraction of the peak) instead of 0:
    ``start + (1 - start) * f(step)``, Megatron's ``lr_warmup_init + (max_lr - lr_warmup_init) * f``
    (megatron/core/optimizer_param_scheduler.py, ``get_lr``). After warmup, ``f(step)`` unchanged."""
    value = multiplier(step)
    return start + (1.0 - start) * value if step < warmup_steps else value


BATCH_LR_SCALINGS = ("none", "sqrt", "linear")


MAX_STEPS = 10_000_000
"""The longest run ramp accepts, in optimizer steps (the loop keeps every step's LR in a table); far
above any real run, it turns a mistyped length into an error instead of an exhausted memory."""


def build_schedule(
    cfg: ScheduleConfig,
    *,
    max_steps: int,
    peak_lr: float,
    clock: Clock | None = None,
    length_key: str = "train.max_steps",
) -> Schedule:
    """Resolve a schedule config for a run of ``max_steps`` optimizer steps peaking at ``peak_lr``.

    ``clock`` says what each step takes (:mod:`trainer.durations`): with a fixed batch the schedule
    counts steps and lengths in tokens, samples or epochs become whole steps; with a batch schedule
    (:class:`~trainer.durations.BatchRamp`) it counts the samples trained on, and every length is
    counted in samples. Without a clock, every length must be in steps. ``length_key`` names the key
    the run's length came from (``train.max_tokens=2B``), for messages.

    Raises:
        ConfigError: ``max_steps`` below 1, ``peak_lr`` not positive, or a schedule key out of range.
    """
    _check(max_steps >= 1, f"train.max_steps={max_steps} must be at least 1")
    _check(
        max_steps <= MAX_STEPS,
        f"{length_key} is {max_steps:.3g} optimizer steps, more than ramp's limit of {MAX_STEPS:,}; check its "
        "unit and the batch",
    )
    _check(peak_lr > 0, f"optim.lr={peak_lr} must be > 0")
    _check(
        cfg.batch_lr_scaling in BATCH_LR_SCALINGS,
        f"schedule.batch_lr_scaling={cfg.batch_lr_scaling} must be none, sqrt or linear",
    )
    _check(
        cfg.batch_lr_scaling == "none" or _unit(clock) == "samples",
        f"schedule.batch_lr_scaling={cfg.batch_lr_scaling} scales the LR as train.batch_schedule changes the "
        "batch, and no batch schedule is set: set train.batch_schedule or schedule.batch_lr_scaling=none",
    )
    total = max_steps if clock is None else clock.clock(max_steps)
    warmup = resolve_warmup(cfg, total, clock, length_key)
    multiplier = cfg.multiplier(warmup, total, peak_lr, clock)
    start = warmup_start_ratio(cfg, peak_lr)
    if start > 0:
        multiplier = partial(warmup_from, multiplier=multiplier, warmup_steps=warmup, start=start)
    steps_until = (lambda units: units) if clock is None else clock.steps_until
    decay_start = cfg.decay_start(warmup, total, clock)
    return Schedule(
        name=cfg.name,
        max_steps=max_steps,
        peak_lr=peak_lr,
        warmup_steps=steps_until(warmup),
        decay_start=steps_until(decay_start),
        multiplier_fn=multiplier,
        clock=clock,
        batch_lr_scaling=cfg.batch_lr_scaling,
        warmup_units=warmup,
        decay_start_units=decay_start,
    )
