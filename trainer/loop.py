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
from trainer.data.sampler import WindowSampler
from trainer.distributed import DistInfo
from trainer.durations import BatchRamp, Clock
from trainer.errors import TrainingHalted
from trainer.evaluate import BackgroundEvals
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
    eval_pending: bool = False
    """The evaluation due at ``global_step`` has not been recorded (a stop signal cut it short)."""

    @classmethod
    def from_checkpoint(cls, meta: resume.CheckpointMeta) -> TrainState:
        """The counters a checkpoint recorded."""
        return cls(meta.step, meta.tokens, meta.skipped_steps, meta.eval_pending)


@dataclass
class IntervalMeter:
    """A log interval's metrics, accumulated on the device; one all-reduce per interval reads them."""

    device: torch.device
    sums: torch.Tensor = field(init=False)
    """On the device, float64: [summed token loss, tokens, applied steps] of this rank in the interval."""
    data_wait: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(3, device=self.device, dtype=torch.float64)

    def add(self, loss_sum: torch.Tensor, tokens: int, applied: torch.Tensor) -> None:
        """Count one attempt's micro-batches if its update was applied (a device-side mask, no sync)."""
        self.sums += (
            torch.stack([loss_sum, loss_sum.new_tensor(float(tokens)), loss_sum.new_tensor(1.0)]) * applied
        )

    def reset(self) -> None:
        """Start the next interval."""
        self.sums.zero_()
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        """The open interval, so a resumed run logs the same loss as one never interrupted."""
        loss_sum, tokens, steps = self.sums.cpu().unbind()
        return {"loss_sum": loss_sum, "tokens": int(tokens), "steps": int(steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        restored = [float(state["loss_sum"]), float(state["tokens"]), float(state["steps"])]
        self.sums.copy_(torch.tensor(restored, dtype=torch.float64))

    def reduce(self, info: DistInfo) -> dict[str, float]:
        """The interval's token-weighted loss and rates, summed over ranks (memory: the max over ranks)."""
        # Each rank writes its memory into its own slot, so the same sum yields every rank's value
        # and the max needs no second collective.
        memory = [0.0] * info.world_size
        memory[info.rank] = memory_gb(self.device)
        extra = torch.tensor([self.data_wait, *memory], dtype=torch.float64)
        packed = torch.cat([self.sums, extra.to(self.device)])
        # note: this is the interval's only host-device sync point
        loss_sum, tokens, steps, data_wait, *memory = distributed.all_reduce_sum(packed, info).tolist()
        elapsed, steps = time.perf_counter() - self.started, steps / info.world_size
        return {
            "loss": loss_sum / tokens,
            "tokens_per_s": tokens / elapsed,
            "step_time": elapsed / steps,
            "data_wait_s": data_wait / info.world_size / steps,
            "memory_gb": max(memory),
        }


class Ledger:
    """Each attempt's outcome, kept on the device until the host reads it at a sync point.

    An attempt is one pass of the step's work; it becomes global step ``step + 1`` when its update is
    applied, and is dropped (skipped, or held after a halt) otherwise. The global step, the count of
    non-finite attempts in a row and the halt latch live on the device, so the LR of the next attempt
    is looked up on the device too and no attempt waits for the host to learn how the last one ended.
    """

    def __init__(self, step: int, device: torch.device, halt_on_nan: bool) -> None:
        self.step = torch.tensor(step, device=device, dtype=torch.int64)
        """The global step: optimizer steps applied."""
        self.in_a_row = torch.zeros((), device=device, dtype=torch.int64)
        self.held = torch.zeros((), device=device, dtype=torch.bool)
        """Latched by a non-finite norm under train.on_nan=halt: no later update applies."""
        self.halt_on_nan = halt_on_nan
        self.rows: list[torch.Tensor] = []

    def record(self, grad_norm: torch.Tensor, applied: torch.Tensor) -> None:
        """Note an attempt's outcome (all on the device)."""
        tried = self.step + 1
        self.step += applied.long()
        self.in_a_row = torch.where(applied, 0, self.in_a_row + 1)
        if self.halt_on_nan:
            self.held |= ~torch.isfinite(grad_norm)
        row = [applied.double(), tried.double(), self.in_a_row.double(), grad_norm.double()]
        self.rows.append(torch.stack(row))

    def read(self) -> list[tuple[bool, int, int, float]]:
        """Every attempt since the last read: (applied, the step it tried, non-finite in a row, norm).

        note: a host-device sync; the loop calls it only at its sync points.
        """
        rows = torch.stack(self.rows).tolist() if self.rows else []
        self.rows.clear()
        return [(bool(a), int(step), int(in_a_row), norm) for a, step, in_a_row, norm in rows]


class Batches:
    """The training micro-batches, each fetched (and copied to the device) while the one before computes.

    nanoGPT's prefetch: the next batch is read and its host-to-device copy started (from pinned memory,
    without blocking, on a GPU) right after a micro-batch's forward pass is queued. The sampler is then
    one micro-batch ahead, so :meth:`state_dict` gives its state before the fetched batch: a checkpoint
    resumes with that batch, not after it.
    """

    def __init__(self, sampler: WindowSampler, device: torch.device) -> None:
        self.sampler, self.device = sampler, device
        self.ready: torch.Tensor | None = None
        self.before_ready: dict[str, int] = sampler.state_dict()

    def prefetch(self) -> None:
        """Fetch the next micro-batch now, if not already fetched."""
        if self.ready is None:
            self.before_ready = self.sampler.state_dict()
            self.ready = to_device(self.sampler.next_batch(), self.device)

    def next(self) -> torch.Tensor:
        """The next micro-batch, on the device: int64 of shape (micro_batch_size, seq_len + 1)."""
        self.prefetch()
        batch, self.ready = self.ready, None
        assert batch is not None
        return batch

    def state_dict(self) -> dict[str, int]:
        """The sampler's position as of the micro-batches handed out (a prefetched one not counted)."""
        return dict(self.before_ready) if self.ready is not None else self.sampler.state_dict()


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

    clock: Clock = field(init=False)
    """Each step's global batch and samples (a fixed batch, or train.batch_schedule's)."""
    end_step: int = field(init=False)
    """Where this process stops: train.max_steps, or train.stop_at before it (the schedule keeps its length)."""
    batches: Batches = field(init=False)
    lr_mults: dict[str, float] = field(init=False)
    """Each parameter group's LR multiplier (optim.groups), by name."""
    lr_table: torch.Tensor = field(init=False)
    """On the device: the schedule's LR of global step k at index k (index 0 is unused)."""
    last_eval: dict[str, float] | None = field(init=False, default=None)
    """The newest evaluation's records (val_loss, val_ppl), None before the first."""
    lm_evals: BackgroundEvals = field(init=False)
    """train.lm_eval_every's background evaluations of saved checkpoints (rank 0 starts them)."""
    saving: checkpoint.Saving | None = field(init=False, default=None)
    """A checkpoint still being written in the background (train.ckpt_async), None when there is none."""

    def __post_init__(self) -> None:
        self.meter = IntervalMeter(self.info.device)
        self.flops_per_token = flops_per_token(self.backend.module, self.cfg.train.seq_len)
        self.peak_flops = peak_flops(self.info.device, self.cfg.logger.peak_flops)
        self.batches = Batches(self.data.train, self.info.device)
        world, samples = self.info.world_size, self.data.train.num_samples
        self.clock = self.schedule.clock or self.cfg.batching(world, samples)
        self.end_step = min(
            self.schedule.max_steps, self.cfg.stop_step(self.clock) or self.schedule.max_steps
        )
        lrs = [self.schedule.lr(max(step, 1)) for step in range(self.schedule.max_steps + 1)]
        # CUDA's fused AdamW takes a tensor LR only in float32 (and computes in float32 anyway); the
        # CPU's takes float64, which keeps the schedule's exact values there.
        lr_dtype = torch.float32 if self.info.device.type == "cuda" else torch.float64
        self.lr_table = torch.tensor(lrs, dtype=lr_dtype, device=self.info.device)
        self.lr_mults = self.cfg.optim.lr_mults()
        self.lm_evals = BackgroundEvals(self.cfg.train, self.run_dir, self.info.is_main)

    def announce(self) -> None:
        """The start-up lines: what trains, on how many ranks, how many tokens a step, into where; the
        run's length and warmup in every unit."""
        t, world, clock, schedule = self.cfg.train, self.info.world_size, self.clock, self.schedule
        per_epoch = self.data.train.num_samples

        def units(step: int, samples_exactly: int | None = None) -> str:
            """In every unit; under a batch schedule a point in samples may fall inside a step."""
            if isinstance(clock, BatchRamp) and samples_exactly is not None:
                return (
                    f"{samples_exactly:,} samples = {samples_exactly * t.seq_len:,} tokens = "
                    f"{samples_exactly / per_epoch:.3g} epochs (reached in step {step})"
                )
            samples = clock.samples_after(step)
            return (
                f"{step} step{'' if step == 1 else 's'} = {samples * t.seq_len:,} tokens = {samples:,} samples = "
                f"{samples / per_epoch:.3g} epochs"
            )

        if t.max_steps is not None and t.epochs is not None:
            log.info("ramp | train.max_steps=%d wins over train.epochs=%g", t.max_steps, t.epochs)
        warmup = units(schedule.warmup_steps, schedule.warmup_units)
        log.info("ramp | length %s | warmup %s", units(schedule.max_steps), warmup)
        log.info("ramp | decay starts after %s", units(schedule.decay_start, schedule.decay_start_units))
        for segment in clock.segments_until(schedule.max_steps):
            accum = segment.global_batch // (t.micro_batch_size * world)
            log.info(
                "ramp | from step %d (%s tokens): %d sequences a step = %s tokens (%d x %d x %d rank%s x %d accum)",
                segment.first_step,
                f"{segment.samples_before * t.seq_len:,}",
                segment.global_batch,
                f"{segment.global_batch * t.seq_len:,}",
                t.micro_batch_size,
                t.seq_len,
                world,
                "" if world == 1 else "s",
                accum,
            )
        log.info(
            "ramp | %s: %.2fM parameters | world %d | backend %s | %s -> %s",
            self.cfg.model.name,
            count_parameters(self.backend.module) / 1e6,
            world,
            self.backend.name,
            schedule.name,
            self.run_dir,
        )

    def restore(self, start: resume.Start) -> TrainState:
        """Continue where a checkpoint left off (see :mod:`trainer.resume`); nothing is written.

        Raises:
            ConfigError: the backend cannot load the checkpoint as configured, saying what to set.
        """
        batch = self.clock.batch_of(start.meta.step + 1)
        resume.restore(start, self.info, self.backend, self.data.train, self.meter, self.cfg.optim, batch)
        return TrainState.from_checkpoint(start.meta)

    def warm_start(self, meta: resume.CheckpointMeta) -> TrainState:
        """The counters of a fresh run from a checkpoint's weights (loaded already): the global step
        init.step, and the data from its start or from the checkpoint's position (init.data)."""
        step = self.cfg.init.step
        if self.cfg.init.data == "continue":
            self.data.train.load_state_dict(meta.sampler)
        return TrainState(global_step=step, tokens=self.clock.samples_after(step) * self.cfg.train.seq_len)

    def set_lr(self, ledger: Ledger) -> None:
        """Write the LR of the step about to be taken into every parameter group, before it is taken:
        looked up on the device from the device's global step (a float, read back, for a backend that
        needs one), times the group's optim.groups lr_mult."""
        lr: float | torch.Tensor = self.lr_table[torch.clamp(ledger.step + 1, max=self.schedule.max_steps)]
        if not self.backend.on_device:
            lr = float(lr)
        for group in self.backend.param_groups:
            mult = self.lr_mults[str(group["name"])]
            group["lr"] = lr if mult == 1.0 else lr * mult

    def train_step(self, accum: int) -> tuple[torch.Tensor, int]:
        """Forward and backward the ``accum`` micro-batches of one optimizer step; gradients sync on the last.

        Returns the step's summed token loss on this rank (detached) and its number of predicted tokens.
        """
        t, backend = self.cfg.train, self.backend
        # Each rank backpropagates its share of the step's token mean: the backend averages over
        # ranks, and the micro-batches of one step add up, so the gradient is the global token mean's.
        scale = 1.0 / (accum * t.micro_batch_size * t.seq_len)
        loss_sum = torch.zeros((), device=self.info.device, dtype=torch.float64)
        tokens = 0
        for micro in range(accum):
            waited = time.perf_counter()
            batch = self.batches.next()
            self.meter.data_wait += time.perf_counter() - waited
            with backend.accumulate(last=micro == accum - 1):
                with backend.autocast():
                    loss = causal_lm_loss(backend.model, batch)  # queued on the device
                waited = time.perf_counter()
                self.batches.prefetch()  # the next micro-batch, while the device computes this one
                self.meter.data_wait += time.perf_counter() - waited
                backend.backward(loss * scale)
            loss_sum += loss.detach().double()
            tokens += batch[:, 1:].numel()
        return loss_sum, tokens

    @torch.no_grad()
    def evaluate(self, stop: StopSignal | None = None) -> dict[str, float] | None:
        """Token-weighted validation loss over the same held-out windows every time, reduced over ranks;
        None when ``stop`` is agreed on between two batches (a Ctrl-C does not wait for the evaluation)."""
        module = self.backend.module  # unwrapped: ZeRO 3's hooks on it gather each layer as it runs
        total = torch.zeros(2, device=self.info.device, dtype=torch.float64)
        module.eval()
        try:
            for indices in self.data.eval_indices(self.cfg, self.info):
                if stop is not None and stop.agreed():
                    return None
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

    def save(self, state: TrainState, last: bool = False) -> Path:
        """Checkpoint the state after ``state.global_step`` (collective: every rank calls it) once the previous
        background save is complete. With train.ckpt_async the write goes on in the background unless
        ``last`` (this process's last save: it completes before returning); see :meth:`complete_save`."""
        meta = {
            "tokens": state.tokens,
            "skipped_steps": state.skipped_steps,
            "sampler": self.batches.state_dict(),
            "backend": self.cfg.backend.name,
            "tokenizer_vocab": self.data.vocab_size,
            "eos_id": self.data.eos_id,
            "config": self.config,
            "max_steps": self.schedule.max_steps,
            "eval_pending": state.eval_pending,
        }
        root = self.run_dir / "checkpoints"
        keep = self.cfg.train.keep_checkpoints
        rank_state = {"meter": self.meter.state_dict()}
        self.complete_save()
        reading = self.lm_evals.steps()  # checkpoints a background evaluation still reads: not pruned yet
        background = self.cfg.train.ckpt_async and not last
        self.saving = checkpoint.save(
            root, state.global_step, self.info, self.backend, meta, rank_state, keep, reading, background
        )
        path = self.saving.path
        if not background:
            self.complete_save()
        return path

    def complete_save(self, wait: bool = True) -> None:
        """Complete the checkpoint being saved, if any (see :class:`trainer.checkpoint.Saving`), and start its
        lm-eval in the background where train.lm_eval_every says (rank 0; nothing waits on it). Not
        collective: with ``wait=False`` only when its background write has finished, else later."""
        if self.saving is None or (not wait and not self.saving.done()):
            return
        path = self.saving.complete(self.lm_evals.steps())
        if self.lm_evals.due(self.saving.step, self.end_step):
            self.lm_evals.start(path, self.saving.step)
        self.saving = None

    def settle(self, state: TrainState, ledger: Ledger) -> None:
        """Read the attempts since the last sync into ``state``: the step and tokens of each applied one,
        a warning for each skipped one, a halt where the policy says so (once the checkpoint being saved
        in the background, if any, is complete: a halted run leaves the checkpoints a synchronous one does).

        Raises:
            TrainingHalted: a non-finite norm with ``train.on_nan=halt``, or too many skips in a row.
        """
        t = self.cfg.train
        for applied, step, in_a_row, norm in ledger.read():
            if applied:
                state.global_step, state.tokens = step, state.tokens + self.clock.batch_of(step) * t.seq_len
                continue
            message = f"non-finite gradient norm ({norm}) at step {step}"
            if t.on_nan == OnNan.halt or in_a_row >= MAX_CONSECUTIVE_SKIPS:
                self.complete_save()  # the checkpoint before the halt counts, as a synchronous one would
            if t.on_nan == OnNan.halt:
                raise TrainingHalted(
                    f"{message}; stopped before the optimizer step, weights untouched. Resume from the last "
                    "checkpoint with a lower optim.lr, or set train.on_nan=skip to drop such updates"
                )
            if in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingHalted(
                    f"{message}: {in_a_row} non-finite steps in a row; the run is not recovering"
                )
            state.skipped_steps += 1
            job_log.warning("%s: update skipped (%d so far)", message, state.skipped_steps)

    def due(self, attempted: int) -> bool:
        """Whether global step ``attempted`` (if every attempt since the last sync applied) is one where
        something happens (a log record, an evaluation, a checkpoint, the end), or the last before the
        batch changes (the next step's micro-batches depend on the true step): the loop syncs there."""
        t = self.cfg.train
        return (
            attempted in (1, self.end_step, self.schedule.max_steps)
            or self.clock.batch_of(attempted + 1) != self.clock.batch_of(attempted)
            or attempted % t.log_every == 0
            or (t.eval_every > 0 and attempted % t.eval_every == 0)
            or (t.ckpt_every > 0 and attempted % t.ckpt_every == 0)
        )

    def log_step(self, recorder: Recorder, state: TrainState, grad_norm: torch.Tensor) -> None:
        """Reduce the open log interval over ranks and record it (collective: every rank calls it)."""
        step = state.global_step
        record: dict[str, Any] = {"step": step, "lr": self.schedule.lr(step), **self.meter.reduce(self.info)}
        position = self.batches.state_dict()
        # the pass over the data and how far into it, as a fraction of its samples
        epoch = position["epoch"] + position["position"] / self.data.train.num_samples
        samples = state.tokens // self.cfg.train.seq_len  # exact after a resume that changed the batch too
        record.update(grad_norm=float(grad_norm), tokens=state.tokens, samples=samples)
        record.update(epoch=epoch, global_batch=self.clock.batch_of(step))
        # Each group's LR as the optimizer read it when it stepped: what trained, not what was meant to.
        record.update({f"lr/{name}": group_lr for name, group_lr in self.backend.applied_lrs.items()})
        record["skipped_steps"] = state.skipped_steps
        if self.peak_flops:
            record["mfu"] = mfu(
                self.flops_per_token, record["tokens_per_s"], self.peak_flops, self.info.world_size
            )
        recorder.log(record)
        self.meter.reset()

    def record_step(
        self, state: TrainState, grad_norm: torch.Tensor, recorder: Recorder, stop: StopSignal
    ) -> None:
        """What global step ``state.global_step`` logs and evaluates, by ``train.log_every`` and ``eval_every``;
        an evaluation a stop signal cuts short is left pending (``state.eval_pending``)."""
        t, step = self.cfg.train, state.global_step
        if step == 1 or step % t.log_every == 0 or step == self.schedule.max_steps:
            self.log_step(recorder, state, grad_norm)
        if t.eval_every and (step % t.eval_every == 0 or step == self.schedule.max_steps):
            self.record_eval(state, recorder, stop)
        self.lm_evals.report()  # background evaluations that ended since: one line each

    def record_eval(self, state: TrainState, recorder: Recorder, stop: StopSignal) -> None:
        """Evaluate after ``state.global_step`` and record it, or leave it pending when a stop cuts it short."""
        evaluated = self.evaluate(stop)
        state.eval_pending = evaluated is None
        if evaluated is not None:
            self.last_eval = evaluated
            recorder.log({"step": state.global_step, **evaluated})
        self.meter.started = time.perf_counter()  # evaluation time is not training throughput

    def preempted(self, stop: StopSignal, path: Path, step: int) -> Outcome:
        """Say what stopped the run and where its checkpoint is (rank 0), and which background evaluations
        go on."""
        self.complete_save()
        self.lm_evals.leave()
        log.info(
            "ramp | preempted by %s: saved %s at step %d; exiting (the same command resumes from it)",
            stop.describe(),
            path,
            step,
        )
        return Outcome.preempted

    def finish_pending_eval(self, state: TrainState, recorder: Recorder, stop: StopSignal) -> bool:
        """Run the evaluation a stop signal cut short before the checkpoint ``state`` came from was saved;
        False when a stop cuts it short again (that checkpoint, still pending, stays the one in force)."""
        if not state.eval_pending:
            return True
        self.record_eval(state, recorder, stop)
        if state.eval_pending:
            log.info(
                "ramp | preempted by %s during the evaluation of step %d; exiting (its checkpoint is saved)",
                stop.describe(),
                state.global_step,
            )
        return not state.eval_pending

    def fit(self, state: TrainState, stop: StopSignal, recorder: Recorder) -> Outcome:
        """Train from ``state`` to ``train.max_steps``, or until a preemption signal (then checkpoint);
        every record goes to ``recorder``.

        The host reads the device only where something happens (:meth:`due`), and after every step with
        a backend that cannot keep the step on the device: in between, no step waits on the device.

        Raises:
            TrainingHalted: a non-finite update that ``train.on_nan`` does not let the run skip.
        """
        t = self.cfg.train
        # Profiling note: set-up leaves hundreds of thousands of long-lived objects (Hydra, transformers)
        # that every full collection would rescan while autograd churns through temporaries. Frozen,
        # they are skipped: ramp went from about 0.94x to 0.97x the bare loop's tokens/s on CPU.
        gc.collect()
        gc.freeze()
        # background evaluations' results: to wandb through the recorder (metrics.jsonl has them already)
        self.lm_evals.send = recorder.log_lm_eval if recorder.wandb is not None else None
        ledger = Ledger(state.global_step, self.info.device, halt_on_nan=t.on_nan == OnNan.halt)
        attempted = state.global_step  # the global step if every attempt since the last sync applied
        global_batch = self.clock.batch_of(1)  # what the backend was built with
        if not self.finish_pending_eval(state, recorder, stop):
            return Outcome.preempted
        while state.global_step < self.end_step:
            if self.clock.batch_of(attempted + 1) != global_batch:  # attempted is exact here (see due)
                global_batch = self.clock.batch_of(attempted + 1)
                self.backend.set_global_batch(global_batch)
            self.set_lr(ledger)  # before the step it belongs to: step k trains at the schedule's f(k)
            loss_sum, tokens = self.train_step(self.clock.grad_accum(attempted + 1))
            grad_norm, applied = self.backend.step(hold=ledger.held)
            ledger.record(grad_norm, applied)
            self.meter.add(loss_sum, tokens, applied)
            attempted += 1
            recorder.step(attempted)
            stopping = stop.agreed()
            if not (stopping or self.due(attempted) or not self.backend.on_device):
                continue
            self.settle(state, ledger)
            caught_up = state.global_step == attempted  # else a dropped update moved the cadence
            self.complete_save(wait=False)  # a background save whose write has finished counts from now
            if caught_up:
                self.record_step(state, grad_norm, recorder, stop)
            if stopping or state.eval_pending:
                return self.preempted(stop, self.save(state, last=True), state.global_step)
            attempted = state.global_step
            if caught_up and ((t.ckpt_every and attempted % t.ckpt_every == 0) or attempted == self.end_step):
                path = self.save(state, last=attempted == self.end_step)
                if attempted < self.end_step and stop.agreed():  # a signal during that save: it is the one
                    return self.preempted(stop, path, attempted)
        if self.end_step < self.schedule.max_steps:
            log.info(
                "ramp | stopped at train.stop_at=%s: step %d of the schedule's %d, checkpoint saved; the same "
                "command with a later train.stop_at (or none) continues exactly",
                t.stop_at,
                self.end_step,
                self.schedule.max_steps,
            )
        self.wind_down()
        return Outcome.finished

    def wind_down(self) -> None:
        """The end of a finished run: its last save complete, the background evaluations waited for (up to a
        limit, before the recorder closes), and the checkpoints they spared pruned to train.keep_checkpoints."""
        self.complete_save()
        self.lm_evals.finish()
        if self.info.is_main:
            checkpoint.prune(
                self.run_dir / "checkpoints", self.cfg.train.keep_checkpoints, self.lm_evals.steps()
            )
