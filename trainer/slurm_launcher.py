"""Hydra's submitit Slurm launcher as ramp's sweeps use it (``hydra/launcher=ramp_slurm``).

``conf/hydra/launcher/ramp_slurm.yaml`` is hydra-submitit-launcher's ``SlurmLauncher`` with ramp's
settings. Hydra instantiates launchers only from its ``hydra_plugins`` namespace, so rather than a plugin
of its own ramp gives that class its :func:`launch` (:func:`install`, called by ``trainer.main`` when a
sweep chooses ``ramp_slurm``). It submits the sweep as the library's does (one Slurm array job, a job per
point, see :mod:`trainer.slurm_sweep` for what each job runs) and adds, in the process that submits and
waits:

- **No sweep twice.** Jobs of this sweep (Slurm job name = the sweep's name) still queued or running are
  a refusal, before anything is submitted: two jobs of one point would train one run folder at once.
- **One line per point.** Once every job has ended, each point is reported in one line (finished, or
  failed with its reason and the job's log), then the sweep in one line; a failed point is no Hydra
  traceback, and the exit status is 1 when any point failed.
- **Quiet polling.** submitit asks ``sacct`` for the jobs' states; where Slurm keeps no accounting
  (a cluster without slurmdbd) every poll fails with a warning. The first is said once in ramp's words;
  submitit then reads the states from the jobs' own files, as it always does.

This module imports hydra-submitit-launcher (ramp's ``slurm`` extra): only Hydra imports it, when a
sweep chooses ``ramp_slurm``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from trainer import slurm_sweep, sweep

QUEUE_TIMEOUT_S = 60
"""How long ``squeue`` may take to say which of this sweep's jobs are still queued or running."""


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _SacctOnce(logging.Filter):
    """Keeps submitit's "Bypassing sacct error" warnings to one line of ramp's."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if not self.said:
            self.said = True
            _say(
                "ramp | sacct gives no job states here (no Slurm accounting): submitit reads them from the jobs' files"
            )
        return False


def queued_jobs(name: str) -> list[str]:
    """This user's Slurm jobs named ``name`` that are pending, running, or being requeued.

    Raises:
        SystemExit: ``squeue`` is missing or fails (after one ``ramp: error:`` line; status 2).
    """
    try:
        done = subprocess.run(
            ["squeue", "--me", "--noheader", f"--name={name}", "--format=%i"],
            capture_output=True,
            text=True,
            timeout=QUEUE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        _fail(
            f"hydra/launcher=ramp_slurm needs Slurm's squeue, which did not answer ({err}); run the sweep on a Slurm login node"
        )
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        _fail(f"squeue failed ({said[-1] if said else done.returncode}); is Slurm reachable from here?")
    return done.stdout.split()


def _fail(line: str) -> None:
    """Raises SystemExit(2) after one ``ramp: error:`` line: the sweep was refused, nothing runs."""
    _say(f"ramp: error: {line}")
    raise SystemExit(2)


def _describe(number: int, total: int, overrides: Sequence[str], keys: set[str]) -> str:
    swept = tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") in keys))
    return sweep.Job(number, total, tuple(overrides), swept).describe()


def install() -> None:
    """Make hydra-submitit-launcher's ``SlurmLauncher`` submit and wait through :func:`launch`.

    Hydra's first scan of its plugins imports their modules again, which would define the class anew
    without the patch; the scan runs once per process, so it runs here first, and the class it keeps
    (the module's, from then on) is the one patched."""
    from hydra.core.plugins import Plugins
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher

    Plugins.instance()
    submitit_launcher.SlurmLauncher.launch = launch


def launch(
    self: BaseSubmititLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> Sequence[JobReturn]:
    """``SlurmLauncher.launch``: submit one Slurm job per point, wait for all, report each point in one line.

    The submission follows ``BaseSubmititLauncher.launch`` of hydra-submitit-launcher 1.2.0.

    Raises:
        SystemExit: status 2: jobs of this sweep are still queued or running, or sbatch refused the jobs
            (nothing submitted); status 1: a point failed (after all have ended, each reported).
    """
    import submitit

    assert self.config is not None
    name = str(self.params["name"])
    queued = queued_jobs(name)
    if queued:
        _fail(
            f"{len(queued)} Slurm job(s) of sweep {name} are still queued or running ({', '.join(queued)}), and "
            f"would train the same run folders; wait for them to end or cancel them (scancel --name={name}), "
            "then run this command again: it resumes the sweep"
        )
    init_keys = {"max_num_timeout", "submitit_folder"}
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=self.params["submitit_folder"],
        slurm_max_num_timeout=self.params["max_num_timeout"],
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{k if k in base else f"slurm_{k}": v for k, v in self.params.items() if k not in init_keys}
    )
    Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
    args = [
        (list(o), "hydra.sweep.dir", i, f"job_id_for_{i}", Singleton.get_state())
        for i, o in zip(numbers, job_overrides, strict=True)
    ]
    logging.getLogger("submitit").addFilter(_SacctOnce())
    try:
        jobs = executor.map_array(self, *zip(*args, strict=True))
    except submitit.core.utils.FailedJobError as err:  # sbatch refused: a partition, account, size...
        said = [line for line in str(err).splitlines() if line.strip()]
        _fail(
            f"Slurm refused the sweep's jobs ({said[-1] if said else err}); check the hydra.launcher settings "
            "(partition, account, qos, mem_gb, additional_parameters): nothing was submitted"
        )
    slurm_sweep.SUBMITTED[:] = [job.job_id for job in jobs]
    _say(
        f"ramp | sweep {name}: {len(jobs)} Slurm job(s) submitted ({', '.join(slurm_sweep.SUBMITTED)}); "
        f"their logs: {Path(str(self.params['submitit_folder'])).parent}/<job id>/<job id>_0_log.out"
    )
    for number, overrides in zip(numbers, job_overrides, strict=True):
        _say(f"ramp |   #{number}: {' '.join(filter_overrides(overrides))}")
    return _wait(jobs, job_overrides, name)


def _wait(jobs: list[Any], job_overrides: Sequence[Sequence[str]], name: str) -> list[JobReturn]:
    """Every job's result, each point reported in one line once all have ended.

    Raises:
        SystemExit: a point failed.
    """
    keys = {str(o.key_or_group) for o in sweep.command_overrides(sys.argv) if o.is_sweep_override()}
    results: list[JobReturn] = []
    failed: list[str] = []
    for number, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True)):
        point = _describe(number, len(jobs), overrides, keys)
        try:
            result = job.results()[0]
        except Exception as err:  # the job itself ended badly: timed out past its requeues, killed, ...
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            failed.append(
                f"{point}: Slurm job {job.job_id} ended without a result ({first}); its log: {job.paths.stdout}"
            )
            continue
        if result.status == JobStatus.FAILED:
            reason = str(result._return_value)  # what the task function raised, on the node
            failed.append(reason if reason.startswith("sweep job") else f"{point}: {reason}")
            continue
        results.append(result)
        _say(f"ramp | {point}: finished (Slurm job {job.job_id})")
    for line in failed:
        _say(f"ramp: error: {line}")
    _say(f"ramp | sweep {name}: {len(results)} of {len(jobs)} point(s) finished")
    if failed:
        raise SystemExit(1)
    return results
