"""Sinks for metrics: metrics.jsonl, wandb, tensorboard and the console. Only global rank 0 holds any."""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trainer.observe.console import Progress

if TYPE_CHECKING:
    from trainer.observe.wandb_sink import WandbSink

log = logging.getLogger("ramp")


class Sink(Protocol):
    """A destination for metric records."""

    def write(self, record: dict[str, Any]) -> None:
        """Write one record: metrics by name, with the global step under "step"."""

    def close(self) -> None:
        """Flush what is buffered and release the destination."""


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to the JSONL file ``path`` as one line in one ``write`` to a file opened for
    appending, under an exclusive lock: a background evaluation (``train.lm_eval_every``) appends to the
    run's metrics.jsonl while training does, and neither can split the other's line."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)  # releases the lock


class JsonlSink:
    """metrics.jsonl: one JSON object per line, written as it comes so a crash loses nothing logged."""

    def __init__(self, path: Path, start_step: int) -> None:
        keep_through(path, start_step)
        path.touch()
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        """Append the record as one whole line (:func:`append_line`)."""
        append_line(self.path, record)

    def close(self) -> None:
        """Nothing stays open between records."""


def keep_through(path: Path, step: int) -> None:
    """Drop records past ``step``: a resumed run rewrites the steps after its checkpoint exactly once."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        staging = path.with_suffix(".jsonl.tmp")
        staging.write_text("".join(kept), encoding="utf-8")
        os.replace(staging, path)


class Recorder:
    """Everything that leaves the trainer as metrics goes through here."""

    def __init__(
        self,
        is_main: bool,
        run_dir: Path,
        config: dict[str, Any],
        logger_cfg: Any,
        max_steps: int,
        start_step: int,
    ) -> None:
        self.sinks: list[Sink] = []
        self.progress: Progress | None = None
        self.wandb: WandbSink | None = None
        """The wandb sink among ``sinks`` (rank 0, logger.wandb.mode not disabled)."""
        if not is_main:
            return
        # metrics.jsonl first: it drops the steps after the checkpoint, and wandb re-sends from it.
        self.sinks.append(JsonlSink(run_dir / "metrics.jsonl", start_step))
        if logger_cfg.wandb.mode != "disabled":
            from trainer.observe.wandb_sink import WandbSink

            run_name = config["run"]["name"]
            self.wandb = WandbSink(run_dir, logger_cfg.wandb, run_name, config, start_step)
            self.sinks.append(self.wandb)
        if logger_cfg.tensorboard:
            from trainer.observe.tensorboard_sink import TensorboardSink

            self.sinks.append(TensorboardSink(run_dir, config, start_step))
        if logger_cfg.progress != "off":
            self.progress = Progress(logger_cfg.progress, max_steps, start_step)

    def step(self, step: int) -> None:
        """Move the progress bar to optimizer step ``step``."""
        if self.progress is not None:
            self.progress.advance(step)

    def log(self, record: dict[str, Any]) -> None:
        """Send a record to every sink; show a training step on the progress display, an eval as a line."""
        for sink in self.sinks:
            sink.write(record)
        if self.progress is not None and "loss" in record:
            self.progress.show(record["step"], record)
        elif "val_loss" in record:
            log.info(
                "step %d | val_loss %.4f | val_ppl %.2f",
                record["step"],
                record["val_loss"],
                record["val_ppl"],
            )

    def log_lm_eval(self, record: dict[str, Any]) -> None:
        """A background downstream evaluation's record, which its own process appended to metrics.jsonl:
        to wandb, on its ``lm_eval/step`` axis (:meth:`WandbSink.write_lm_eval`)."""
        if self.wandb is not None:
            self.wandb.write_lm_eval(record)

    def close(self) -> None:
        """Close the progress display and every sink."""
        if self.progress is not None:
            self.progress.close()
        for sink in self.sinks:
            sink.close()
        self.sinks, self.wandb = [], None


def perplexity(loss: float) -> float:
    """exp(``loss``) for a loss in nats per token; inf from a loss of 50 up."""
    return math.exp(loss) if loss < 50 else float("inf")
