"""Durations: what one optimizer step takes, and a length in steps, tokens, samples or epochs in steps.

Two ways a run takes its batch, each a *clock* for the LR schedule:

- :class:`Batching`, a fixed global batch (``train.micro_batch_size x world size x
  train.grad_accum_steps`` sequences a step). The schedule's clock is the global step; a length in
  tokens, samples or epochs is rounded up to whole steps, and an epoch holds the steps the Hugging
  Face Trainer counts for the same data (:func:`hf_steps_per_epoch`).
- :class:`BatchRamp`, ``train.batch_schedule``: the global batch as a step function of the tokens
  trained on (Megatron-LM's form, ``"0:256 2B:512"``). The schedule's clock is the sample (sequence)
  trained on, so the LR runs on continuously through every batch change; lengths are counted in
  samples (tokens rounded up to whole samples).

Both answer the same questions for a 1-based global step ``k``: its global batch, the samples trained
after it, and the schedule's clock after it. This module imports nothing of ramp but its errors.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, TypeAlias

from trainer.errors import ConfigError

SUFFIXES = {"k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


class NeedsData(ConfigError):
    """A length in epochs, asked for before the data (and so the samples in an epoch) is known."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def parse_count(value: object, key: str) -> float:
    """A count as a number: ``2000``, ``2e9``, or a readable ``"2B"``, ``"500M"``, ``"1.5k"`` (T, B/G, M, k).

    Raises:
        ConfigError: not a number or a number with one of those suffixes, or below 0, naming ``key``.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value} is not a count; give a number such as 2e9 or 2B")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().replace("_", "")
        scale = SUFFIXES.get(text[-1:], 1.0) if text else 1.0
        try:
            number = float(text[:-1] if scale != 1.0 else text) * scale
        except ValueError:
            raise ConfigError(
                f"{key}={value} is not a count; give a number such as 2e9 or with a suffix: 2B, 500M, 10k"
            ) from None
    _check(number >= 0 and math.isfinite(number), f"{key}={value} must be a count of 0 or more")
    return number


def hf_steps_per_epoch(samples: int, micro_batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps in one epoch, as the Hugging Face Trainer counts them (transformers 5.x,
    ``Trainer.set_initial_training_values``): ``ceil(len(dataloader) / grad_accum_steps)``, at least 1,
    where each rank's dataloader holds ``ceil(ceil(samples / micro_batch_size) / world_size)`` batches
    (the last ones partial; accelerate's even batches). A final partial accumulation window counts as a
    step, as there.
    """
    per_rank = math.ceil(math.ceil(samples / micro_batch_size) / world_size)
    return max(math.ceil(per_rank / grad_accum_steps), 1)


def _epoch_samples(samples_per_epoch: int | None, key: str) -> int:
    if samples_per_epoch is None:
        raise NeedsData(
            f"{key} is counted in epochs, and an epoch's size is known once the data is built: the trainer "
            "counts it then; to preview the schedule, give the length in steps, tokens or samples"
        )
    return samples_per_epoch


UNITS = ("steps", "tokens", "samples", "epochs")


def parse_length(value: object, key: str) -> tuple[float, str]:
    """A length with its unit: ``1000`` (steps), ``"1000 steps"``, ``"2B tokens"``, ``"5k samples"``,
    ``"0.5 epochs"`` (the unit may follow the count with or without a space or ``_``).

    Raises:
        ConfigError: not a count, or a unit other than steps, tokens, samples or epochs, naming ``key``.
    """
    text = str(value).strip()
    for unit in UNITS:
        for spelling in (unit, unit[:-1]):
            if text.endswith(spelling) and not text.endswith(f"{spelling}s"):
                count = text[: -len(spelling)].rstrip(" _")
                return parse_count(count, key), unit
    if text and text[-1].isalpha() and text[-1] not in SUFFIXES:
        raise ConfigError(
            f"{key}={value}: the unit must be steps, tokens, samples or epochs, e.g. {key}=500 or "
            f"{key}='2B tokens'"
        )
    return parse_count(value, key), "steps"


@dataclass(frozen=True)
class BatchStage:
    """From ``start_tokens`` tokens trained on, each optimizer step takes ``global_batch`` sequences."""

    start_tokens: int
    global_batch: int


@dataclass(frozen=True)
class Segment:
    """The global steps one batch stage trains: from ``first_step`` on, ``global_batch`` samples each."""

    first_step: int
    samples_before: int
    """Samples trained on before ``first_step``."""
    global_batch: int
    stage: BatchStage


@dataclass(frozen=True)
class Batching:
    """A fixed global batch: what one optimizer step takes, and how many steps an epoch holds. The
    schedule's clock is the global step."""

    seq_len: int
    """Predicted tokens per sample (train.seq_len)."""
    micro_batch_size: int
    grad_accum_steps: int
    world_size: int
    samples_per_epoch: int | None = None
    """Training samples (windows of seq_len + 1 tokens) in one pass; None before the data is built."""
    unit: ClassVar[str] = "steps"
    """The unit of the schedule's clock."""

    @property
    def global_batch(self) -> int:
        """Samples (sequences) per optimizer step, over all ranks and micro-batches."""
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def tokens_per_step(self) -> int:
        """Predicted tokens per optimizer step, over all ranks."""
        return self.global_batch * self.seq_len

    def batch_of(self, step: int) -> int:
        """The global batch (samples) of global step ``step``."""
        return self.global_batch

    def grad_accum(self, step: int) -> int:
        """Micro-batches per rank in global step ``step``."""
        return self.grad_accum_steps

    def samples_after(self, step: int) -> int:
        """Samples trained on after ``step`` optimizer steps, over all ranks."""
        return step * self.global_batch

    def clock(self, step: int) -> int:
        """The schedule's clock after global step ``step``: the step itself."""
        return step

    def steps_until(self, units: int) -> int:
        """The first global step at which the clock reaches ``units`` (0 for 0)."""
        return units

    def segments_until(self, max_steps: int) -> tuple[Segment, ...]:
        """The one stage of a fixed batch."""
        return (Segment(1, 0, self.global_batch, BatchStage(0, self.global_batch)),)

    def steps_per_epoch(self, key: str) -> int:
        """Optimizer steps in one epoch, as the Hugging Face Trainer counts them (:func:`hf_steps_per_epoch`).

        Raises:
            NeedsData: the data is not built yet (``key`` names the length that needs it).
        """
        return hf_steps_per_epoch(
            _epoch_samples(self.samples_per_epoch, key),
            self.micro_batch_size,
            self.world_size,
            self.grad_accum_steps,
        )

    def to_units(self, value: float, unit: str, key: str) -> int:
        """``value`` in ``unit`` (steps, tokens, samples or epochs) as whole optimizer steps, rounded up.

        Raises:
            ConfigError: an unknown unit. NeedsData: epochs before the data is built.
        """
        if unit == "steps":
            return math.ceil(value)
        if unit == "tokens":
            return math.ceil(value / self.tokens_per_step)
        if unit == "samples":
            return math.ceil(value / self.global_batch)
        if unit == "epochs":
            return math.ceil(value * self.steps_per_epoch(key))
        raise ConfigError(f"{key}: {unit} is not a unit of length; use one of {', '.join(UNITS)}")

    def run_steps(self, value: float, unit: str, key: str) -> int:
        """The optimizer steps of a run ``value`` ``unit`` long: at least 1."""
        return max(self.to_units(value, unit, key), 1)


BATCH_KEY = "train.batch_schedule"
MAX_BATCH = 2**31 - 1
"""The largest global batch a batch schedule may name, in sequences."""


def parse_batch_schedule(text: str) -> tuple[BatchStage, ...]:
    """``"0:256 2B:512 6B:1024"`` (Megatron-LM's step batch-size schedule form): from 0 tokens 256
    sequences a step, from 2B tokens 512, from 6B tokens 1024.

    Raises:
        ConfigError: a stage that is not TOKENS:BATCH, a first stage not at 0 tokens, thresholds not
            increasing, or a batch that is not a whole number of at least 1, naming the key.
    """
    key, stages = BATCH_KEY, []
    for item in str(text).split():
        start, sep, batch = item.partition(":")
        _check(
            bool(sep) and "," not in item,
            f"{key}: {item!r} is not TOKENS:BATCH; separate the stages with spaces, e.g. {key}='0:256 2B:512'",
        )
        global_batch = parse_count(batch, f"{key}: the batch of {item!r}")
        _check(
            1 <= global_batch <= MAX_BATCH and global_batch == int(global_batch),
            f"{key}: batch {batch} in {item!r} must be a whole number of sequences from 1 to {MAX_BATCH:,}",
        )
        stages.append(BatchStage(int(parse_count(start, f"{key}: the start of {item!r}")), int(global_batch)))
    _check(
        bool(stages) and stages[0].start_tokens == 0,
        f"{key}={text!r} must start at 0 tokens, e.g. {key}='0:256 2B:512'",
    )
    for before, after in itertools.pairwise(stages):
        _check(
            after.start_tokens > before.start_tokens,
            f"{key}={text!r}: the stages must be in increasing tokens ({after.start_tokens:,} follows "
            f"{before.start_tokens:,})",
        )
    return tuple(stages)


@dataclass(frozen=True)
class BatchRamp:
    """``train.batch_schedule``: the global batch of step ``k`` is the stage reached by the tokens trained
    on before it, reached by the number of accumulation micro-batches (the micro-batch, and the memory,
    stay fixed). The schedule's clock is the sample: step ``k`` trains at ``f(samples after k)``.

    Megatron-LM's ``update_num_microbatches(consumed_samples)`` picks each iteration's batch the same
    way, from the samples consumed before it.

    Raises:
        ConfigError: on construction, a stage's batch that ``micro_batch_size x world_size`` does not divide.
    """

    stages: tuple[BatchStage, ...]
    seq_len: int
    micro_batch_size: int
    world_size: int
    samples_per_epoch: int | None = None
    unit: ClassVar[str] = "samples"
    """The unit of the schedule's clock."""

    def __post_init__(self) -> None:
        per_pass = self.micro_batch_size * self.world_size
        for stage in self.stages:
            if self.samples_per_epoch is not None and stage.global_batch > self.samples_per_epoch:
                raise ConfigError(
                    f"{BATCH_KEY}: a global batch of {stage.global_batch:,} sequences is more than the "
                    f"{self.samples_per_epoch:,} training samples of the data; lower it"
                )
            _check(
                stage.global_batch % per_pass == 0,
                f"{BATCH_KEY}: a global batch of {stage.global_batch} is not a multiple of train.micro_batch_size "
                f"x world size = {self.micro_batch_size} x {self.world_size} = {per_pass}; use multiples of "
                f"{per_pass} (each step accumulates whole micro-batches on every rank)",
            )

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """The stages that train at least one step, with the step each starts at."""
        segments, step, samples = [], 1, 0
        for stage, following in itertools.zip_longest(self.stages, self.stages[1:]):
            if following is None:
                segments.append(Segment(step, samples, stage.global_batch, stage))
                break
            # steps until the tokens trained on reach the next stage's start (none if they already do)
            short = following.start_tokens - samples * self.seq_len
            count = max(0, -(-short // (stage.global_batch * self.seq_len)))
            if count:
                segments.append(Segment(step, samples, stage.global_batch, stage))
                step, samples = step + count, samples + count * stage.global_batch
        return tuple(segments)

    def segments_until(self, max_steps: int) -> tuple[Segment, ...]:
        """The stages a run of ``max_steps`` steps reaches."""
        return tuple(s for s in self.segments if s.first_step <= max_steps)

    def _segment(self, step: int) -> Segment:
        index = bisect.bisect_right([s.first_step for s in self.segments], step) - 1
        return self.segments[max(index, 0)]

    def batch_of(self, step: int) -> int:
        """The global batch (samples) of global step ``step`` (1-based)."""
        return self._segment(step).global_batch

    def grad_accum(self, step: int) -> int:
        """Micro-batches per rank in global step ``step``."""
        return self.batch_of(step) // (self.micro_batch_size * self.world_size)

    def samples_after(self, step: int) -> int:
        """Samples trained on after ``step`` optimizer steps, over all ranks."""
        if step <= 0:
            return 0
        segment = self._segment(step)
        return segment.samples_before + (step - segment.first_step + 1) * segment.global_batch

    def clock(self, step: int) -> int:
        """The schedule's clock after global step ``step``: the samples trained on."""
        return self.samples_after(step)

    def steps_until(self, units: int) -> int:
        """The first global step after which ``units`` samples are trained on (0 for 0)."""
        if units <= 0:
            return 0
        segment = self.segments[0]
        for candidate in self.segments:
            if candidate.samples_before < units:
                segment = candidate
        return segment.first_step - 1 + -(-(units - segment.samples_before) // segment.global_batch)

    def to_units(self, value: float, unit: str, key: str) -> int:
        """``value`` in ``unit`` as samples: steps as the samples they train, tokens rounded up to whole
        samples, epochs as passes over the training samples (rounded up).

        Raises:
            ConfigError: an unknown unit. NeedsData: epochs before the data is built.
        """
        if unit == "steps":
            return self.samples_after(math.ceil(value))
        if unit == "tokens":
            return math.ceil(value / self.seq_len)
        if unit == "samples":
            return math.ceil(value)
        if unit == "epochs":
            return math.ceil(value * _epoch_samples(self.samples_per_epoch, key))
        raise ConfigError(f"{key}: {unit} is not a unit of length; use one of {', '.join(UNITS)}")

    def run_steps(self, value: float, unit: str, key: str) -> int:
        """The optimizer steps of a run ``value`` ``unit`` long: the first step that reaches it, at least 1."""
        if unit == "steps":
            return max(math.ceil(value), 1)
        return max(self.steps_until(self.to_units(value, unit, key)), 1)


Clock: TypeAlias = "Batching | BatchRamp"
"""What each step takes and what the LR schedule counts: a fixed batch (steps) or a batch ramp (samples)."""
