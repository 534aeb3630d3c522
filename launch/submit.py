"""``python -m launch.submit [options] -- [overrides]``: ramp as a Slurm batch job, in one command.

Writes a batch script from ``launch/slurm/ramp.sbatch`` with the ``#SBATCH`` lines these options
give, the checkout and interpreter to run and the Hydra overrides, submits it with sbatch, and prints
the job id and where its logs go. The job saves a checkpoint before its time limit and requeues itself;
the requeued job resumes (see ramp.sbatch). The script is kept beside the logs: ``sbatch`` it again to
rerun the same job.
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "launch" / "slurm" / "ramp.sbatch"


class SubmitError(RuntimeError):
    """The job cannot be submitted; the message says why and what to do."""


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
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: a CPU job")
    parser.add_argument(
        "--nproc-per-node", type=int, help="processes per node (default: the GPUs per node, or 1 on CPU)"
    )
    parser.add_argument("--cpus-per-node", type=int, help="CPU cores to allocate on each node")
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
    """Write the batch script beside the logs and submit it (--dry-run: only print it); the exit status."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = args.chdir.resolve()
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
        print(f"submit: error: {err}", file=sys.stderr)
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
