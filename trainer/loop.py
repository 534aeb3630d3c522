"""The training loop. It owns the global step.

``TrainState.global_step`` counts optimizer steps taken, and the step being taken is numbered
``global_step + 1``: 1-based, from 1 to ``train.max_steps``. Gradient accumulation runs several
micro-batches inside one step and never changes the count; a skipped non-finite update does not
advance it either. The schedule sees only this number, and it is saved in every checkpoint.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, distributed
from trainer.backends import Backend
from trainer.config import Config, OnNan
from trainer.data import Data
from trainer.distributed import DistInfo
from trainer.models import count_parameters
from trainer.observe import Recorder
from trainer.observe.flops import flops_per_token, memory_gb, mfu, peak_flops
from trainer.observe.recorder import perplexity
from trainer.preemption import StopSignal
from trainer.schedules import Schedule

log = logging.getLogger("ramp")

MAX_CONSECUTIVE_SKIPS = 25
"""With train.on_nan=skip, this many non-finite steps in a row halt the run: it is not recovering."""


class TrainingHalted(RuntimeError):
    """The run cannot go on (a non-finite update with train.on_nan=halt); the message says why."""


class Outcome(str, Enum):
    finished = "finished"
    preempted = "preempted"


@dataclass
class TrainState:
    global_step: int = 0
    """Optimizer steps completed: the only state the schedule depends on."""
    tokens: int = 0
    """Tokens trained on, summed over ranks."""
    skipped_steps: int = 0
    """Updates dropped for a non-finite gradient norm (train.on_nan=skip)."""


@dataclass
class IntervalMeter:
    """A log interval's metrics, accumulated on the device; one all-reduce per interval reads them."""

    device: torch.device
    loss_sum: torch.Tensor = field(init=False)
    tokens: int = 0
    steps: int = 0
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.tokens = self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The open interval, so a resumed run logs the same loss as one never interrupted."""
        return {"loss_sum": self.loss_sum.cpu(), "tokens": self.tokens, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.tokens, self.steps = int(state["tokens"]), int(state["steps"])

    def reduce(self, info: DistInfo) -> dict[str, float]:
        # Each rank writes its memory into its own slot, so the same sum yields every rank's value
        # and the max needs no second collective.
        memory = [0.0] * info.world_size
        memory[info.rank] = memory_gb(self.device)
        extra = torch.tensor([float(self.tokens), self.data_wait, *memory], dtype=torch.float64)
        packed = torch.cat([self.loss_sum.view(1), extra.to(self.device)])
        # note: this is the interval's only host-device sync point
        loss_sum, tokens, data_wait, *memory = distributed.all_reduce_sum(packed, info).tolist()
        elapsed = time.perf_counter() - self.started
        return {
            "loss": loss_sum / tokens,
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed / self.steps,
            "data_wait_s": data_wait / info.world_size / self.steps,
            "memory_gb": max(memory),
        }


@dataclass
class Trainer:
    cfg: Config
    info: DistInfo
    backend: Backend
    data: Data
    schedule: Schedule
    recorder: Recorder
    run_dir: Path
    config: dict[str, Any]
    """The resolved config, saved with every checkpoint."""
    meter: IntervalMeter = field(init=False)
    flops_per_token: float = field(init=False)
    peak_flops: float | None = field(init=False)
    """Peak FLOP/s of one device; None leaves MFU out of the records (a CPU without logger.peak_flops)."""

    def __post_init__(self) -> None:
        self.meter = IntervalMeter(self.info.device)
        self.flops_per_token = flops_per_token(self.backend.module, self.cfg.train.seq_len)
        self.peak_flops = peak_flops(self.info.device, self.cfg.logger.peak_flops)

    def announce(self) -> None:
        """One start-up line: what trains, on how many ranks, how many tokens a step, into where."""
        t, world = self.cfg.train, self.info.world_size
        log.info(
            "ramp | %s: %.2fM parameters | world %d | %d tokens/step (%d x %d x %d ranks x %d accum) | %s -> %s",
            self.cfg.model.name,
            count_parameters(self.backend.module) / 1e6,
            world,
            t.micro_batch_size * t.seq_len * world * t.grad_accum_steps,
            t.micro_batch_size,
            t.seq_len,
            world,
            t.grad_accum_steps,
            self.schedule.name,
            self.run_dir,
        )

    def restore(self, resumed: checkpoint.Resumed) -> TrainState:
        """Continue where a checkpoint left off: data position, open log interval, counters."""
        meta = resumed.meta
        self.data.train.load_state_dict(meta["sampler"])
        if "meter" in resumed.rank_state:
            self.meter.load_state_dict(resumed.rank_state["meter"])
        for change in checkpoint.config_changes(meta["config"], self.config):
            log.warning("resuming with a changed setting that changes the math: %s", change)
        step, max_steps = int(meta["step"]), self.cfg.train.max_steps
        if meta["config"]["train"]["max_steps"] != max_steps and step < max_steps:
            log.warning(
                "train.max_steps is now %d: the schedule is recomputed over %d steps, so step %d trains at "
                "LR %.4g (the curve a %d-step run follows there)",
                max_steps,
                max_steps,
                step + 1,
                self.schedule.lr(step + 1),
                max_steps,
            )
        if step >= max_steps:
            log.info(
                "ramp | %s already reached train.max_steps=%d; raise it to train further",
                resumed.path,
                max_steps,
            )
        else:
            log.info("ramp | resuming from %s at step %d", resumed.path, step)
        return TrainState(
            global_step=step, tokens=int(meta["tokens"]), skipped_steps=int(meta["skipped_steps"])
        )

    def train_step(self) -> tuple[torch.Tensor, int]:
        """Forward and backward every micro-batch of one optimizer step; gradients sync on the last."""
        accum = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.info.device, dtype=torch.float64)
        tokens = 0
        for micro in range(accum):
            waited = time.perf_counter()
            batch = self.data.train.next_batch()
            self.meter.data_wait += time.perf_counter() - waited
            loss_sum += self.backend.micro_step(batch, last=micro == accum - 1).double()
            tokens += batch[:, 1:].numel()
        return loss_sum, tokens

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss over the same held-out windows every time, reduced over ranks."""
        total = torch.zeros(2, device=self.info.device, dtype=torch.float64)
        for indices in self.data.eval_indices(self.cfg, self.info):
            batch = self.data.train.gather_from(self.data.val_tokens, indices)
            total[0] += self.backend.eval_loss(batch).double()
            total[1] += batch[:, 1:].numel()
        loss_sum, tokens = distributed.all_reduce_sum(total, self.info).tolist()
        return {"val_loss": loss_sum / tokens, "val_ppl": perplexity(loss_sum / tokens)}

    def save(self, state: TrainState) -> Path:
        meta = {
            "tokens": state.tokens,
            "skipped_steps": state.skipped_steps,
            "sampler": self.data.train.state_dict(),
            "backend": self.cfg.backend.name,
            "tokenizer_vocab": self.data.vocab_size,
            "eos_id": self.data.eos_id,
            "config": self.config,
        }
        root = self.run_dir / "checkpoints"
        keep = self.cfg.train.keep_checkpoints
        rank_state = {"meter": self.meter.state_dict()}
        return checkpoint.save(root, state.global_step, self.info, self.backend, meta, rank_state, keep)

    def skip_or_halt(self, state: TrainState, step: int, grad_norm: torch.Tensor, consecutive: int) -> None:
        message = f"non-finite gradient norm ({float(grad_norm)}) at step {step}"
        if self.cfg.train.on_nan == OnNan.halt:
            raise TrainingHalted(
                f"{message}; stopped before the optimizer step, weights untouched. Resume from the last "
                "checkpoint with a lower optim.lr, or set train.on_nan=skip to drop such updates"
            )
        if consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise TrainingHalted(
                f"{message}: {consecutive} non-finite steps in a row; the run is not recovering"
            )
        state.skipped_steps += 1
        log.warning("%s: update skipped (%d so far)", message, state.skipped_steps)

    def fit(self, state: TrainState, stop: StopSignal) -> Outcome:
        t, meter = self.cfg.train, self.meter
        # Profiling note: set-up leaves hundreds of thousands of long-lived objects (Hydra, transformers)
        # that every full collection would rescan while autograd churns through temporaries. Frozen,
        # they are skipped: ramp went from about 0.94x to 0.97x the bare loop's tokens/s on CPU.
        gc.collect()
        gc.freeze()
        consecutive_skips = 0
        while state.global_step < t.max_steps:
            step = state.global_step + 1
            lr = self.schedule.lr(step)
            self.backend.set_lr(lr)
            loss_sum, tokens = self.train_step()
            grad_norm, applied = self.backend.optimizer_step()
            if not applied:
                consecutive_skips += 1
                self.skip_or_halt(state, step, grad_norm, consecutive_skips)
                continue
            consecutive_skips = 0
            state.global_step, state.tokens = step, state.tokens + tokens * self.info.world_size
            meter.loss_sum += loss_sum
            meter.tokens += tokens
            meter.steps += 1
            self.recorder.step(step)
            if step == 1 or step % t.log_every == 0 or step == t.max_steps:
                record: dict[str, Any] = {"step": step, "lr": lr, **meter.reduce(self.info)}
                record.update(
                    grad_norm=float(grad_norm), tokens=state.tokens, epoch=self.data.train.state.epoch
                )
                record.update({f"lr/{name}": group_lr for name, group_lr in self.backend.lrs().items()})
                record["skipped_steps"] = state.skipped_steps
                if self.peak_flops:
                    record["mfu"] = mfu(
                        self.flops_per_token, record["tokens_per_s"], self.peak_flops, self.info.world_size
                    )
                self.recorder.log(record)
                meter.reset()
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                self.recorder.log({"step": step, **self.evaluate()})
                meter.started = time.perf_counter()  # evaluation time is not training throughput
            if stop.agreed():
                path = self.save(state)
                who = stop.received or "a signal to another rank"
                log.info("ramp | preempted by %s: saved %s at step %d; exiting", who, path, step)
                return Outcome.preempted
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps:
                self.save(state)
        return Outcome.finished
