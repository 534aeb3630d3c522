"""A sweep point as one Slurm job: Hydra's submitit launcher submits it, ramp's launcher trains it.

``python -m trainer.main -m hydra/launcher=ramp_slurm 'optim.lr=1e-3,2e-3'`` submits one Slurm job per
point of the sweep (``conf/hydra/launcher/ramp_slurm.yaml``) and waits for them all. In each job, srun
starts one submitit process per node, which calls Hydra's task function (``trainer.main.run_job``); there
:func:`run_point` trains nothing itself but runs ``python -m launch.run`` (ramp's launcher: torchrun, the
node's ranks, per-rank logs, signals) and waits for it:

- **Ranks.** ``RAMP_NPROC_PER_NODE`` processes on each node (default: every GPU the node has, else 1);
  the nodes meet through c10d, as in any Slurm job of ``launch.run``.
- **Overrides.** The point's own overrides (no sweep syntax), with its ``run.name``
  (``<sweep name>/<swept values>``) and wandb group computed as a local sweep computes them
  (:func:`trainer.sweep.prepare`): the same folder, ``outputs/<sweep name>/<swept values>``.
- **Per-rank logs.** Under ``logs/<run.name>`` (``$RAMP_LOG_DIR/<run.name>`` if set), beside the run folder
  rather than in it (a run folder holds only the run): ``<slurm job id>/node<N>/<torchrun
  id>/attempt_0/<local rank>/{stdout,stderr}.log``.
- **Result.** Status 0 is the point's success; any other status raises :class:`PointFailed` naming the
  point, the status and the job's log, which Hydra reports for that point once the sweep has run.
- **Before the time limit.** Slurm sends SIGUSR1 ``signal_delay_s`` before the limit to every process of
  the job: the launcher and its trainers save a checkpoint and stop (the launcher is asked again from
  here). Submitit's own SIGUSR1 handler (checkpoint this job, requeue it, exit) runs only once the
  launcher has exited, so the save is complete before Slurm ends the job. The requeued job runs the point
  again and ``run.resume=auto`` continues the run folder's newest checkpoint. Submitit requeues a timed-out
  job ``max_num_timeout`` times; a preempted one (SIGUSR1 well before the limit) always.
- **SIGTERM** (scancel, or a preemption) also makes the trainers save and stop. The job then waits for the
  SIGUSR1 of a preemption notice (and requeues as above) or for Slurm to end it, at most
  :data:`TERM_WAIT_S`; it never reports a stopped run as finished.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from trainer import sweep
from trainer.errors import ConfigError

NPROC = "RAMP_NPROC_PER_NODE"
"""Processes (ranks) per node of each sweep job; unset: every GPU of the node, else 1."""
TERM_WAIT_S = 300
"""After a SIGTERM has stopped the launcher: how long the job waits for Slurm's SIGUSR1 or its end."""
LAUNCHER = "ramp_slurm"
"""The ``hydra/launcher`` option of a Slurm sweep (``conf/hydra/launcher/ramp_slurm.yaml``)."""
FREE_KEYS = ("additional_parameters", "setup")
"""``hydra.launcher`` keys that take entries of their own (sbatch options; shell lines before srun)."""
SUBMITTED: list[str] = []
"""The Slurm job ids of this process's sweep, once submitted (:mod:`trainer.slurm_launcher`), for messages."""


class PointFailed(RuntimeError):
    """A sweep point's launcher exited with an error status; the message names the point and its log."""


def _launcher_schema() -> tuple[Any, dict[str, str], dict[str, Any]]:
    """The submitit launcher's config (its OmegaConf schema and each key's type, as text) and
    ``ramp_slurm.yaml``'s own settings.

    Raises:
        ConfigError: hydra-submitit-launcher is not installed.
    """
    from omegaconf import OmegaConf

    try:
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError as err:
        raise ConfigError(
            f"hydra/launcher={LAUNCHER} needs hydra-submitit-launcher, which is not installed; install ramp's "
            "slurm extra: pip install -e '.[slurm]' (make venv installs it)"
        ) from err
    yaml_file = Path(__file__).resolve().parents[1] / "conf" / "hydra" / "launcher" / f"{LAUNCHER}.yaml"
    ours = yaml.safe_load(yaml_file.read_text())
    types = {
        f.name: f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")
        for f in dataclasses.fields(SlurmQueueConf)
    }
    return OmegaConf.structured(SlurmQueueConf), types, ours


def check_command(overrides: list[Any]) -> None:
    """For ``hydra/launcher=ramp_slurm``, before Hydra writes or submits anything: every
    ``hydra.launcher.*`` key is one the launcher has and its value has the key's type, and each job's time
    limit leaves room for the save before it (as ``launch.submit`` checks ``--time`` against ``--grace``).

    Args:
        overrides: the command line's overrides, parsed (:func:`trainer.sweep.command_overrides`).

    Raises:
        ConfigError: an unknown key (with the closest one), a value of the wrong type, a sweep over a
            launcher key, or ``timeout_min`` minutes not above ``signal_delay_s`` plus a minute.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    chosen = [o.value() for o in overrides if o.key_or_group == "hydra/launcher"]
    if not chosen or chosen[-1] != LAUNCHER:
        return
    schema, types, ours = _launcher_schema()
    keys = sorted(k for k in schema if not str(k).startswith("_"))
    given: dict[str, str] = {}
    for override in overrides:
        key = str(override.key_or_group)
        if not key.startswith("hydra.launcher."):
            continue
        name = key.removeprefix("hydra.launcher.")
        if name.split(".")[0] not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            hint = f"did you mean hydra.launcher.{close[0]}? " if close else ""
            raise ConfigError(
                f"{key} is not a key of hydra/launcher={LAUNCHER}; {hint}its keys: {', '.join(keys)} (sbatch "
                "options it lacks go in +hydra.launcher.additional_parameters.<option>=<value>)"
            )
        if override.is_sweep_override():
            raise ConfigError(f"{key} is swept; a sweep's points share one launcher: give {key} one value")
        if name.split(".")[0] in FREE_KEYS:
            option = name.partition(".")[2]
            if option and option not in ours.get("additional_parameters", {}) and not override.is_add():
                raise ConfigError(
                    f"{key} is an sbatch option the launcher does not set yet: add it with a +, "
                    f"+{key}={override.get_value_element_as_str()}"
                )
            continue
        value = override.get_value_element_as_str()
        try:
            OmegaConf.merge(schema, {name: value})
        except OmegaConfBaseException:
            raise ConfigError(f"{key}={value} is not of the type {key} takes: {types[name]}") from None
        given[name] = value
    _check_time_limit(given, ours)
    _check_points(overrides, given, ours)


def _check_points(overrides: list[Any], given: dict[str, str], ours: dict[str, Any]) -> None:
    """Compose and check every point's configuration as its ranks will (``launch.submit.check_config``),
    with the job's world size: ``hydra.launcher.nodes`` x ``RAMP_NPROC_PER_NODE`` (else
    ``hydra.launcher.gpus_per_node``, else 1); a mistake costs no Slurm job.

    Raises:
        ConfigError: a bad ``RAMP_NPROC_PER_NODE``, or the first point whose configuration fails a check.
    """
    from launch.submit import check_config

    nodes = int(given.get("nodes", ours.get("nodes") or 1))
    per_node = nproc_per_node(os.environ) or int(given.get("gpus_per_node") or ours.get("gpus_per_node") or 1)
    ramp_overrides = [
        str(o.input_line) for o in overrides if not o.is_hydra_override() and o.input_line is not None
    ]
    check_config(["-m", *ramp_overrides], Path.cwd(), nodes * per_node)


def _check_time_limit(given: dict[str, str], ours: dict[str, Any]) -> None:
    """Raises ConfigError: ``timeout_min`` not above ``signal_delay_s`` plus a minute, or either below 1."""
    timeout = int(given.get("timeout_min", ours["timeout_min"]))
    delay = int(given.get("signal_delay_s", ours["signal_delay_s"]))
    if timeout < 1 or delay < 1:
        raise ConfigError(
            f"hydra.launcher.timeout_min={timeout} and hydra.launcher.signal_delay_s={delay} must both be at least 1"
        )
    if timeout * 60 <= delay + 60:
        raise ConfigError(
            f"hydra.launcher.timeout_min={timeout} ({timeout * 60} s) is not above hydra.launcher.signal_delay_s="
            f"{delay} s plus a minute: Slurm would signal each job to save as soon as it starts, and it would "
            f"requeue one step at a time; give a timeout_min of at least {(delay + 60) // 60 + 1} (well above it: each "
            "requeue waits for Slurm) or a shorter signal_delay_s"
        )


def in_job() -> bool:
    """Whether this process is a job that Hydra's submitit launcher started (on a Slurm node)."""
    return bool(os.environ.get(sweep.SUBMITIT_EXECUTOR))


def nproc_per_node(env: Mapping[str, str]) -> int | None:
    """``RAMP_NPROC_PER_NODE`` as a count, or None when unset or empty (the launcher's default).

    Raises:
        ConfigError: a value that is not a whole number of at least 1.
    """
    value = env.get(NPROC, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{NPROC}={value} is not a number of processes; set it to 1 or more, or unset it")
    return int(value)


def quote(value: str) -> str:
    """``value`` as a single-quoted Hydra override value (commas, ``=`` and spaces kept literal)."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    trailing = len(escaped) - len(escaped.rstrip("\\"))
    return "'" + escaped + "\\" * trailing + "'"


def launch_command(dcfg: Any, job: sweep.Job, env: Mapping[str, str]) -> list[str]:
    """``python -m launch.run [--nproc-per-node N] --log-dir ... -- <the point's overrides>``, with the
    point's ``run.name`` and wandb group (set into ``dcfg`` as a local sweep sets them).

    Raises:
        ConfigError: a bad ``RAMP_NPROC_PER_NODE``.
    """
    sweep.prepare(dcfg, job)
    mine = {"run.name", "logger.wandb.group"}
    overrides = [o for o in job.overrides if o.split("=", 1)[0].lstrip("+~") not in mine]
    overrides.append(f"run.name={quote(str(dcfg.run.name))}")
    if dcfg.logger.wandb.group is not None:
        overrides.append(f"logger.wandb.group={quote(str(dcfg.logger.wandb.group))}")
    cmd = [sys.executable, "-m", "launch.run"]
    nproc = nproc_per_node(env)
    if nproc is not None:
        cmd += ["--nproc-per-node", str(nproc)]
    log_dir = Path(env.get("RAMP_LOG_DIR") or "logs") / str(dcfg.run.name)
    return [*cmd, "--log-dir", str(log_dir), "--", *overrides]


def _require_usr1() -> None:
    """Raises ConfigError: submitit in this job waits for another signal than ramp's SIGUSR1."""
    from submitit import JobEnvironment

    if JobEnvironment.USR_SIG != "USR1":
        raise ConfigError(
            f"this job's submitit waits for SIG{JobEnvironment.USR_SIG} before the time limit, which ends "
            "ramp's launcher without a checkpoint; submit with hydra/launcher=ramp_slurm (it sets "
            "SUBMITIT_PREEMPT_SIGNAL=USR1 in the job and --signal=USR1@<signal_delay_s>)"
        )


class _Relay:
    """Runs the launcher; notes SIGUSR1 and SIGTERM here and passes them on to it once it listens."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.submitit_usr1 = signal.getsignal(signal.SIGUSR1)
        """Submitit's handler: checkpoint the job, requeue it and exit (rank 0), or nothing (other nodes)."""

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def run(self, cmd: list[str]) -> int:
        """Run ``cmd`` to its end with the signals noted and relayed; its exit status (128 + N: signal N)."""
        from launch.run import catches

        signal.signal(signal.SIGUSR1, self._note)
        signal.signal(signal.SIGTERM, self._note)
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        relayed = 0
        while True:
            try:
                code = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            # Slurm signals every process of the job itself; this is for a launcher that was still starting.
            if relayed < len(self.received) and catches(child.pid, signal.SIGUSR1):
                child.send_signal(self.received[relayed])
                relayed = len(self.received)
        return 128 - code if code < 0 else code

    def await_usr1(self, timeout: float) -> bool:
        """After a SIGTERM: whether SIGUSR1 (a preemption notice) comes within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while signal.SIGUSR1 not in self.received and time.monotonic() < deadline:
            time.sleep(0.2)
        return signal.SIGUSR1 in self.received

    def requeue(self) -> None:
        """Hand SIGUSR1 to submitit now that the checkpoint is saved: on the job's first node it requeues
        the job and exits (``SystemExit``), or raises its ``UncompletedJobError`` past its requeue count."""
        signal.signal(signal.SIGUSR1, self.submitit_usr1)
        if callable(self.submitit_usr1):
            self.submitit_usr1(signal.SIGUSR1, None)


def _job_log() -> str:
    from submitit import JobEnvironment

    return str(JobEnvironment().paths.stdout)


def run_point(dcfg: Any, job: sweep.Job) -> None:
    """Hydra's task function on a Slurm node: train this sweep point through ``launch.run`` and wait.

    Raises:
        ConfigError: submitit waits for another signal than SIGUSR1, or a bad ``RAMP_NPROC_PER_NODE``.
        PointFailed: the launcher failed, or a SIGTERM stopped it and no requeue followed.
    """
    _require_usr1()
    cmd = launch_command(dcfg, job, os.environ)
    relay = _Relay()
    code = relay.run(cmd)
    if code:
        raise PointFailed(
            f"{job.describe()}: ramp's launcher exited with status {code}; its output is in {_job_log()}"
        )
    if signal.SIGTERM in relay.received and not relay.await_usr1(TERM_WAIT_S):
        raise PointFailed(
            f"{job.describe()}: stopped by SIGTERM after saving a checkpoint in {dcfg.run.dir}; the same "
            "sweep command resumes it"
        )
    if signal.SIGUSR1 in relay.received:
        relay.requeue()
