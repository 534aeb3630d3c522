"""The pieces of a Slurm sweep that run without Slurm: the launcher preset as submitit writes it into the
batch script, the command each point's job runs, and what is refused before anything is submitted."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from trainer import slurm_sweep, sweep
from trainer.config import conf_dir, register_configs
from trainer.errors import ConfigError
from trainer.slurm_sweep import launch_command, nproc_per_node, quote


def composed(overrides: list[str]) -> Any:
    register_configs()
    with hydra.initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra.compose("config", overrides=overrides, return_hydra_config=True)


def test_the_preset_signals_usr1_before_the_limit_and_requeues_in_the_batch_script(tmp_path: Path) -> None:
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = composed(["hydra/launcher=ramp_slurm", "run.name=lr-sweep", "hydra.launcher.signal_delay_s=240"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(launcher, dict)
    assert (launcher["name"], launcher["tasks_per_node"], launcher["nodes"]) == ("lr-sweep", 1, 1)
    assert launcher["max_num_timeout"] > 0
    assert launcher["submitit_folder"] == "outputs/lr-sweep/.hydra/.submitit/%j"
    script = _make_sbatch_string(
        command="python -m submitit.core._submit",
        folder=tmp_path,
        signal_delay_s=launcher["signal_delay_s"],
        additional_parameters=launcher["additional_parameters"],
        setup=launcher["setup"],
    )
    assert "#SBATCH --signal=USR1@240" in script.splitlines()
    assert "export SUBMITIT_PREEMPT_SIGNAL=USR1" in script.splitlines()


def test_a_point_runs_ramps_launcher_with_its_overrides_folder_and_group() -> None:
    dcfg = composed(["run.name=lr-sweep", "optim.lr=0.001"])
    job = sweep.Job(0, 2, ("run.name=lr-sweep", "optim.lr=0.001", "train.seed=3"), ("optim.lr=0.001",))
    env = {"RAMP_NPROC_PER_NODE": "2"}
    assert launch_command(dcfg, job, env) == [
        sys.executable,
        "-m",
        "launch.run",
        "--nproc-per-node",
        "2",
        "--log-dir",
        "logs/lr-sweep/optim.lr=0.001",
        "--",
        "optim.lr=0.001",
        "train.seed=3",
        "run.name='lr-sweep/optim.lr=0.001'",
        "logger.wandb.group='lr-sweep'",
    ]


@pytest.mark.parametrize("value", ["lr-sweep/optim.lr=0.001,train.seed=1", "it's", "a\\", "b\\'c d"])
def test_quoted_values_read_back_as_themselves(value: str) -> None:
    assert OverridesParser.create().parse_override(f"run.name={quote(value)}").value() == value


def test_ranks_per_node_come_from_the_environment() -> None:
    assert nproc_per_node({}) is None
    assert nproc_per_node({"RAMP_NPROC_PER_NODE": ""}) is None
    assert nproc_per_node({"RAMP_NPROC_PER_NODE": "8"}) == 8
    for bad in ("0", "two", "-1"):
        with pytest.raises(ConfigError, match=f"RAMP_NPROC_PER_NODE={bad} is not a number"):
            nproc_per_node({"RAMP_NPROC_PER_NODE": bad})


def test_submitits_bare_slurm_launcher_is_refused_before_anything_is_submitted() -> None:
    with pytest.raises(ConfigError, match="use hydra/launcher=ramp_slurm"):
        sweep.check_command(["main", "-m", "hydra/launcher=submitit_slurm", "optim.lr=1e-3,2e-3"])
    sweep.check_command(["main", "-m", "hydra/launcher=ramp_slurm", "optim.lr=1e-3,2e-3"])


def launcher_check(*args: str) -> None:
    """The checks ``trainer.main`` runs before Hydra: the sweep's, then the Slurm launcher's."""
    argv = ["main", *args]
    sweep.check_command(argv)
    slurm_sweep.check_command(sweep.command_overrides(argv))


def test_a_launcher_without_m_is_refused_rather_than_training_here() -> None:
    with pytest.raises(ConfigError, match=r"hydra/launcher=ramp_slurm runs only a sweep.*add -m"):
        launcher_check("hydra/launcher=ramp_slurm", "optim.lr=1e-3")
    launcher_check("hydra/launcher=basic", "optim.lr=1e-3")  # Hydra's default launcher runs here anyway
    launcher_check("-m", "hydra/launcher=ramp_slurm", "optim.lr=1e-3")  # a sweep of one point


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "hydra.launcher.partiton=gpu",
            r"hydra.launcher.partiton is not a key .*did you mean hydra.launcher.partition\?",
        ),
        ("hydra.launcher.timeout_min=abc", r"hydra.launcher.timeout_min=abc is not of the type .* int$"),
        ("hydra.launcher.nodes=1,2", r"hydra.launcher.nodes is swept"),
        (
            "hydra.launcher.additional_parameters.mail-user=me@x",
            r"add it with a \+, \+hydra.launcher.additional_parameters.mail-user=me@x$",
        ),
        # 6 minutes leave no more than the 300 s of signal_delay_s plus the minute Slurm may take to signal.
        (
            "hydra.launcher.timeout_min=6",
            r"timeout_min=6 \(360 s\) is not above .*signal_delay_s=300 s plus a minute",
        ),
        ("hydra.launcher.signal_delay_s=0", r"must both be at least 1"),
    ],
)
def test_launcher_mistakes_get_one_line_before_anything_is_submitted(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        launcher_check("-m", "hydra/launcher=ramp_slurm", override, "optim.lr=1e-3,2e-3")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["hydra.launcher.timeout_min=7"],  # 420 s: above 300 s plus a minute
        ["hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30"],
        ["+hydra.launcher.additional_parameters.mail-user=me@x", "hydra.launcher.partition=gpu"],
        ["hydra.launcher.additional_parameters.signal=USR1@90", "hydra.launcher.cpus_per_task=8"],
    ],
)
def test_launcher_settings_that_work_pass(overrides: list[str]) -> None:
    launcher_check("-m", "hydra/launcher=ramp_slurm", *overrides, "optim.lr=1e-3,2e-3")
    # Each also composes: the check lets through only what Hydra takes.
    composed(["hydra/launcher=ramp_slurm", *overrides])


def test_each_points_configuration_is_checked_with_the_jobs_world_size_before_submitting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAMP_NPROC_PER_NODE", "2")
    with pytest.raises(ConfigError, match=r"^sweep job 2 of 2 \(optim.lr=-1\): optim.lr=-1.0 must be > 0"):
        launcher_check("-m", "hydra/launcher=ramp_slurm", "optim.lr=1e-3,-1")
    # 2 nodes x 2 ranks x micro-batch 2: a batch of 12 sequences is no whole number of micro-batches on 4 ranks.
    ramp = ("train.micro_batch_size=2", "train.max_steps=10")
    with pytest.raises(ConfigError, match=r"train\.batch_schedule"):
        launcher_check(
            "-m", "hydra/launcher=ramp_slurm", "hydra.launcher.nodes=2", *ramp, "train.batch_schedule=0:12"
        )
    launcher_check(
        "-m", "hydra/launcher=ramp_slurm", "hydra.launcher.nodes=1", *ramp, "train.batch_schedule=0:12"
    )
    monkeypatch.setenv("RAMP_NPROC_PER_NODE", "abc")
    with pytest.raises(ConfigError, match="RAMP_NPROC_PER_NODE=abc is not a number of processes"):
        launcher_check("-m", "hydra/launcher=ramp_slurm", "optim.lr=1e-3")


def test_a_swept_run_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"run\.name is swept, but it names the sweep"):
        launcher_check("-m", "run.name=a,b", "optim.lr=1e-3")
