"""Hydra multirun sweeps: every job in its own run folder, all ranks together, the sweep's failures named.

``python -m trainer.main -m 'optim.lr=1e-3,2e-3'`` (or the same under ``torchrun``) runs each job of the
sweep in turn on every rank of one process group. This module decides, before a job's config is
checked, where the job writes and how it is named:

- **The folder.** Each job's ``run.name`` becomes ``<sweep name>/<swept values>`` (the sweep name is
  ``run.name``, default the model's name), so its folder is ``outputs/<sweep name>/optim.lr=0.001``:
  named from the swept keys only, sorted, as Hydra's ``override_dirname`` is. A ``run.dir`` given
  on the command line wins, when it differs between jobs (a swept key interpolated in it); a fixed one
  that every job would share is refused.
- **The group.** Each job's wandb group is the sweep's name (unless ``logger.wandb.group`` is given).
- **Hydra's own folder.** The sweep's ``multirun.yaml`` goes under ``outputs/<sweep name>/.hydra``,
  written by rank 0 alone (:func:`hydra_sweep_dir_override` sends the other ranks' copy to a
  temporary folder).

A resumed sweep is the same command again: a finished job finds nothing to train, an interrupted one
resumes its newest checkpoint, the rest start.

With ``hydra/launcher=ramp_slurm`` each job is a Slurm job instead (:mod:`trainer.slurm_sweep`): its
process on the node runs under submitit's command, so :func:`current_job` reads the sweep's overrides
from its ``multirun.yaml``; the folder and group are computed here all the same.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import ConfigError


@dataclass(frozen=True)
class Job:
    """One job of a running Hydra multirun."""

    number: int
    """0-based, in the sweep's order."""
    total: int
    """Jobs in the sweep."""
    overrides: tuple[str, ...]
    """This job's overrides, as Hydra expanded them."""
    swept: tuple[str, ...]
    """This job's overrides of the swept keys, sorted: its folder's name."""

    def describe(self) -> str:
        """``sweep job 2 of 3 (optim.lr=0.002)``, for messages."""
        return f"sweep job {self.number + 1} of {self.total} ({', '.join(self.swept) or 'no swept key'})"


HYDRA_DIR = ".hydra"
"""Hydra's folder inside a sweep's folder (``multirun.yaml``, and submitit's job files on Slurm); a
one-point sweep's run folder is the sweep's folder, so this one is no part of the run (:func:`trainer.resume.plan`)."""

SUBMITIT_EXECUTOR = "SUBMITIT_EXECUTOR"
"""Set in every job that Hydra's submitit launcher runs (``slurm`` on a Slurm node): see :mod:`trainer.slurm_sweep`."""


def command_overrides(argv: list[str]) -> list[Any]:
    """The command line's overrides, parsed by Hydra's parser (``-m`` sweeps included)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    given = [arg for arg in argv[1:] if "=" in arg and not arg.startswith("-")]
    return list(OverridesParser.create().parse_overrides(given))


def _saved_overrides(sweep_dir: Path) -> list[Any]:
    """The sweep command's overrides as Hydra saved them in the sweep's ``multirun.yaml`` (a job on a
    Slurm node runs under submitit's command, not the sweep's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    saved = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides
    given = [str(o) for o in [*saved.hydra, *saved.task]]
    return list(OverridesParser.create().parse_overrides(given))


def current_job(argv: list[str]) -> Job | None:
    """The multirun job this process is running (Hydra's runtime config), or None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra_cfg = HydraConfig.get()
    if os.environ.get(SUBMITIT_EXECUTOR):
        command = _saved_overrides(Path(str(hydra_cfg.sweep.dir)))
    else:
        command = command_overrides(argv)
    sweeps = [o for o in command if o.is_sweep_override()]
    keys = {o.key_or_group for o in sweeps}
    task = tuple(str(o) for o in hydra_cfg.overrides.task)
    swept = tuple(sorted(o for o in task if o.split("=", 1)[0].lstrip("+~") in keys))
    total = math.prod(len(list(o.sweep_string_iterator())) for o in sweeps) if sweeps else 1
    return Job(int(hydra_cfg.job.num), total, task, swept)


def check_command(argv: list[str]) -> None:
    """Before Hydra writes anything: refuse a sweep whose jobs would share one ``run.dir``, submitit's
    bare Slurm launcher, and a launcher without ``-m``.

    Raises:
        ConfigError: a swept ``run.name``; a fixed ``run.dir`` (no swept key interpolated in it) given to a
            sweep of 2 or more jobs;
            ``hydra/launcher=submitit_slurm`` (its jobs get SIGUSR2, which ends ramp's launcher unsaved); a
            ``hydra/launcher`` other than ``basic`` without ``-m`` (Hydra would ignore it and train here).
    """
    if not any(arg in ("-m", "--multirun") for arg in argv[1:]):
        launchers = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("hydra/launcher=")]
        if launchers and launchers[-1] != "basic":
            raise ConfigError(
                f"hydra/launcher={launchers[-1]} runs only a sweep, and this command has no -m: it would train "
                "here, in this process; add -m (a sweep of one point is fine), or submit one run with "
                "python -m launch.submit"
            )
        return
    overrides = command_overrides(argv)
    for override in overrides:
        if override.key_or_group == "hydra/launcher" and override.value() == "submitit_slurm":
            raise ConfigError(
                "hydra/launcher=submitit_slurm signals its jobs with SIGUSR2 before the time limit, which ends "
                "ramp's launcher without a checkpoint; use hydra/launcher=ramp_slurm (submitit_slurm with "
                "SIGUSR1, requeue and ramp's launcher on each node)"
            )
    sweeps = [o for o in overrides if o.is_sweep_override()]
    if any(o.key_or_group == "run.name" for o in sweeps):
        raise ConfigError(
            "run.name is swept, but it names the sweep (its folder outputs/<run.name>, Hydra's record, the Slurm "
            "job name): give it one value, or sweep run.dir with a swept key in it, e.g. 'run.dir=outputs/lr_${optim.lr}'"
        )
    total = math.prod(len(list(o.sweep_string_iterator())) for o in sweeps) if sweeps else 1
    for override in overrides:
        if override.key_or_group != "run.dir" or override.is_sweep_override() or total < 2:
            continue
        value = override.get_value_element_as_str()
        if "${" not in value and "$\\{" not in value:
            raise ConfigError(
                f"run.dir={value} is the same for all {total} jobs of this sweep, which would share one run "
                "folder; drop it (each job then gets outputs/<run.name>/<swept values>) or interpolate a swept "
                "key in it, e.g. 'run.dir=outputs/lr_${optim.lr}'"
            )


def prepare(dcfg: Any, job: Job) -> None:
    """Give the job its own folder and the sweep's wandb group, in its composed config (before checks);
    a ``run.dir`` given on the command line is the job's (:func:`check_command` refused a shared one)."""
    given = {o.split("=", 1)[0].lstrip("+~"): o.split("=", 1)[1] for o in job.overrides if "=" in o}
    sweep_name = str(dcfg.run.name)
    if "run.dir" not in given and job.swept:
        folder = ",".join(override.replace(os.sep, "_") for override in job.swept)
        dcfg.run.name = f"{sweep_name}/{folder}"
    if dcfg.logger.wandb.group is None:
        dcfg.logger.wandb.group = sweep_name


def hydra_sweep_dir_override(rank: int) -> str | None:
    """For ranks other than 0, an override that sends Hydra's sweep folder (``multirun.yaml``) to a
    folder of that rank's in the system's temporary folder (reused, never the run's), so only rank 0
    writes into ``outputs``."""
    if rank == 0:
        return None
    return f"hydra.sweep.dir={Path(tempfile.gettempdir()) / f'ramp-hydra-sweep-rank{rank}'}"
