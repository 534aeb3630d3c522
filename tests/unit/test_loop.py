"""The loop's own rules, run in-process with real parts: what a non-finite step does to the global step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import tiny_trainer
from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.errors import TrainingHalted
from trainer.loop import Trainer, TrainState
from trainer.observe import Recorder
from trainer.preemption import StopSignal


def make_trainer(
    tmp_path: Path, small_config: Callable[..., Config], info: DistInfo, on_nan: str, poison_micro_step: int
) -> tuple[Trainer, Recorder]:
    """A 5-step single-rank run whose gradient turns NaN on one chosen backward pass, and its recorder."""
    cfg = small_config(
        "train.max_steps=5",
        "train.log_every=1",
        "train.eval_every=0",
        "train.grad_accum_steps=2",
        f"train.on_nan={on_nan}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule=linear",
        "schedule.warmup_steps=2",
        "logger.progress=off",
        "logger.wandb.mode=disabled",
    )
    trainer, recorder = tiny_trainer(cfg, info, tmp_path / "run")
    backwards = iter(range(10**6))
    first = next(trainer.backend.module.parameters())
    first.register_hook(lambda grad: grad * float("nan") if next(backwards) == poison_micro_step else grad)
    return trainer, recorder


def test_skip_drops_the_update_without_advancing_the_step_or_schedule(
    tmp_path: Path, small_config: Callable[..., Config], alone: DistInfo
) -> None:
    # the 2nd micro-batch of step 3
    trainer, recorder = make_trainer(tmp_path, small_config, alone, "skip", poison_micro_step=5)
    state = TrainState()
    trainer.fit(state, StopSignal(alone), recorder)
    recorder.close()
    assert state.global_step == 5
    assert state.skipped_steps == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in records] == [trainer.schedule.lr(k) for k in range(1, 6)]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    # Six optimizer steps' worth of micro-batches were drawn for five steps: the skipped one's data is gone.
    assert trainer.data.train.state_dict()["position"] == 6 * 2 * trainer.cfg.train.micro_batch_size


def test_halt_stops_before_the_update(
    tmp_path: Path, small_config: Callable[..., Config], alone: DistInfo
) -> None:
    trainer, recorder = make_trainer(tmp_path, small_config, alone, "halt", poison_micro_step=5)
    state = TrainState()
    with pytest.raises(TrainingHalted, match=r"non-finite gradient norm .* at step 3"):
        trainer.fit(state, StopSignal(alone), recorder)
    assert state.global_step == 2
    assert state.skipped_steps == 0
