"""The launchers' plans, scripts and image, without starting a job: a launcher in a stand-in Slurm
allocation, submit's batch script, shell syntax, and the Dockerfile against the Makefile."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.run import expand_nodelist, visible_gpus
from launch.submit import SubmitError, time_limit_seconds
from tests.helpers import REPO, missing

SHELL_SCRIPTS = [
    REPO / "launch" / "slurm" / "local_cluster_up.sh",
    REPO / "launch" / "slurm" / "local_cluster_down.sh",
    REPO / "launch" / "slurm" / "ramp.sbatch",
    REPO / "docker" / "entrypoint.sh",
]


def python_m(
    module: str, args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any real allocation's or launcher's variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "RAMP_"))}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_slurm_node_lists_expand_in_slurms_order() -> None:
    assert expand_nodelist("node1") == ["node1"]
    assert expand_nodelist("gpu[007-010],login1") == ["gpu007", "gpu008", "gpu009", "gpu010", "login1"]
    assert expand_nodelist("a[1,3-4]b,c[9-10]") == ["a1b", "a3b", "a4b", "c9", "c10"]
    assert expand_nodelist("rack[1-2]-n[01,03]") == ["rack1-n01", "rack1-n03", "rack2-n01", "rack2-n03"]


def test_launcher_reads_a_slurm_allocation(tmp_path: Path) -> None:
    env = clean_env(
        SLURM_JOB_ID="123456",
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_NODELIST="gpu[07-10]",
        SLURM_NODEID="2",
        CUDA_VISIBLE_DEVICES="0,1,2,3",
        NCCL_DEBUG="INFO",
    )
    result = python_m(
        "launch.run", ["--dry-run", "--", "model=llama-tiny", "train.max_steps=7"], env, tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("launch | node 2 of 4 on ")
    assert "Slurm job 123456" in lines[0]
    assert "4 processes per node" in lines[0]
    port = 23456  # 20000 + the job id modulo 20000: two jobs on one head node get different ports
    assert f"c10d rendezvous at gpu07:{port} (id 123456)" in lines[0]
    env_line = dict(item.split("=", 1) for item in lines[1].removeprefix("launch | env ").split())
    assert env_line["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env_line["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env_line["NCCL_DEBUG"] == "INFO"  # the user's setting wins
    assert env_line["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 4))
    command = lines[3].removeprefix("launch | ").split()
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert {
        "--nnodes=4",
        "--nproc-per-node=4",
        "--max-restarts=0",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=gpu07:{port}",
        "--rdzv-id=123456",
        "--log-dir=logs/123456/node2",
        "--tee=3",
    } <= set(command)
    assert command[-4:] == ["-m", "trainer.main", "model=llama-tiny", "train.max_steps=7"]
    assert not (tmp_path / "logs").exists(), "a dry run writes nothing"


def test_launcher_options_win_over_slurm_and_one_node_runs_standalone(tmp_path: Path) -> None:
    env = clean_env(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="cpu1")
    one = python_m("launch.run", ["--dry-run", "--nproc-per-node", "3", "train.seed=1"], env, tmp_path)
    assert one.returncode == 0, one.stderr
    assert "standalone" in one.stdout.splitlines()[0]
    assert "--standalone" in one.stdout
    assert "--rdzv-endpoint" not in one.stdout
    assert "--nproc-per-node=3" in one.stdout
    assert one.stdout.rstrip().endswith("-m trainer.main train.seed=1")
    # An srun step on two of a job's four nodes meets on the step's nodes.
    step = clean_env(
        SLURM_JOB_ID="8",
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_NODELIST="n[1-4]",
        SLURM_STEP_NUM_NODES="2",
        SLURM_STEP_NODELIST="n[3-4]",
        SLURM_NODEID="1",
    )
    two = python_m("launch.run", ["--dry-run"], step, tmp_path)
    assert two.returncode == 0, two.stderr
    assert "--nnodes=2" in two.stdout
    assert "--rdzv-endpoint=n3:20008" in two.stdout
    outside = python_m(
        "launch.run",
        ["--dry-run", "--nnodes", "2", "--head", "node0", "--max-restarts", "3"],
        clean_env(),
        tmp_path,
    )
    assert outside.returncode == 0, outside.stderr
    assert "--rdzv-endpoint=node0:29400" in outside.stdout  # torchrun's own default c10d port
    assert "--rdzv-id=ramp" in outside.stdout
    assert "--max-restarts=3" in outside.stdout
    assert f"--nproc-per-node={visible_gpus(os.environ) or 1}" in outside.stdout  # every GPU, else 1


def test_submit_writes_a_batch_script_for_n_nodes_by_g_gpus(tmp_path: Path) -> None:
    args = ["--nodes", "2", "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "X"]
    args += ["--cpus-per-node", "96", "--chdir", str(tmp_path), "--dry-run"]
    result = python_m(
        "launch.submit", [*args, "--", "model=gpt2-124m", "run.name=big run"], clean_env(), tmp_path
    )
    assert result.returncode == 0, result.stderr
    scripts = list((tmp_path / "logs").glob("ramp-*.sbatch"))
    assert len(scripts) == 1
    script = scripts[0].read_text()
    directives = re.findall(r"^#SBATCH (\S+)", script, re.MULTILINE)
    assert directives == [
        "--job-name=ramp",
        "--nodes=2",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=96",
        "--time=24:00:00",
        "--partition=X",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        f"--output={tmp_path}/logs/%x-%j.out",
        f"--chdir={tmp_path}",
    ]
    assert f"export RAMP_REPO={REPO}\n" in script
    assert "set -- model=gpt2-124m 'run.name=big run' \"$@\"\n" in script
    body = script[script.index("set -- ") :]
    assert "trap on_usr1 USR1" in body
    assert 'scontrol requeue "$SLURM_JOB_ID"' in body
    check = subprocess.run(["bash", "-n", str(scripts[0])], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_slurm_time_limits_in_every_format() -> None:
    assert time_limit_seconds("30") == 30 * 60  # MM
    assert time_limit_seconds("10:00") == 600  # MM:SS
    assert time_limit_seconds("01:02:03") == 3723  # HH:MM:SS
    assert time_limit_seconds("2-3") == (2 * 24 + 3) * 3600  # D-HH
    assert time_limit_seconds("1-00:30") == 24 * 3600 + 30 * 60  # D-HH:MM
    assert time_limit_seconds("1-00:00:05") == 24 * 3600 + 5  # D-HH:MM:SS
    for unlimited in ("0", "UNLIMITED", "infinite"):
        assert time_limit_seconds(unlimited) is None
    for bad in ("1h", "1:2:3:4", "-5", ""):
        with pytest.raises(SubmitError, match="is not a Slurm time limit"):
            time_limit_seconds(bad)


SUBMIT_REFUSALS = [
    (
        ["--time", "00:04:00", "--", "train.max_steps=1000"],
        "--time=00:04:00 (240 s) is not above --grace=300 s plus a minute: Slurm would signal the job as soon as "
        "it starts, and it would requeue one step at a time; give a --time longer than 360 s (well above it: "
        "each requeue waits for Slurm) or a shorter --grace",
    ),
    (
        ["--time", "10:00", "--grace", "560", "--", "train.max_steps=1000"],
        "--time=10:00 (600 s) is not above --grace=560 s plus a minute",
    ),
    (
        ["--time", "1h"],
        "--time=1h is not a Slurm time limit; use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS",
    ),
    (
        ["--time", "1-0", "--", "train.max_step=1000"],
        "train.max_step is not a key of train; did you mean train.max_steps?",
    ),
    (["--", "model=gpt3"], "model=gpt3 is not a model preset; choose one of gpt2-124m, gpt2-tiny, llama-1b"),
    # composed as the job will be: the value checks run, on the job's 2 x 2 ranks
    (
        ["--", "train.max_steps=10", "schedule.warmup_steps=11"],
        "schedule.warmup_steps=11 exceeds the run's 10 steps",
    ),
    (
        ["--nodes", "2", "--nproc-per-node", "2", "--", "train.batch_schedule=0:8 1M:16"],
        "train.batch_schedule: a global batch of 8 is not a multiple of train.micro_batch_size x world size = 8 x 4",
    ),
    (["--", "-m", "optim.lr=1e-3,-1"], "sweep job 2 of 2 (optim.lr=-1): optim.lr=-1.0 must be > 0"),
]


@pytest.mark.parametrize(("args", "message"), SUBMIT_REFUSALS, ids=[" ".join(a) for a, _ in SUBMIT_REFUSALS])
def test_submit_refuses_a_bad_time_limit_or_configuration_before_writing_anything(
    args: list[str], message: str, tmp_path: Path
) -> None:
    cut = args.index("--") if "--" in args else len(args)
    options = [*args[:cut], "--chdir", str(tmp_path), "--dry-run", *args[cut:]]
    result = python_m("launch.submit", options, clean_env(), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"ramp: error: {message}")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "a refused job writes no script"


def test_several_nodes_outside_slurm_need_a_head(tmp_path: Path) -> None:
    result = python_m(
        "launch.run", ["--dry-run", "--nnodes", "2", "--", "train.max_steps=5"], clean_env(), tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "ramp: error: --nnodes=2 outside a Slurm allocation needs --head HOST: the address of the node that "
        "hosts the rendezvous, reachable from every node; give every node the same --head (and --port, --run-id)"
    ]
    assert result.stdout == ""
    # A Slurm allocation names the head; without a node list it does not.
    inside = clean_env(SLURM_JOB_ID="9", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[5-6]")
    derived = python_m("launch.run", ["--dry-run"], inside, tmp_path)
    assert derived.returncode == 0, derived.stderr
    assert "--rdzv-endpoint=n5:20009" in derived.stdout
    bare = clean_env(SLURM_JOB_ID="9", SLURM_JOB_NUM_NODES="2")
    assert python_m("launch.run", ["--dry-run"], bare, tmp_path).returncode == 2


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_bash_n_and_shellcheck(script: Path) -> None:
    assert os.access(script, os.X_OK) or script.suffix == ".sbatch", f"{script} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    if shutil.which("shellcheck") is None:
        missing("shellcheck")
    lint = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout


def test_the_image_installs_ramp_as_the_makefile_does() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.MULTILINE)
    assert base is not None
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", base.group(1))
    # The same pin of the installed torch, and the same editable install with the same extras.
    pin = "import torch; print('torch==' + torch.__version__)"
    assert pin in makefile
    assert pin in dockerfile
    make_install = re.search(r'-c \$\(VENV\)/constraints\.txt -e "(\.\[[^\]]+\])"', makefile)
    image_install = re.search(
        r'pip install --no-cache-dir -c constraints\.txt -e "(\.\[[^\]]+\])"', dockerfile
    )
    assert make_install is not None
    assert image_install is not None
    assert image_install.group(1) == make_install.group(1)
    # Everything the package needs is copied in before it is installed.
    packages = re.search(r"^packages = \[([^\]]*)\]", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert packages is not None
    top_level = {name.split(".")[0] for name in re.findall(r'"([\w.]+)"', packages.group(1))}
    assert top_level == {"trainer", "launch"}
    for package in top_level:
        assert f"COPY {package} ./{package}" in dockerfile
    assert "COPY conf ./conf" in dockerfile
    assert "COPY pyproject.toml README.md LICENSE ./" in dockerfile
    assert 'ENTRYPOINT ["/opt/ramp/docker/entrypoint.sh"]' in dockerfile


def test_entrypoint_runs_another_command_as_it_is(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(REPO / "docker" / "entrypoint.sh"), "python3", "-c", "import os; print(os.getcwd())"],
        env={**clean_env(), "RAMP_WORKDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path)


def test_compose_file_builds_this_image_and_mounts_its_workdir() -> None:
    import yaml

    service = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]["ramp"]
    build = service["build"]
    assert (REPO / "docker" / build["context"] / build["dockerfile"]).resolve() == REPO / "Dockerfile"
    workdir = re.search(r"RAMP_WORKDIR=(\S+)", (REPO / "Dockerfile").read_text())
    assert workdir is not None
    assert [volume.split(":")[1] for volume in service["volumes"]] == [workdir.group(1)]
    assert service["init"] is True  # a PID 1 that passes docker stop's SIGTERM on and reaps processes
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_the_launcher_checks_the_overrides_before_it_starts_anything(tmp_path: Path) -> None:
    result = python_m("launch.run", ["--dry-run", "--", "train.max_step=3"], clean_env(), tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "ramp: error: train.max_step is not a key of train; did you mean train.max_steps?"
    ]
    assert result.stdout == ""
