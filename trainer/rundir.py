"""The run folder: checked before anything is written, created and filled by global rank 0 only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trainer.config import Config, ConfigError, ResumeMode


def check(cfg: Config) -> Path:
    """Refuse to start in a folder that holds another run; runs on every rank, writes nothing."""
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir={run_dir} exists and is not a folder; set run.dir to a folder path")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if cfg.run.resume == ResumeMode.never.value:
            raise ConfigError(
                f"run.dir={run_dir} already exists and run.resume=never; choose a new run.name (or run.dir)"
            )
        raise ConfigError(
            f"run.dir={run_dir} already holds a run with no checkpoint to resume from; choose a new "
            "run.name (or run.dir), or move that folder away"
        )
    return run_dir


def create(run_dir: Path, config: dict[str, Any]) -> None:
    """Called on global rank 0 only: the folder and its resolved config.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
