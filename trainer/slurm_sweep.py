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

from trainer import sweep
from trainer.errors import ConfigError

NPROC = "RAMP_NPROC_PER_NODE"
"""Processes (ranks) per node of each sweep job; unset: every GPU of the node, else 1."""
TERM_WAIT_S = 300
"""After a SIGTERM has stopped the launcher: how long the job waits for Slurm's SIGUSR1 or its end."""


class PointFailed(RuntimeError):
    """A sweep point's launcher exited with an error status; the message names the point and its log."""


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
