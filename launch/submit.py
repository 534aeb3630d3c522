"""``python -m launch.submit [options] -- [overrides]``: ramp as a Slurm batch job, in one command.

Writes a batch script from ``launch/slurm/ramp.sbatch`` with the ``#SBATCH`` lines these options
give, the checkout and interpreter to run and the Hydra overrides, submits it with sbatch, and prints
the job id and where its logs go. The job saves a checkpoint before its time limit and requeues itself;
the requeued job resumes (see ramp.sbatch). The script is kept beside the logs: ``sbatch`` it again to
rerun the same job.

Before anything is written or queued (``--dry-run`` too), the configuration is composed and checked as
``trainer.main`` will (each job of a ``-m`` sweep, in ``--chdir``, on the job's ranks), and a time limit
too short for the preemption grace is refused: a mistake is one ``ramp: error:`` line and exit 2 now,
not when the job starts hours later.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from trainer.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launch" / "slurm" / "ramp.sbatch"


class SubmitError(RuntimeError):
    """The job cannot be submitted; the message says why and what to do."""


SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<first>\d+)(?::(?P<second>\d+))?(?::(?P<third>\d+))?")
"""Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""


def time_limit_seconds(text: str) -> int | None:
    """A Slurm ``--time`` in seconds; None for no limit (0, UNLIMITED, INFINITE).

    Raises:
        SubmitError: not one of Slurm's formats.
    """
    if text.strip().upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    match = SLURM_TIME.fullmatch(text.strip())
    if match is None:
        raise SubmitError(
            f"--time={text} is not a Slurm time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS, "
            "e.g. --time=24:00:00"
        )
    days, first, second, third = (int(part) if part else 0 for part in match.groups())
    if match["days"] is not None:  # D-HH[:MM[:SS]]
        seconds = ((days * 24 + first) * 60 + second) * 60 + third
    elif match["third"] is not None:  # HH:MM:SS
        seconds = (first * 60 + second) * 60 + third
    else:  # MM[:SS]
        seconds = first * 60 + second
    return seconds or None


def check_time(time_limit: str | None, grace: int) -> None:
    """Refuse a time limit not above the grace plus a minute: Slurm checks signal times about every 30 s,
    so such a job is signalled as soon as it starts and requeues one step at a time.

    Raises:
        SubmitError: the limit and the grace, and what to change.
    """
    if grace < 1:
        raise SubmitError(f"--grace={grace} must be at least 1 (seconds before the time limit to checkpoint)")
    limit = time_limit_seconds(time_limit) if time_limit is not None else None
    if limit is not None and limit <= grace + 60:
        raise SubmitError(
            f"--time={time_limit} ({limit} s) is not above --grace={grace} s plus a minute: Slurm would signal "
            "the job as soon as it starts, and it would requeue one step at a time; give a --time longer than "
            f"{grace + 60} s (well above it: each requeue waits for Slurm) or a shorter --grace"
        )


@contextlib.contextmanager
def _as_the_job(workdir: Path, world_size: int) -> Iterator[None]:
    """In the job's working directory (relative paths), with its world size (batch checks)."""
    before, ranks = Path.cwd(), os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(world_size)
    if workdir.is_dir():
        os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(before)
        if ranks is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = ranks


def check_config(overrides: Sequence[str], workdir: Path, world_size: int) -> None:
    """Check and compose the configuration as ``trainer.main`` will on the job's ranks, each job of a
    ``-m`` sweep; composing needs no data, model or GPU.

    Raises:
        ConfigError: the first mistake, as trainer.main would report it.
    """
    from trainer import sweep
    from trainer.config import check_command, command_jobs, compose

    argv = ["trainer.main", *overrides]
    check_command(argv)
    sweep.check_command(argv)
    jobs = command_jobs(argv)
    with _as_the_job(workdir, world_size):
        for number, job in enumerate(jobs, 1):
            try:
                compose(job)
            except ConfigError as err:
                if len(jobs) == 1:
                    raise
                swept = ", ".join(o for o in job if o not in overrides)
                raise ConfigError(f"sweep job {number} of {len(jobs)} ({swept}): {err}") from None


def directives(args: argparse.Namespace, log_dir: Path, workdir: Path) -> list[str]:
    """The ``#SBATCH`` lines: resources, USR1 ``--grace`` s before the time limit, requeue, log, folder."""
    options = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    if args.gpus_per_node:
        options.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_node:
        options.append(f"--cpus-per-task={args.cpus_per_node}")  # one task (launcher) per node
    for flag in ("time", "partition", "account", "qos", "mem"):
        if getattr(args, flag):
            options.append(f"--{flag}={getattr(args, flag)}")
    if args.exclusive:
        options.append("--exclusive")
    options += [
        f"--signal=B:USR1@{args.grace}",
        "--requeue",
        "--open-mode=append",  # a requeued job appends to the same log
        f"--output={log_dir}/%x-%j.out",
        f"--chdir={workdir}",
        *args.sbatch_arg,
    ]
    return [f"#SBATCH {option}" for option in options]


def render(args: argparse.Namespace, overrides: Sequence[str], log_dir: Path, workdir: Path) -> str:
    """The template with these #SBATCH lines, and the settings and overrides ahead of its body."""
    lines = TEMPLATE.read_text().splitlines()
    marked = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    settings = {"RAMP_REPO": args.repo, "RAMP_PYTHON": args.python, "RAMP_LOG_DIR": str(log_dir)}
    if args.nproc_per_node:
        settings["RAMP_NPROC_PER_NODE"] = str(args.nproc_per_node)
    if args.srun_args:
        settings["RAMP_SRUN_ARGS"] = args.srun_args
    submitted = shlex.join(["python", "-m", "launch.submit", *args.argv])
    written = [
        f"# Written by `{submitted}` on {datetime.datetime.now():%Y-%m-%d %H:%M:%S}.",
        *(f"export {key}={shlex.quote(value)}" for key, value in settings.items()),
        "set -- " + " ".join(shlex.quote(o) for o in overrides) + ' "$@"',
    ]
    return "\n".join(
        [*lines[: marked[0]], *directives(args, log_dir, workdir), *written, *lines[marked[-1] + 1 :], ""]
    )


def submit(script: Path) -> str:
    """Submit ``script`` with sbatch; the job id.

    Raises:
        SubmitError: sbatch is not on the PATH, or it refused the script.
    """
    if shutil.which("sbatch") is None:
        raise SubmitError(
            "sbatch not found: submit from a Slurm login node, or start a local cluster with "
            "launch/slurm/local_cluster_up.sh"
        )
    result = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise SubmitError(f"sbatch refused {script}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number of at least 1")
    return int(text)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options (``argv`` kept as ``args.argv``), and the Hydra overrides after ``--``."""
    argv = list(argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    default_python = REPO / ".venv" / "bin" / "python"
    parser = argparse.ArgumentParser(
        prog="python -m launch.submit",
        description="Submit ramp as a Slurm batch job that checkpoints and requeues itself before its "
        "time limit. Hydra overrides follow `--`.",
    )
    parser.add_argument("--nodes", type=positive, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job")
    parser.add_argument(
        "--nproc-per-node", type=positive, help="processes per node (default: the GPUs per node, or 1 on CPU)"
    )
    parser.add_argument("--cpus-per-node", type=positive, help="CPU cores to allocate on each node")
    parser.add_argument("--mem", help="memory per node, as sbatch --mem takes it (0: all of it)")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--exclusive", action="store_true", help="whole nodes only")
    parser.add_argument("--job-name", default="ramp")
    parser.add_argument(
        "--grace",
        type=int,
        default=300,
        help="seconds before the time limit at which the trainers save a checkpoint (default 300)",
    )
    parser.add_argument("--chdir", type=Path, default=Path.cwd(), help="the job's working directory")
    parser.add_argument("--log-dir", type=Path, help="job and per-rank logs (default: logs under --chdir)")
    parser.add_argument(
        "--python",
        default=str(default_python) if default_python.exists() else sys.executable,
        help="interpreter with ramp's dependencies (default: the checkout's .venv)",
    )
    parser.add_argument(
        "--repo", default=str(REPO), help="the ramp checkout the job runs (default: this one)"
    )
    parser.add_argument("--srun-args", help="more srun arguments, e.g. '--container-image=ramp.sqsh'")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="another #SBATCH option")
    parser.add_argument("--dry-run", action="store_true", help="write and print the script; submit nothing")
    args = parser.parse_args(argv)
    args.argv = [*argv, "--", *overrides] if overrides else argv
    return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Check the time limit and the configuration, write the batch script beside the logs and submit it
    (--dry-run: only print it); the exit status (2: a refused job, one ``ramp: error:`` line)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = args.chdir.resolve()
    ranks = args.nodes * (args.nproc_per_node or args.gpus_per_node or 1)  # as ramp.sbatch starts them
    try:
        check_time(args.time, args.grace)
        check_config(overrides, workdir, ranks)
    except (SubmitError, ConfigError) as err:
        print(f"ramp: error: {err}", file=sys.stderr)
        return 2
    log_dir = (args.log_dir or workdir / "logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    script = log_dir / f"{args.job_name}-{datetime.datetime.now():%Y%m%d-%H%M%S-%f}.sbatch"
    script.write_text(render(args, overrides, log_dir, workdir))
    if args.dry_run:
        print(script.read_text(), end="")
        print(f"submit | dry run: wrote {script}; not submitted")
        return 0
    try:
        job = submit(script)
    except SubmitError as err:
        print(f"ramp: error: {err}", file=sys.stderr)
        return 2
    gpus = f"{args.gpus_per_node} GPUs" if args.gpus_per_node else "CPU"
    limits = ", ".join(
        f"{flag} {getattr(args, flag)}" for flag in ("time", "partition") if getattr(args, flag)
    )
    job_log = log_dir / f"{args.job_name}-{job}.out"
    for line in (
        f"job {job} submitted: {args.nodes} node(s) x {gpus}" + (f", {limits}" if limits else ""),
        f"batch script:  {script}",
        f"job log:       {job_log}",
        f"per-rank logs: {log_dir / job}/node<N>/",
        f"outputs:       {workdir}/outputs/<run.name>",
        f"follow it:     squeue -j {job}; tail -f {job_log}",
    ):
        print(f"submit | {line}")
    return 0


def job_id(output: str) -> str:
    """The job id in this command's output."""
    match = re.search(r"^submit \| job (\d+) submitted", output, re.MULTILINE)
    if match is None:
        raise ValueError(f"no job id in: {output!r}")
    return match.group(1)


if __name__ == "__main__":
    sys.exit(main())
