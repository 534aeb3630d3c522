"""``python -m launch.run [options] [--] [overrides]``: ramp through torchrun on one node of a job.

Start one launcher per node with the same arguments (in a Slurm job, ``srun`` does that). It runs
``torchrun ... -m trainer.main [overrides]`` and adds what a bare torchrun leaves to each user:

- **Rendezvous.** Several nodes meet through c10d at ``--head:--port`` under one ``--run-id``; global
  ranks are handed out in the order the nodes join. One node runs torchrun ``--standalone``.
- **Slurm.** Inside an allocation the node count, the head (the first host of the node list), this
  node's index (``SLURM_NODEID``) and the run id (``SLURM_JOB_ID``, with a port derived from it) come
  from Slurm (the srun step's ``SLURM_STEP_*`` values first), so the same command runs on every node.
- **Environment.** OMP threads, NCCL error handling and the torch 2.13 restart fix are set (a value
  already in the environment wins) and printed.
- **Per-rank logs.** Each local rank's stdout and stderr go to files (and to the console).
- **Signals.** SIGUSR1, SIGTERM and SIGINT make the trainers save a checkpoint and exit 0. torchrun
  itself dies of SIGUSR1 and answers SIGTERM by killing its workers after a timeout, so it runs in its
  own session with SIGUSR1 ignored, and the launcher hands SIGUSR1 to the trainer processes itself
  (having written the signal it received where they read it, so they name it).
- **Exit status.** torchrun reports any failed worker as exit 1; the launcher exits with the trainers'
  own code instead (2: a configuration error, 3: a halted run), which each failing rank writes into a
  folder the launcher names (``RAMP_EXIT_DIR``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from types import FrameType

import psutil

from trainer.config import check_overrides
from trainer.errors import ConfigError

DEFAULT_PORT = 29400
"""torchrun's own default c10d port, for multi-node runs outside Slurm."""
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000
"""Under Slurm the port is derived from the job id, so two jobs sharing a head node do not collide."""
PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """The launcher cannot start this node; the message says why and what to give."""


@dataclass(frozen=True)
class NodePlan:
    """What this node's torchrun is told."""

    nnodes: int
    nproc_per_node: int
    node_rank: int
    head: str
    port: int
    run_id: str
    max_restarts: int
    log_dir: Path
    slurm: bool

    @property
    def standalone(self) -> bool:
        """One node has nobody to meet: torchrun picks a free port itself."""
        return self.nnodes == 1

    @property
    def endpoint(self) -> str:
        """The rendezvous address, ``head:port``."""
        return f"{self.head}:{self.port}"


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list (``gpu[01-03,07],login1``) as host names, in Slurm's order."""
    hosts = []
    for item in re.findall(r"(?:[^,\[]+|\[[^\]]*\])+", nodelist):
        pieces = re.split(r"\[([^\]]*)\]", item)  # text, ranges, text, ranges, ..., text
        choices = [[piece] if i % 2 == 0 else _expand_ranges(piece) for i, piece in enumerate(pieces)]
        hosts += ["".join(parts) for parts in product(*choices)]
    return hosts


def _expand_ranges(spec: str) -> list[str]:
    values = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if not high:
            values.append(low)
            continue
        values += [str(n).zfill(len(low)) for n in range(int(low), int(high) + 1)]  # keeps 007-010 padded
    return values


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this node may use, without importing torch (the launcher stays light and thread-free)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len([p for p in Path("/dev").glob("nvidia*") if p.name[6:].isdigit()])


def make_plan(args: argparse.Namespace, env: Mapping[str, str]) -> NodePlan:
    """Explicit options first, then the Slurm allocation, then single-node defaults.

    Raises:
        LaunchError: several nodes with no ``--head`` outside a Slurm allocation, where each node would
            wait for the others on itself.
    """
    job_id = env.get("SLURM_JOB_ID")
    slurm = job_id is not None
    # Inside an srun step, the step's nodes (a step may use fewer nodes than the job holds).
    nnodes = args.nnodes or int(
        env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1
    )
    node_rank = args.node_rank if args.node_rank is not None else int(env.get("SLURM_NODEID", "0"))
    head = args.head
    if head is None:
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        )
        if nnodes > 1 and not (slurm and nodelist):
            raise LaunchError(
                f"--nnodes={nnodes} outside a Slurm allocation needs --head HOST: the address of the node that "
                "hosts the rendezvous, reachable from every node; give every node the same --head (and --port, "
                "--run-id)"
            )
        head = expand_nodelist(nodelist)[0] if slurm and nodelist else "127.0.0.1"
    port = args.port
    if port is None:
        port = SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id else DEFAULT_PORT
    run_id = args.run_id or job_id or "ramp"
    base = Path(args.log_dir or env.get("RAMP_LOG_DIR") or "logs") / run_id
    return NodePlan(
        nnodes=nnodes,
        nproc_per_node=args.nproc_per_node or visible_gpus(env) or 1,
        node_rank=node_rank,
        head=head,
        port=port,
        run_id=run_id,
        max_restarts=args.max_restarts,
        log_dir=base / f"node{node_rank}",
        slurm=slurm,
    )


def cluster_env(plan: NodePlan, env: Mapping[str, str], socket_ifname: str | None) -> dict[str, str]:
    """The variables this launcher sets; a value already in the environment is kept."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    wanted = {
        # Each rank gets its share of the node's cores; more threads than cores slows every rank.
        "OMP_NUM_THREADS": str(max(1, cores // plan.nproc_per_node)),
        # A failed or stuck NCCL collective aborts the process instead of hanging the job, so
        # torchrun (--max-restarts) or Slurm can restart it.
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "NCCL_DEBUG": "WARN",
        # torch 2.13's torchrun shares one store across restart rounds without a per-round prefix, so
        # a restarted round can read the dead round's addresses; the workers get their own store.
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if socket_ifname:
        wanted["NCCL_SOCKET_IFNAME"] = wanted["GLOO_SOCKET_IFNAME"] = socket_ifname
    chosen = {key: env.get(key, value) for key, value in wanted.items()}
    chosen.update({key: value for key, value in env.items() if key.startswith("NCCL_")})
    return chosen


def torchrun_command(plan: NodePlan, overrides: Sequence[str], python: str = sys.executable) -> list[str]:
    """The torchrun command line that runs ``trainer.main`` with ``overrides`` on this node."""
    cmd = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={plan.nnodes}",
        f"--nproc-per-node={plan.nproc_per_node}",
        f"--max-restarts={plan.max_restarts}",
        f"--log-dir={plan.log_dir}",
        "--tee=3",  # every local rank's stdout and stderr to its own files, and to the console
    ]
    if plan.standalone:
        cmd.append("--standalone")
    else:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={plan.endpoint}", f"--rdzv-id={plan.run_id}"]
    return [*cmd, "-m", "trainer.main", *overrides]


def describe(plan: NodePlan, env_set: Mapping[str, str], cmd: Sequence[str]) -> list[str]:
    """The start-up lines: the node and rendezvous, the variables set, the per-rank logs, the command."""
    where = f"Slurm job {plan.run_id} | " if plan.slurm else ""
    meeting = "standalone" if plan.standalone else f"c10d rendezvous at {plan.endpoint} (id {plan.run_id})"
    return [
        f"launch | node {plan.node_rank} of {plan.nnodes} on {socket.gethostname()} | {where}"
        f"{plan.nproc_per_node} processes per node | {meeting} | max restarts {plan.max_restarts}",
        "launch | env " + " ".join(f"{key}={value}" for key, value in env_set.items()),
        f"launch | per-rank logs: {plan.log_dir}/<run id>_*/attempt_<restart>/<local rank>/"
        "{stdout,stderr}.log",
        "launch | " + shlex.join(cmd),
    ]


def catches(pid: int, signum: int) -> bool:
    """Whether a process has a handler for the signal (the trainer installs one early at start-up)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc to look at: deliver once and hope
    match = re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.MULTILINE)
    return match is None or bool(int(match.group(1), 16) >> (signum - 1) & 1)


class SignalForwarder:
    """SIGUSR1, SIGTERM or SIGINT to the launcher: ask every trainer under torchrun to checkpoint.

    The trainers are asked with SIGUSR1, which they inherit as ignored until their handler is set: a
    trainer still starting up is asked again once it can listen, rather than dying of the signal.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, reason_file: Path | None = None) -> None:
        self.received: str | None = None
        self.announced = False
        self.asked: set[int] = set()
        self.reason_file = reason_file
        """Where the signal's name is written before any trainer is asked (RAMP_STOP_REASON)."""

    def install(self) -> None:
        """Handle SIGUSR1, SIGTERM and SIGINT in this process: each is noted for :meth:`deliver`."""
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def deliver(self, torchrun_pid: int) -> None:
        """Called from the launcher's wait loop; a no-op until a signal came."""
        if self.received is None:
            return
        if not self.announced:
            self.announced = True
            if self.reason_file is not None:
                self.reason_file.write_text(self.received)
            say(f"{self.received}: asking the trainers to save a checkpoint and stop")
        try:
            trainers = psutil.Process(torchrun_pid).children()
        except psutil.NoSuchProcess:
            return
        for trainer in trainers:
            if trainer.pid in self.asked or not catches(trainer.pid, signal.SIGUSR1):
                continue
            try:
                trainer.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                continue
            self.asked.add(trainer.pid)


def _torchrun_child_setup() -> Callable[[], None]:
    """What runs in torchrun's process between fork and exec."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None

    def setup() -> None:
        # An ignored signal stays ignored through exec, in torchrun and in the workers it starts.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        if prctl is not None:
            # If the launcher dies, torchrun gets SIGTERM and takes its workers down rather than
            # living on in its own session.
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def run(cmd: Sequence[str], env: Mapping[str, str]) -> int:
    """Run torchrun in its own session, relaying signals to its trainers.

    Returns the trainers' own exit code when one failed with ramp's error (2 or 3), else torchrun's
    status (128 + N: killed by signal N).
    """
    with tempfile.TemporaryDirectory(prefix="ramp-launch-") as scratch:
        exits, reason = Path(scratch) / "exit", Path(scratch) / "stop_reason"
        exits.mkdir()
        forwarder = SignalForwarder(reason)
        forwarder.install()
        # Its own session: a Ctrl-C in the terminal reaches the launcher (which asks for a checkpoint),
        # not torchrun (which would interrupt the trainers mid-step).
        torchrun = subprocess.Popen(
            list(cmd),
            env={**env, "RAMP_EXIT_DIR": str(exits), "RAMP_STOP_REASON": str(reason)},
            start_new_session=True,
            preexec_fn=_torchrun_child_setup(),
        )
        while True:
            try:
                code = torchrun.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                forwarder.deliver(torchrun.pid)
        trainer_codes = [int(path.read_text()) for path in exits.iterdir()]
    if code < 0:
        code = 128 - code
    if code and trainer_codes:
        say(f"torchrun exited with status {code}; the trainers stopped with status {max(trainer_codes)}")
        return max(trainer_codes)
    if code:
        say(f"torchrun exited with status {code}")
    return code


def say(message: str) -> None:
    """Print ``message`` as a ``launch |`` line, flushed."""
    print(f"launch | {message}", flush=True)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options, and the Hydra overrides: the positional ones, then those after ``--``."""
    argv = list(argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m launch.run",
        description="ramp's trainer through torchrun on one node; run one per node. Hydra overrides "
        "follow `--` (or come last).",
    )
    parser.add_argument("--nnodes", type=int, help="nodes in the job (default: Slurm's count, else 1)")
    parser.add_argument(
        "--nproc-per-node", type=int, help="processes on this node (default: every visible GPU, else 1)"
    )
    parser.add_argument("--node-rank", type=int, help="this node's index, for log folders (default: Slurm's)")
    parser.add_argument(
        "--head", help="rendezvous host (default: Slurm's first node; needed for several nodes outside Slurm)"
    )
    parser.add_argument(
        "--port", type=int, help=f"rendezvous port (default: from the Slurm job id, else {DEFAULT_PORT})"
    )
    parser.add_argument("--run-id", help="rendezvous id shared by all nodes (default: Slurm job id)")
    parser.add_argument(
        "--max-restarts", type=int, default=0, help="restarts of the whole group on a failure"
    )
    parser.add_argument("--log-dir", help="per-rank log root (default: $RAMP_LOG_DIR, else logs)")
    parser.add_argument("--socket-ifname", help="network interface for NCCL and gloo (e.g. ib0, eth0)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for torchrun and the trainers")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the command; run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for trainer.main")
    args = parser.parse_args(argv)
    return args, [*args.overrides, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    """Plan this node's torchrun, print the plan and run it (with --dry-run, only print); the exit status."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    try:
        check_overrides(overrides)  # a mistyped key or preset: one line now, not from every rank later
        plan = make_plan(args, env)
    except (LaunchError, ConfigError) as err:
        print(f"ramp: error: {err}", file=sys.stderr, flush=True)
        return 2
    env_set = cluster_env(plan, env, args.socket_ifname)
    cmd = torchrun_command(plan, overrides, args.python)
    for line in describe(plan, env_set, cmd):
        print(line, flush=True)
    if args.dry_run:
        return 0
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    return run(cmd, {**env, **env_set})


if __name__ == "__main__":
    sys.exit(main())
