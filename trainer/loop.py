"""The training loop. It owns the global step, the forward pass and the loss, evaluation and the LR.

``TrainState.global_step`` counts optimizer steps taken, and the step being taken is numbered
``global_step + 1``: 1-based, from 1 to ``train.max_steps``. Gradient accumulation runs several
micro-batches inside one step and never changes the count; a skipped non-finite update does not
advance it either. The schedule sees only this number, and it is saved in every checkpoint.

One step, as :meth:`Trainer.train_step` and :meth:`Trainer.fit` show it: write the step's LR into
the backend's parameter groups; for each micro-batch, forward and loss (the summed token loss),
backward of its share of the step's token mean through the backend (gradients sync on the last
micro-batch only); then the backend clips and steps.
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

from trainer import checkpoint, distributed, resume
from trainer.backends import Backend, to_device
from trainer.config import Config, OnNan
from trainer.data import Data
from trainer.distributed import DistInfo
from trainer.errors import TrainingHalted
from trainer.models import causal_lm_loss, count_parameters
from trainer.observe import Recorder, job_log
from trainer.observe.flops import flops_per_token, memory_gb, mfu, peak_flops
from trainer.observe.recorder import perplexity
from trainer.preemption import StopSignal
from trainer.schedules import Schedule

log = logging.getLogger("ramp")

MAX_CONSECUTIVE_SKIPS = 25
"""With train.on_nan=skip, this many non-finite steps in a row halt the run: it is not recovering."""


class Outcome(str, Enum):
    """How :meth:`Trainer.fit` ended."""

    finished = "finished"
    preempted = "preempted"


@dataclass
class TrainState:
    """The loop's counters: saved in every checkpoint's metadata, restored from it."""

    global_step: int = 0
    """Optimizer steps completed: the only state the schedule depends on."""
    tokens: int = 0
    """Tokens trained on, summed over ranks."""
    skipped_steps: int = 0
    """Updates dropped for a non-finite gradient norm (train.on_nan=skip)."""

    @classmethod
    def from_checkpoint(cls, meta: resume.CheckpointMeta) -> TrainState:
        """The counters a checkpoint recorded."""
        return cls(global_step=meta.step, tokens=meta.tokens, skipped_steps=meta.skipped_steps)


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
        """Start the next interval."""
        self.loss_sum.zero_()
        self.tokens = self.steps = 0
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The open interval, so a resumed run logs the same loss as one never interrupted."""
        return {"loss_sum": self.loss_sum.cpu(), "tokens": self.tokens, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.loss_sum.copy_(state["loss_sum"])
        self.tokens, self.steps = int(state["tokens"]), int(state["steps"])

    def reduce(self, info: DistInfo) -> dict[str, float]:
        """The interval's token-weighted loss and rates, summed over ranks (memory: the max over ranks)."""
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
    """The loop and what it drives: the backend, the data and the schedule."""

    cfg: Config
    info: DistInfo
    backend: Backend
    data: Data
    schedule: Schedule
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

    def restore(self, start: resume.Start) -> TrainState:
        """Continue where a checkpoint left off (see :mod:`trainer.resume`); nothing is written.

        Raises:
            ConfigError: the backend cannot load the checkpoint as configured, saying what to set.
        """
        resume.restore(start, self.info, self.backend, self.data.train, self.meter, self.cfg.optim)
        return TrainState.from_checkpoint(start.meta)

    def set_lr(self, lr: float) -> None:
        """Write the LR of the step about to be taken into every parameter group, before it is taken."""
        for group in self.backend.param_groups:
            group["lr"] = lr

    def train_step(self) -> tuple[torch.Tensor, int]:
        """Forward and backward every micro-batch of one optimizer step; gradients sync on the last.

        Returns the step's summed token loss on this rank (detached) and its number of predicted tokens.
        """
        t, backend = self.cfg.train, self.backend
        # Each rank backpropagates its share of the step's token mean: the backend averages over
        # ranks, and the micro-batches of one step add up, so the gradient is the global token mean's.
        scale = 1.0 / (t.grad_accum_steps * t.micro_batch_size * t.seq_len)
        loss_sum = torch.zeros((), device=self.info.device, dtype=torch.float64)
        tokens = 0
        for micro in range(t.grad_accum_steps):
            waited = time.perf_counter()
            host_batch = self.data.train.next_batch()
            self.meter.data_wait += time.perf_counter() - waited
            batch = to_device(host_batch, self.info.device)
            with backend.accumulate(last=micro == t.grad_accum_steps - 1):
                with backend.autocast():
                    loss = causal_lm_loss(backend.model, batch)
                backend.backward(loss * scale)
            loss_sum += loss.detach().double()
            tokens += batch[:, 1:].numel()
        return loss_sum, tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation loss over the same held-out windows every time, reduced over ranks."""
        module = self.backend.module  # unwrapped: ZeRO 3's hooks on it gather each layer as it runs
        total = torch.zeros(2, device=self.info.device, dtype=torch.float64)
        module.eval()
        try:
            for indices in self.data.eval_indices(self.cfg, self.info):
                batch = to_device(
                    self.data.train.gather_from(self.data.val_tokens, indices), self.info.device
                )
                with self.backend.autocast():
                    total[0] += causal_lm_loss(module, batch).double()
                total[1] += batch[:, 1:].numel()
        finally:
            module.train()
        loss_sum, tokens = distributed.all_reduce_sum(total, self.info).tolist()
        return {"val_loss": loss_sum / tokens, "val_ppl": perplexity(loss_sum / tokens)}

    def save(self, state: TrainState) -> Path:
        """Checkpoint the state after ``state.global_step`` (collective: every rank calls it)."""
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
        """A non-finite gradient norm at ``step``: count a skipped update, or stop (``train.on_nan``).

        Raises:
            TrainingHalted: with ``train.on_nan=halt``, or after too many skips in a row.
        """
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
        job_log.warning("%s: update skipped (%d so far)", message, state.skipped_steps)

    def log_step(self, recorder: Recorder, state: TrainState, lr: float, grad_norm: torch.Tensor) -> None:
        """Reduce the open log interval over ranks and record it (collective: every rank calls it)."""
        record: dict[str, Any] = {"step": state.global_step, "lr": lr, **self.meter.reduce(self.info)}
        record.update(grad_norm=float(grad_norm), tokens=state.tokens, epoch=self.data.train.state.epoch)
        # Each group's LR as the optimizer read it when it stepped: what trained, not what was meant to.
        record.update({f"lr/{name}": group_lr for name, group_lr in self.backend.applied_lrs.items()})
        record["skipped_steps"] = state.skipped_steps
        if self.peak_flops:
            record["mfu"] = mfu(
                self.flops_per_token, record["tokens_per_s"], self.peak_flops, self.info.world_size
            )
        recorder.log(record)
        self.meter.reset()

    def fit(self, state: TrainState, stop: StopSignal, recorder: Recorder) -> Outcome:
        """Train from ``state`` to ``train.max_steps``, or until a preemption signal (then checkpoint);
        every record goes to ``recorder``.

        Raises:
            TrainingHalted: a non-finite update that ``train.on_nan`` does not let the run skip.
        """
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
            self.set_lr(lr)  # before the step it belongs to: step k trains at the schedule's f(k)
            loss_sum, tokens = self.train_step()
            grad_norm, applied = self.backend.step()
            if not applied:
                consecutive_skips += 1
                self.skip_or_halt(state, step, grad_norm, consecutive_skips)
                continue
            consecutive_skips = 0
            state.global_step, state.tokens = step, state.tokens + tokens * self.info.world_size
            meter.loss_sum += loss_sum
            meter.tokens += tokens
            meter.steps += 1
            recorder.step(step)
            if step == 1 or step % t.log_every == 0 or step == t.max_steps:
                self.log_step(recorder, state, lr, grad_norm)
            if t.eval_every and (step % t.eval_every == 0 or step == t.max_steps):
                recorder.log({"step": step, **self.evaluate()})
                meter.started = time.perf_counter()  # evaluation time is not training throughput
            if stop.agreed():
                path = self.save(state)
                log.info("ramp | preempted by %s: saved %s at step %d; exiting", stop.describe(), path, step)
                return Outcome.preempted
            if (t.ckpt_every and step % t.ckpt_every == 0) or step == t.max_steps:
                self.save(state)
        return Outcome.finished
