"""Where a run starts: the run folder, the checkpoint it continues, and what the resume restores.

- **The plan** (:func:`plan`, every rank, before the process group exists, writing nothing):
  ``run.resume=auto`` continues the newest complete checkpoint in run.dir; ``never`` refuses a
  folder that holds a run; a PATH resumes from that checkpoint. A folder that holds a run without a
  usable checkpoint is never overwritten, except by a restart of the same job (torchrun
  ``--max-restarts`` or a Slurm requeue), which starts it over.
- **The choice** (:func:`choose`): global rank 0 verifies the candidates newest first against their
  checksums, falls back past a damaged one (saying so), and every rank gets the same answer.
- **The metadata** (:class:`CheckpointMeta`, :func:`read_meta`): the one reader of ``meta.json``.
- **The restore** (:func:`restore`): the backend's model and optimizer, this rank's RNGs and open
  log interval, the data position; the global step and counters come from the metadata.
- **The report** (:func:`report_changes`): every setting that changes the math, once each.

The on-disk format itself (atomic save, checksums, ``latest``, pruning) is :mod:`trainer.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from trainer import checkpoint, distributed
from trainer.config import Config, ResumeMode, math_keys
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.schedules import Schedule

log = logging.getLogger("ramp")


@dataclass
class RunPlan:
    """What a run may do with its folder, decided before anything is written."""

    run_dir: Path
    candidates: list[Path] = field(default_factory=list)
    """Checkpoints to resume from, newest first; empty for a fresh start."""
    explicit: bool = False
    """The user named the checkpoint (run.resume=PATH): if it is unusable, fail rather than fall back."""


def is_restart() -> bool:
    """Whether this process is a restart of the same job by torchrun or Slurm."""
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


def plan(cfg: Config) -> RunPlan:
    """Where this run starts; runs on every rank before the process group exists and writes nothing.

    Raises:
        ConfigError: run.dir is a file, holds another run, or holds a run with nothing to resume.
    """
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


def create_run_dir(run_dir: Path, config: dict[str, Any]) -> None:
    """Called on global rank 0 only: the folder, its resolved config.yaml, no half-written saves."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint.remove_partial_saves(run_dir / "checkpoints")


@dataclass(frozen=True)
class CheckpointMeta:
    """A checkpoint's ``meta.json``: what the loop saved, then what the save itself added."""

    step: int
    """The global step the checkpoint was taken after."""
    world_size: int
    """Ranks that wrote it."""
    files: dict[str, str]
    """CRC-32 of every other file, by path relative to the checkpoint folder."""
    tokens: int
    """Tokens trained on through ``step``, summed over ranks."""
    skipped_steps: int
    """Updates dropped for a non-finite gradient norm through ``step``."""
    sampler: dict[str, int]
    """The training sampler's position (pass and position in it)."""
    backend: str
    """``backend.name`` of the run that wrote it."""
    tokenizer_vocab: int
    """The tokenizer's vocabulary size (the model's is this padded, unless set)."""
    eos_id: int
    """The end-of-document token id."""
    config: dict[str, Any]
    """The resolved configuration of the run that wrote it (secrets masked)."""
    format: int = checkpoint.FORMAT_VERSION
    """The checkpoint format's version."""


def read_meta(folder: Path) -> CheckpointMeta:
    """The typed ``meta.json`` of a checkpoint folder.

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not JSON, or not a ramp checkpoint's metadata (a key missing or unknown).
    """
    tree = json.loads((folder / checkpoint.META).read_text())
    try:
        return CheckpointMeta(**tree)
    except TypeError as err:
        raise ValueError(f"not a ramp checkpoint's metadata ({err})") from None


def problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be used (missing, unreadable, truncated, corrupted), or None when whole."""
    if not (folder / checkpoint.META).is_file():
        return f"{checkpoint.META} is missing"
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as err:
        return f"{checkpoint.META} is unreadable ({err})"
    return checkpoint.verify(folder, meta.files)


@dataclass(frozen=True)
class Start:
    """The checkpoint a run resumes from."""

    path: Path
    meta: CheckpointMeta


def choose(run: RunPlan, info: DistInfo) -> Start | None:
    """Global rank 0 verifies the candidates newest first; every rank gets its choice (None: fresh start).

    Raises:
        ConfigError: the checkpoint the user named (run.resume=PATH) is unusable, saying why.
    """
    chosen: str | None = None
    if info.is_main:
        for path in run.candidates:
            reason = problem(path)
            if reason is None:
                chosen = str(path)
                break
            if run.explicit:
                chosen = f"!{path}: {reason}"
                break
            log.warning("checkpoint %s is unusable: %s; trying the previous one", path, reason)
    chosen = distributed.broadcast_object(chosen, info)  # type: ignore[assignment]
    if chosen is None:
        return None
    if chosen.startswith("!"):
        raise ConfigError(f"run.resume={chosen[1:]}")
    return Start(Path(chosen), read_meta(Path(chosen)))


class LoadsCheckpoints(Protocol):
    """A backend as :func:`restore` uses it."""

    name: str

    def load(self, folder: Path, meta: CheckpointMeta, info: DistInfo) -> None:
        """Restore the model and optimizer state the backend saved into ``folder``."""


class Stateful(Protocol):
    """Anything that saves and restores its state as a dict."""

    def state_dict(self) -> dict[str, Any]:
        """The state to save."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def restore(
    start: Start, info: DistInfo, backend: LoadsCheckpoints, sampler: Stateful, meter: Stateful
) -> None:
    """Restore the backend's state, this rank's RNGs and open log interval, and the data position.

    Raises:
        ConfigError: the checkpoint was written by another backend (or cannot be loaded by this one).
        pickle.UnpicklingError: a file holds anything but tensors and plain data (never executed).
    """
    meta = start.meta
    if meta.backend != backend.name:
        raise ConfigError(
            f"run.resume: {start.path} was written by backend={meta.backend}; resume it with "
            f"backend={meta.backend}"
        )
    backend.load(start.path, meta, info)
    rank_file = start.path / f"rank_{info.rank}.pt"
    if meta.world_size == info.world_size and rank_file.exists():
        rank_state = torch.load(rank_file, weights_only=True, map_location="cpu")
        checkpoint.set_rng_state(rank_state.pop("rng"))
        if "meter" in rank_state:
            meter.load_state_dict(rank_state["meter"])
    else:
        log.warning(
            "resuming a %d-rank checkpoint on %d ranks: data order continues, per-rank RNG streams restart",
            meta.world_size,
            info.world_size,
        )
    sampler.load_state_dict(meta.sampler)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _declared(key: str, facts: dict[str, bool]) -> bool | None:
    """The fact of ``key`` or of the declared key it lies under (``model.extra.n_inner``: ``model.extra``)."""
    while key:
        if key in facts:
            return facts[key]
        key = key.rpartition(".")[0]
    return None


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Settings that change the math between a checkpoint's config and this run's, as ``key: old -> new``.

    Whether a key changes the math is its schema field's metadata (:func:`trainer.schema.setting`),
    looked up in the current config's schemas, else in the saved one's (a key only that one has).
    """
    old, new = _flatten(saved), _flatten(current)
    facts = math_keys(saved) | math_keys(current)
    changed = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and _declared(key, facts):
            changed.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    return changed


def report_changes(start: Start, current: dict[str, Any], schedule: Schedule) -> None:
    """Warn once about every setting that changes the math, and say where the run continues."""
    step, max_steps = start.meta.step, schedule.max_steps
    for change in config_changes(start.meta.config, current):
        if change.startswith("train.max_steps:") and step < max_steps:
            change += (
                f" (train.max_steps is now {max_steps}: the schedule is recomputed over {max_steps} steps, so "
                f"step {step + 1} trains at LR {schedule.lr(step + 1):.4g}, the curve a {max_steps}-step run "
                "follows there)"
            )
        log.warning("resuming with a changed setting that changes the math: %s", change)
    if step >= max_steps:
        log.info(
            "ramp | %s already reached train.max_steps=%d; raise it to train further", start.path, max_steps
        )
    else:
        log.info("ramp | resuming from %s at step %d", start.path, step)
