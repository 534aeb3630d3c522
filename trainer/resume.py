"""Where a run starts: the run folder, the checkpoint it continues, and what the resume restores.

- **The plan** (:func:`plan`, every rank, before the process group exists, writing nothing):
  ``run.resume=auto`` continues the newest complete checkpoint in run.dir; ``never`` refuses a
  folder that holds a run; a PATH resumes from that checkpoint. A folder that holds a run without a
  complete checkpoint (killed before or during its first save) is started over by the same run (its
  config.yaml says so, or torchrun ``--max-restarts`` or a Slurm requeue restarts it) and never
  overwritten by another.
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
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from trainer import checkpoint, distributed, sweep
from trainer.config import Config, OptimConfig, ResumeMode, from_tree, resume_facts
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.models import apply_hyperparameters
from trainer.observe import job_log, redact
from trainer.schedules import Schedule
from trainer.schema import OnResume

log = logging.getLogger("ramp")


@dataclass
class RunPlan:
    """What a run may do with its folder, decided before anything is written."""

    run_dir: Path
    candidates: list[Path] = field(default_factory=list)
    """Checkpoints to resume from, newest first; empty for a fresh start."""
    explicit: bool = False
    """The user named the checkpoint (run.resume=PATH): if it is unusable, fail rather than fall back."""
    starting_over: bool = False
    """run.dir holds this run without a complete checkpoint (killed before its first save ended)."""
    branching: bool = False
    """The run starts a branch off branch.checkpoint (run.dir holds nothing yet)."""


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
    # A one-point sweep's run folder is its sweep's folder, which holds Hydra's own (sweep.HYDRA_DIR).
    occupied = run_dir.is_dir() and any(p.name != sweep.HYDRA_DIR for p in run_dir.iterdir())
    _require_outside(run_dir, cfg)
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
        return _fresh(run_dir, cfg)
    if cfg.run.resume == ResumeMode.never.value:
        raise ConfigError(
            f"run.dir={run_dir} already exists and run.resume=never; choose a new run.name (or run.dir)"
        )
    candidates = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    if candidates:
        return RunPlan(run_dir, candidates)
    if not is_restart() and not _same_run(run_dir, cfg):
        raise ConfigError(
            f"run.dir={run_dir} already holds another run with no checkpoint to resume from; choose a new "
            "run.name (or run.dir), or move that folder away"
        )
    return _fresh(run_dir, cfg, starting_over=True)  # a branch killed before its first save branches again


def _fresh(run_dir: Path, cfg: Config, starting_over: bool = False) -> RunPlan:
    """A start with nothing of its own to resume: from scratch, or a branch off branch.checkpoint."""
    if cfg.branch.checkpoint is None:
        return RunPlan(run_dir, starting_over=starting_over)
    parent = Path(cfg.branch.checkpoint)
    return RunPlan(run_dir, [parent], explicit=True, starting_over=starting_over, branching=True)


def _require_outside(run_dir: Path, cfg: Config) -> None:
    """A branch, or a run from another's weights, writes only into its own folder: never the folder of the
    checkpoint it starts from."""
    for key, value in (("branch.checkpoint", cfg.branch.checkpoint), ("init.weights", cfg.init.weights)):
        if value is None:
            continue
        parent = Path(value).resolve()
        if (
            run_dir.resolve() == parent.parent.parent or run_dir.resolve() in parent.parents
        ):  # <run>/checkpoints/step_N
            raise ConfigError(
                f"run.dir={run_dir} is the folder of {key}={value}: the new run needs its own folder; choose a "
                "new run.name"
            )


def _same_run(run_dir: Path, cfg: Config) -> bool:
    """Whether run.dir's config.yaml is this configuration, but for keys that do not change the math."""
    recorded = run_dir / "config.yaml"
    if not recorded.is_file():
        return False
    saved = yaml.safe_load(recorded.read_text())
    changes = config_changes(saved, redact(cfg.to_dict())) if isinstance(saved, dict) else None
    return changes is not None and all(change.effect is OnResume.applies for change in changes)


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
    max_steps: int = 0
    """The run's length in steps when it was saved (0: not recorded, a checkpoint of an older ramp)."""
    eval_pending: bool = False
    """A stop signal cut short the evaluation due at ``step``: the resumed run evaluates first."""


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
    reason = checkpoint.verify(folder, meta.files)
    if reason is None and (folder / "dcp").is_dir():
        from trainer.backends.state import metadata_problem

        reason = metadata_problem(folder)
    return reason


@dataclass(frozen=True)
class Start:
    """The checkpoint a run resumes from."""

    path: Path
    meta: CheckpointMeta
    branching: bool = False
    """A branch's first start, off another run's checkpoint (branch.*)."""


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
        if chosen is None and run.candidates:  # a run's work is never dropped without the user's word
            chosen = (
                f"!auto: every checkpoint in {run.candidates[0].parent} is unusable (see the warnings above); "
                "nothing was changed. Restore one, or start this run over by moving that folder away, or "
                "start a new run (another run.name)"
            )
    chosen = distributed.broadcast_object(chosen, info)  # type: ignore[assignment]
    if chosen is None:
        if run.starting_over:
            job_log.info("ramp | %s holds no complete checkpoint of this run: starting over", run.run_dir)
        return None
    if chosen.startswith("!"):
        raise ConfigError(f"{'branch.checkpoint' if run.branching else 'run.resume'}={chosen[1:]}")
    return Start(Path(chosen), read_meta(Path(chosen)), branching=run.branching)


class LoadsCheckpoints(Protocol):
    """A backend as :func:`restore` uses it."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups."""

    def load(self, folder: Path, meta: CheckpointMeta, info: DistInfo) -> None:
        """Restore the model and optimizer state the backend saved into ``folder``."""


class Stateful(Protocol):
    """Anything that saves and restores its state as a dict."""

    def state_dict(self) -> dict[str, Any]:
        """The state to save."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def restore(
    start: Start,
    info: DistInfo,
    backend: LoadsCheckpoints,
    sampler: Stateful,
    meter: Stateful,
    optim: OptimConfig,
    global_batch: int | None = None,
) -> None:
    """Restore the backend's state, this rank's RNGs and open log interval, and the data position.

    ``global_batch``: the samples of this run's next step, for the warning on another number of ranks.

    The optimizer's hyperparameters then come from ``optim`` (this run's config), not from the
    checkpoint: loading an optimizer's state dict brings back the values it was saved with, and a
    record must never claim one value while another trains.

    Raises:
        ConfigError: the checkpoint cannot be loaded by this backend as configured (another ZeRO stage,
            shards for another rank count), saying what to set.
        pickle.UnpicklingError: a file holds anything but tensors and plain data (never executed).
    """
    meta = start.meta
    backend.load(start.path, meta, info)
    apply_hyperparameters(backend.param_groups, optim)
    rank_file = start.path / f"rank_{info.rank}.pt"
    if meta.world_size == info.world_size and rank_file.exists():
        rank_state = torch.load(rank_file, weights_only=True, map_location="cpu")
        checkpoint.set_rng_state(rank_state.pop("rng"))
        if "meter" in rank_state:
            meter.load_state_dict(rank_state["meter"])
    else:
        job_log.warning(
            "resuming a %d-rank checkpoint on %d rank%s: data order continues, per-rank RNG streams restart%s",
            meta.world_size,
            info.world_size,
            "" if info.world_size == 1 else "s",
            _batch_change(meta, global_batch),
        )
    sampler.load_state_dict(meta.sampler)


def _batch_change(meta: CheckpointMeta, global_batch: int | None) -> str:
    """``; the global batch changes from A to B samples a step (...)`` when it does, else nothing."""
    try:
        before = from_tree(meta.config).batching(meta.world_size).batch_of(meta.step + 1)
    except (ValueError, ConfigError, KeyError, TypeError):  # a checkpoint of an older ramp
        return ""
    if global_batch is None or before == global_batch:
        return ""
    return (
        f"; the global batch changes from {before} to {global_batch} samples a step (to keep it, scale "
        "train.grad_accum_steps or train.micro_batch_size inversely to the ranks)"
    )


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _declared(key: str, facts: dict[str, OnResume]) -> OnResume | None:
    """The fact of ``key`` or of the declared key it lies under (``model.extra.n_inner``: ``model.extra``)."""
    while key:
        if key in facts:
            return facts[key]
        key = key.rpartition(".")[0]
    return None


@dataclass(frozen=True)
class Change:
    """One key whose value differs between a checkpoint's config and this run's."""

    key: str
    old: Any
    new: Any
    effect: OnResume
    """What the change does (the key's schema metadata)."""

    def __str__(self) -> str:
        return f"{self.key}: {self.old} -> {self.new}"


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Every key whose value differs between a checkpoint's config and this run's, with its effect.

    The effect is the key's schema metadata (:func:`trainer.schema.setting`), looked up in the current
    config's schemas, else in the saved one's (a key only that one has). Keys no schema declares (a
    checkpoint of an older ramp) are left out.
    """
    old, new = _flatten(saved), _flatten(current)
    facts = resume_facts(saved) | resume_facts(current)
    changes = []
    for key in sorted(set(old) | set(new)):
        effect = _declared(key, facts)
        if old.get(key) != new.get(key) and effect is not None:
            changes.append(Change(key, old.get(key), new.get(key), effect))
    return changes


def accept(start: Start, current: dict[str, Any], default_folder: bool = False) -> list[Change]:
    """The changes a resume from ``start`` makes, once none of them is one the checkpoint cannot honour.

    Runs on every rank before anything is written. ``default_folder``: neither run.name nor run.dir was
    given, so the run folder is the model's default one, which another experiment may hold.

    Raises:
        ConfigError: a refused change (model shape, data, parameter groups, backend), naming the key, both
            values and what to do instead; in the default folder, any change of the math.
    """
    changes = config_changes(start.meta.config, current)
    if start.branching:  # the branch keys are the branch itself, not a change of the parent's settings
        _refuse_a_branch_of_a_branch(start)
        changes = [change for change in changes if not change.key.startswith("branch.")]
        _refuse_a_different_curve(start, changes)
    elif default_folder:
        _refuse_another_experiment(start, changes, str(current["run"]["name"]))
    # A key both configs have comes first: backend.name, rather than a key only one backend declares.
    refused = sorted(
        (change for change in changes if change.effect is OnResume.refused),
        key=lambda change: (change.old is None or change.new is None, change.key),
    )
    if refused:
        first, others = refused[0], [change.key for change in refused[1:]]
        more = f" (and {', '.join(others)})" if others else ""
        raise ConfigError(
            f"run.resume: {first.key} is {first.old} in {start.path} but {first.new} here{more}, and a resumed "
            f"run cannot change it; keep {_keep(first)}, or start a new run from scratch "
            "(a new run.dir with run.resume=never)"
        )
    return changes


def _keep(change: Change) -> str:
    """The override that keeps a refused change's old value (a backend is chosen by its group)."""
    return f"backend={change.old}" if change.key == "backend.name" else f"{change.key}={change.old}"


def _refuse_another_experiment(start: Start, changes: list[Change], name: str) -> None:
    """The run folder is the default one (``outputs/<model>``) and its run trained with other math: a
    different command, not this one resumed. Resuming it with changes needs the folder named.

    Raises:
        ConfigError: naming the first key that differs, both values, and the two ways on.
    """
    differ = [change for change in changes if change.effect is not OnResume.applies]
    if not differ:
        return
    first, more = (
        differ[0],
        f" (and {len(differ) - 1} more key{'s' if len(differ) > 2 else ''})" if differ[1:] else "",
    )
    resumable = all(change.effect is not OnResume.refused for change in differ)
    way = f", or pass run.name={name} to resume that run with these changes" if resumable else ""
    raise ConfigError(
        f"run.name: the default run folder {start.path.parent.parent} holds another experiment ({first.key} is "
        f"{first.old} there, {first.new} here{more}); give this one its own run.name=NAME{way}"
    )


def _refuse_a_branch_of_a_branch(start: Start) -> None:
    """A branch's own checkpoints trained on its decay, which a branch of them would not follow.

    Raises:
        ConfigError: the checkpoint's run was itself a branch, naming the run it came from.
    """
    grandparent = (start.meta.config.get("branch") or {}).get("checkpoint")
    if grandparent is not None:
        raise ConfigError(
            f"branch.checkpoint={start.path} is a checkpoint of a branch (of {grandparent}): after its branch "
            "step it trained on that branch's decay, which a new branch would not start from; branch off a "
            "checkpoint of the run it came from"
        )


CURVE_KEYS = ("train.max_steps", "train.max_tokens", "train.max_samples", "train.epochs", "optim.lr")
"""Besides schedule.*, the keys that decide the LR a parent trained at."""


def _refuse_a_different_curve(start: Start, changes: list[Change]) -> None:
    """A branch decays from the LR its parent trained at: the schedule's keys, the run's length and
    optim.lr must be the parent's, or the branch would start from another curve.

    Raises:
        ConfigError: one of them differs, naming it and both values.
    """
    for change in changes:
        if change.key.startswith("schedule.") or change.key in CURVE_KEYS:
            raise ConfigError(
                f"branch.checkpoint: {change.key} is {change.old} in {start.path} but {change.new} here; a branch "
                f"follows its parent's schedule up to the branch step, so keep {change.key}={change.old} (the "
                "decay comes from branch.*)"
            )


def report_changes(
    start: Start, changes: list[Change], schedule: Schedule, samples_per_epoch: int | None = None
) -> None:
    """Say once (rank 0) every change that applies, what it does to the LR and the schedule's lengths,
    and where the run continues."""
    step, max_steps = start.meta.step, schedule.max_steps
    if start.branching:
        job_log.info(
            "ramp | branching off %s at step %d (LR %.4g): the decay ends at step %d (LR %.4g)",
            start.path,
            step,
            schedule.lr(max(step, 1)),
            max_steps,
            schedule.lr(max_steps),
        )
    for change in changes:
        note = ""
        if change.key == "train.max_steps" and step < max_steps:
            note = (
                f" (train.max_steps is now {max_steps}: the schedule is recomputed over {max_steps} steps, so "
                f"step {step + 1} trains at LR {schedule.lr(step + 1):.4g}, the curve a {max_steps}-step run "
                "follows there)"
            )
        if change.effect is OnResume.changes_math:
            job_log.warning("changed on resume, and it changes the math: %s%s", change, note)
        else:
            job_log.info("ramp | changed on resume: %s", change)
    if not start.branching and any(change.effect is OnResume.changes_math for change in changes):
        _report_the_curve(start, schedule, samples_per_epoch)
    job_log.info("ramp | resuming from %s at step %d", start.path, step)


def _report_the_curve(start: Start, schedule: Schedule, samples_per_epoch: int | None) -> None:
    """The schedule the checkpoint trained under, rebuilt from its recorded config, against this one:
    every length that changed, and the LR the last step trained at against the next step's."""
    try:
        before = from_tree(start.meta.config).schedule_for(start.meta.world_size, samples_per_epoch)
    except (ValueError, ConfigError):  # a checkpoint of an older ramp, or lengths in epochs without data
        return
    lengths = {"length": "max_steps", "warmup": "warmup_steps", "decay start": "decay_start"}
    changed = [
        f"{name} {getattr(before, attr)} -> {getattr(schedule, attr)} steps"
        for name, attr in lengths.items()
        if getattr(before, attr) != getattr(schedule, attr)
    ]
    if changed:
        job_log.warning("schedule lengths changed on resume: %s", ", ".join(changed))
    step, old, new = start.meta.step, before.lr(start.meta.step + 1), schedule.lr(start.meta.step + 1)
    if math.isclose(old, new, rel_tol=1e-12, abs_tol=0.0):
        return
    factor = f"x{new / old:.3g} the {old:.4g} the checkpoint's schedule gives it" if old else "up from 0"
    job_log.warning(
        "the LR on resume: step %d trained at %.4g; step %d trains at %.4g, %s",
        step,
        before.lr(step),
        step + 1,
        new,
        factor,
    )


def nothing_to_train(
    start: Start, max_steps: int, stop_step: int | None = None, default_folder: bool = False
) -> bool:
    """Whether the checkpoint is already at (or past) ``train.max_steps``, or train.stop_at's step: then
    nothing is written. In the ``default_folder``, training further is a changed command, so the advice
    names the folder too."""
    named = f" with run.name={start.meta.config.get('run', {}).get('name')}" if default_folder else ""
    if stop_step is not None and stop_step < max_steps and start.meta.step >= stop_step:
        job_log.info(
            "ramp | %s is at step %d, already at or past train.stop_at's step %d: nothing to train, nothing written; "
            "raise or drop train.stop_at%s to train further",
            start.path,
            start.meta.step,
            stop_step,
            named,
        )
        return True
    if start.meta.step < max_steps:
        return False
    job_log.info(
        "ramp | %s already reached train.max_steps=%d (it is at step %d): nothing to train, nothing "
        "written; raise train.max_steps%s to train further",
        start.path,
        max_steps,
        start.meta.step,
        named,
    )
    return True


HISTORY = "history.jsonl"
"""The run folder's append-only record of accepted starts, one JSON object per line."""


def record_start(
    run_dir: Path,
    config: dict[str, Any],
    start: Start | None,
    changes: list[Change],
    weights: tuple[Path, CheckpointMeta] | None = None,
    clock: tuple[int, int] | None = None,
) -> None:
    """Called on global rank 0 once a start is accepted: config.yaml says what trains from now on, and
    history.jsonl gains one record (time, the step it starts at, the checkpoint, the changed keys; the
    parent of a branch; the checkpoint whose ``weights`` a fresh run started from; with ``clock``, the
    world size and the samples in an epoch, which with the config give every step's LR)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint.remove_partial_saves(run_dir / "checkpoints")
    kind = (
        "fresh" if start is None else "branched" if start.branching else "changed" if changes else "resumed"
    )
    if start is None and weights is not None:
        kind = "weights"
    record: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "start": kind,
        "step": start.meta.step if start else 0,
        "checkpoint": str(start.path) if start else None,
        "changed": {change.key: [change.old, change.new] for change in changes},
    }
    if clock is not None:
        record["world_size"], record["samples_per_epoch"] = clock
    if start is not None and start.branching:  # the lineage: which run, which checkpoint, which step
        record["parent"] = {
            "run": str(start.path.resolve().parent.parent),
            "checkpoint": str(start.path.resolve()),
            "step": start.meta.step,
            "name": start.meta.config.get("run", {}).get("name"),
        }
    if start is None and weights is not None:
        folder, meta = weights
        init = config.get("init", {})
        record["step"] = init.get("step", 0)
        record["weights"] = {"checkpoint": str(folder.resolve()), "step": meta.step, "data": init.get("data")}
    with open(run_dir / HISTORY, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
