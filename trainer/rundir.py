"""The run folder: what a run may do with it is decided before anything is written.

``run.resume=auto`` continues the newest complete checkpoint in run.dir; ``never`` refuses a folder
that holds a run; a PATH resumes from that checkpoint. A folder that holds a run without a usable
checkpoint is never overwritten, except by a restart of the same job (torchrun ``--max-restarts``
or a Slurm requeue), which starts it over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer import checkpoint
from trainer.config import Config, ConfigError, ResumeMode


@dataclass
class RunPlan:
    run_dir: Path
    candidates: list[Path] = field(default_factory=list)
    """Checkpoints to resume from, newest first; empty for a fresh start."""
    explicit: bool = False
    """The user named the checkpoint (run.resume=PATH): if it is unusable, fail rather than fall back."""

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def is_restart() -> bool:
    """A restart of the same job by torchrun or Slurm."""
    return (
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        or int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    )


def _resume_path(path: Path) -> list[Path]:
    if (path / checkpoint.META).exists() or path.name.startswith(checkpoint.PREFIX):
        return [path]
    for root in (path / "checkpoints", path):
        found = checkpoint.complete_checkpoints(root)
        if found:
            return found
    raise ConfigError(f"run.resume={path} holds no checkpoint; point it at a checkpoints/step_<N> folder")


def check(cfg: Config) -> RunPlan:
    """Runs on every rank before the process group exists; writes nothing."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={run_dir} exists and is not a folder; set run.dir to a folder path")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if cfg.run.resume not in (ResumeMode.auto.value, ResumeMode.never.value):
        candidates = _resume_path(Path(cfg.run.resume))
        inside = run_dir.resolve() in candidates[0].resolve().parents
        if occupied and not inside:
            raise ConfigError(
                f"run.dir={run_dir} already holds another run; choose a new run.name for a run that "
                f"starts from run.resume={cfg.run.resume}"
            )
        return RunPlan(run_dir, candidates, explicit=True)
    if not occupied:
        return RunPlan(run_dir)
    if cfg.run.resume == ResumeMode.never.value:
        raise ConfigError(
            f"run.dir={run_dir} already exists and run.resume=never; choose a new run.name (or run.dir)"
        )
    candidates = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    if not candidates and not is_restart():
        raise ConfigError(
            f"run.dir={run_dir} already holds a run with no checkpoint to resume from; choose a new "
            "run.name (or run.dir), or move that folder away"
        )
    return RunPlan(run_dir, candidates)


def create(run_dir: Path, config: dict[str, Any]) -> None:
    """Called on global rank 0 only: the folder and its resolved config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint.remove_partial_saves(run_dir / "checkpoints")
