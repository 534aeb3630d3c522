"""The training loop. It owns the global step.

``TrainState.global_step`` counts optimizer steps taken, and the step being taken is numbered
``global_step + 1``: 1-based, from 1 to ``train.max_steps``. Gradient accumulation runs several
micro-batches inside one step and never changes the count. The schedule sees only this number.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from trainer import distributed
from trainer.backends import Backend
from trainer.config import Config
from trainer.data import Data
from trainer.distributed import DistInfo
from trainer.observe import Recorder
from trainer.observe.recorder import perplexity
from trainer.schedules import Schedule


@dataclass
class TrainState:
    global_step: int = 0
    """Optimizer steps completed: the only state the schedule depends on."""
    tokens: int = 0
    """Tokens trained on, summed over ranks."""


class IntervalMeter:
    """Accumulates a log interval's metrics on the device; one all-reduce per interval reads them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.tokens = 0
        self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def reduce(self, info: DistInfo) -> dict[str, float]:
        # note: this is the interval's only host-device sync point
        packed = torch.stack(
            [
                self.loss_sum,
                torch.tensor(float(self.tokens), device=self.device, dtype=torch.float64),
                torch.tensor(self.data_wait, device=self.device, dtype=torch.float64),
            ]
        )
        loss_sum, tokens, data_wait = distributed.all_reduce_sum(packed, info).tolist()
        elapsed = time.perf_counter() - self.started
        return {
            "loss": loss_sum / tokens,
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed / self.steps,
            "data_wait_s": data_wait / info.world_size / self.steps,
        }


def evaluate(cfg: Config, info: DistInfo, backend: Backend, data: Data) -> dict[str, float]:
    """Token-weighted validation loss over the same held-out windows every time, reduced over ranks."""
    total = torch.zeros(2, device=info.device, dtype=torch.float64)
    for indices in data.eval_indices(cfg, info):
        batch = data.train.gather_from(data.val_tokens, indices)
        total[0] += backend.eval_loss(batch).double()
        total[1] += batch[:, 1:].numel()
    loss_sum, tokens = distributed.all_reduce_sum(total, info).tolist()
    val_loss = loss_sum / tokens
    return {"val_loss": val_loss, "val_ppl": perplexity(val_loss)}


def fit(
    cfg: Config,
    info: DistInfo,
    backend: Backend,
    data: Data,
    schedule: Schedule,
    recorder: Recorder,
    state: TrainState,
) -> TrainState:
    t = cfg.train
    tokens_per_step = t.micro_batch_size * t.seq_len * t.grad_accum_steps * info.world_size
    meter = IntervalMeter(info.device)
    while state.global_step < t.max_steps:
        step = state.global_step + 1
        lr = schedule.lr(step)
        backend.set_lr(lr)
        for micro in range(t.grad_accum_steps):
            waited = time.perf_counter()
            batch = data.train.next_batch()
            meter.data_wait += time.perf_counter() - waited
            meter.loss_sum += backend.micro_step(batch, last=micro == t.grad_accum_steps - 1).double()
            meter.tokens += batch[:, 1:].numel()
        grad_norm = backend.optimizer_step()
        state.global_step, state.tokens = step, state.tokens + tokens_per_step
        meter.steps += 1
        recorder.step(step)
        if step % t.log_every == 0 or step == t.max_steps:
            record: dict[str, Any] = {"step": step, "lr": lr}
            record.update(meter.reduce(info))
            record.update(grad_norm=float(grad_norm), tokens=state.tokens, epoch=data.train.state.epoch)
            record.update({f"lr/{i}": group_lr for i, group_lr in enumerate(backend.lrs())})
            recorder.log(record)
            meter.reset()
        if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
            recorder.log({"step": step, **evaluate(cfg, info, backend, data)})
            meter.started = time.perf_counter()  # evaluation time is not training throughput
    return state
