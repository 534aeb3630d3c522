"""The loop's own rules, run in-process with real parts: what a non-finite step does to the global step."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_trainer
from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.errors import TrainingHalted
from trainer.loop import Ledger, Trainer, TrainState
from trainer.observe import Recorder
from trainer.preemption import StopSignal


def make_trainer(
    tmp_path: Path,
    small_config: Callable[..., Config],
    info: DistInfo,
    on_nan: str,
    poison_micro_step: int,
    *overrides: str,
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
        *overrides,
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
    assert trainer.batches.state_dict()["position"] == 6 * 2 * trainer.cfg.train.micro_batch_size


def test_halt_stops_before_the_update(
    tmp_path: Path, small_config: Callable[..., Config], alone: DistInfo
) -> None:
    trainer, recorder = make_trainer(tmp_path, small_config, alone, "halt", poison_micro_step=5)
    state = TrainState()
    with pytest.raises(TrainingHalted, match=r"non-finite gradient norm .* at step 3"):
        trainer.fit(state, StopSignal(alone), recorder)
    assert state.global_step == 2
    assert state.skipped_steps == 0


def test_between_sync_points_no_step_waits_on_the_device_and_a_skip_is_settled_exactly(
    tmp_path: Path, small_config: Callable[..., Config], alone: DistInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.log_every=4 with a skipped update at step 3: the host reads the device only where something
    happens, and what it then settles is exact: the step numbers, the LR each step trained at (read
    inside the optimizer's step), the skip count and the data consumed."""
    reads: list[int] = []
    read = Ledger.read

    def counted(self: Ledger) -> list[tuple[bool, int, int, float]]:
        reads.append(len(self.rows))
        return read(self)

    monkeypatch.setattr(Ledger, "read", counted)
    trainer, recorder = make_trainer(
        tmp_path, small_config, alone, "skip", 5, "train.log_every=4", "train.max_steps=8"
    )
    assert trainer.backend.on_device  # fused AdamW drops the update on the device
    state = TrainState()
    trainer.fit(state, StopSignal(alone), recorder)
    recorder.close()
    assert (state.global_step, state.skipped_steps) == (8, 1)
    assert sum(reads) == 9  # nine attempts for eight steps...
    assert len(reads) == 4  # ...read back at steps 1, 4 (twice: the skip moved it) and 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 4, 8]
    for record in records:
        assert record["lr"] == record["lr/decay"] == trainer.schedule.lr(record["step"])
    assert [r["skipped_steps"] for r in records] == [0, 1, 1]
    assert trainer.batches.state_dict()["position"] == 9 * 2 * trainer.cfg.train.micro_batch_size


def test_a_halt_found_late_still_left_the_weights_as_they_were_before_the_bad_step(
    tmp_path: Path, small_config: Callable[..., Config], alone: DistInfo
) -> None:
    """train.log_every=4, a non-finite norm at step 3, read back only at the sync of step 4: the halt
    latch dropped step 3's update and every one after it, so the weights are those after step 2."""
    constant = "schedule=constant_with_warmup"  # the same LR at steps 1 and 2 whatever train.max_steps
    before, recorder = make_trainer(
        tmp_path / "a", small_config, alone, "halt", 10**6, "train.max_steps=2", constant
    )
    before.fit(TrainState(), StopSignal(alone), recorder)
    recorder.close()
    trainer, recorder = make_trainer(
        tmp_path / "b", small_config, alone, "halt", 5, "train.log_every=4", "train.max_steps=8", constant
    )
    state = TrainState()
    with pytest.raises(TrainingHalted, match=r"non-finite gradient norm .* at step 3"):
        trainer.fit(state, StopSignal(alone), recorder)
    assert state.global_step == 2
    after_two = list(before.backend.module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trainer.backend.module.parameters(), after_two, strict=True))


def test_the_end_of_a_run_prunes_what_background_evaluations_spared(tmp_path: Path) -> None:
    """train.keep_checkpoints holds at the end too: checkpoints spared while an evaluation read them go once
    the evaluations are done (or still spared if one goes on)."""
    from types import SimpleNamespace

    from trainer.loop import Trainer

    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"step_{step}").mkdir(parents=True)
    still_reading: set[int] = {4}
    fake = SimpleNamespace(
        complete_save=lambda: None,
        lm_evals=SimpleNamespace(finish=lambda: None, steps=lambda: still_reading),
        info=SimpleNamespace(is_main=True),
        run_dir=tmp_path,
        cfg=SimpleNamespace(train=SimpleNamespace(keep_checkpoints=1)),
    )
    Trainer.wind_down(fake)  # type: ignore[arg-type]
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]
    still_reading.clear()
    Trainer.wind_down(fake)  # type: ignore[arg-type]
    assert sorted(p.name for p in root.iterdir()) == ["step_6"]
