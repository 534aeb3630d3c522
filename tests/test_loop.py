"""The loop's own rules, run in-process with real parts: what a non-finite step does to the global step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_checkpoint import INFO, config
from trainer.backends import build_backend
from trainer.data import build_data
from trainer.loop import Trainer, TrainingHalted, TrainState
from trainer.models import build_model
from trainer.observe import Recorder
from trainer.preemption import StopSignal
from trainer.schedules import build_schedule


def make_trainer(tmp_path: Path, on_nan: str, poison_micro_step: int) -> Trainer:
    """A 5-step single-rank run whose gradient turns NaN on one chosen backward pass."""
    cfg = config(
        "train.max_steps=5",
        "train.log_every=1",
        "train.eval_every=0",
        "train.grad_accum_steps=2",
        f"train.on_nan={on_nan}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "schedule=linear",
        "schedule.warmup_steps=2",
    )
    data = build_data(cfg, INFO)
    torch.manual_seed(0)
    backend = build_backend(
        cfg, build_model(cfg.model, tokenizer_vocab=data.vocab_size, eos_id=data.eos_id), INFO
    )
    backwards = iter(range(10**6))
    first = next(backend.module.parameters())
    first.register_hook(lambda grad: grad * float("nan") if next(backwards) == poison_micro_step else grad)
    schedule = build_schedule(cfg.schedule, max_steps=5, peak_lr=cfg.optim.lr)
    cfg.logger.progress = "off"
    cfg.logger.wandb.mode = "disabled"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorder = Recorder(True, run_dir, {"run": {"name": "t"}}, cfg.logger, 5, start_step=0)
    return Trainer(cfg, INFO, backend, data, schedule, recorder, run_dir, {})


def test_skip_drops_the_update_without_advancing_the_step_or_schedule(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, "skip", poison_micro_step=5)  # the 2nd micro-batch of step 3
    state = TrainState()
    trainer.fit(state, StopSignal(INFO))
    trainer.recorder.close()
    assert state.global_step == 5 and state.skipped_steps == 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["lr"] for r in records] == [trainer.schedule.lr(k) for k in range(1, 6)]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    # Six optimizer steps' worth of micro-batches were drawn for five steps: the skipped one's data is gone.
    assert trainer.data.train.state_dict()["position"] == 6 * 2 * trainer.cfg.train.micro_batch_size


def test_halt_stops_before_the_update(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, "halt", poison_micro_step=5)
    state = TrainState()
    with pytest.raises(TrainingHalted, match=r"non-finite gradient norm .* at step 3"):
        trainer.fit(state, StopSignal(INFO))
    assert state.global_step == 2 and state.skipped_steps == 0
