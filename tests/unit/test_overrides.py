"""A new user's mistakes on the command line: one ``ramp: error:`` line naming the key, its group and
the closest valid key or preset, exit 2, before Hydra composes anything; and every legitimate form of
override still composes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from trainer.config import check_command, check_overrides, command_jobs, compose
from trainer.errors import ConfigError
from trainer.keys import help_text
from trainer.overrides import closest

PRESETS = "gpt2-124m, gpt2-tiny, llama-1b, llama-tiny"

MISTAKES = [
    (
        ["data.files=x.jsonl", "train.max_steps=1"],
        "data.files is not a key of data=builtin; it is a key of data=text and data=hf (add data=text or data=hf)",
    ),
    (
        ["optim.learning_rate=1e-3"],
        "optim.learning_rate is not a key of optim (optim=adamw); did you mean optim.lr?",
    ),
    (
        ["model=gpt3"],
        f"model=gpt3 is not a model preset; choose one of {PRESETS} (did you mean gpt2-tiny or gpt2-124m?)",
    ),
    (["train.max_step=3"], "train.max_step is not a key of train; did you mean train.max_steps?"),
    (
        ["model=model_schema"],
        f"model=model_schema is the schema every model preset extends, not a preset; choose one of {PRESETS}",
    ),
    (
        ["train.max_steps=abc"],
        "train.max_steps=abc is not an integer; set train.max_steps to an integer, or null",
    ),
    (
        ["schedule=cosine", "schedule.power=2"],
        "schedule.power is not a key of schedule=cosine; it is a key of schedule=polynomial "
        "(add schedule=polynomial)",
    ),
    (
        ["backend.zero_stage=3"],
        "backend.zero_stage is not a key of backend=ddp; it is a key of backend=deepspeed (add backend=deepspeed)",
    ),
    (
        ["data=text", "data.file=x"],
        "data.file is not a key of data=text; did you mean data.files?",
    ),
    (
        ["data.file=x"],
        "data.file is not a key of data=builtin; did you mean data.files? it is a key of data=text and data=hf "
        "(add data=text or data=hf)",
    ),
    (["train.precision=fp16"], "train.precision=fp16 is not one of fp32, bf16; did you mean bf16?"),
    (["train.compile=maybe"], "train.compile=maybe is not true or false; set train.compile to true or false"),
    (["optim.lr=fast"], "optim.lr=fast is not a number; set optim.lr to a number"),
    (
        ["train.micro_batch_size=null"],
        "train.micro_batch_size=null: train.micro_batch_size cannot be null; set it to an integer",
    ),
    (["optim.betas=0.9"], "optim.betas=0.9 is not a list; write one in brackets, e.g. optim.betas=[a,b]"),
    (
        ["optim.groups=[{name:embed,match:['*wte*'],lr_multiplier:0.1}]"],
        "optim.groups: lr_multiplier is not a key of an entry of optim.groups (its keys: name, match, ndim, "
        "lr_mult, weight_decay); did you mean lr_mult?",
    ),
    (["max_steps=3"], "max_steps is not a group or key of ramp's config; did you mean train.max_steps?"),
    (["modle=llama-tiny"], "modle is not a group or key of ramp's config; did you mean model?"),
    (["train.batch_size=4"], "train.batch_size is not a key of train; did you mean train.micro_batch_size?"),
    (
        ["logger.wandb.mood=online"],
        "logger.wandb.mood is not a key of logger (logger=default); did you mean logger.wandb.mode?",
    ),
    (["+train.max_stepz=3"], "train.max_stepz is not a key of train; did you mean train.max_steps?"),
    (
        ["+train.seq_len=64"],
        "+train.seq_len=64: train.seq_len already has a value (256); drop the +: train.seq_len=64",
    ),
    (["~train.seed"], "~train.seed: ramp's keys cannot be removed; set train.seed=VALUE instead"),
    (
        ["~model"],
        f"~model removes the model preset a run needs; pick another with model=<preset> (one of {PRESETS})",
    ),
    (
        ["model.extra.n_inner=64"],
        "model.extra.n_inner is not set by model=gpt2-tiny; add a new entry with a +: +model.extra.n_inner=64",
    ),
    (
        ["model.extra={n_inner:64}"],
        "model.extra={n_inner:64}: model.extra.n_inner is not set by model=gpt2-tiny; add new entries with a +: "
        "+model.extra={n_inner:64}",
    ),
    (
        ["train=3"],
        "train=3: train holds keys, not a value; set them one by one, e.g. train.max_steps=VALUE",
    ),
    (
        ["optim.lr=1e-3,2e-3"],
        "optim.lr=1e-3,2e-3 lists several values: add -m to run one job per value (a sweep); a key that takes "
        "a list takes it in brackets, optim.lr=[a,b]",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), MISTAKES, ids=[" ".join(o) for o, _ in MISTAKES])
def test_a_mistake_is_one_message_naming_the_key_its_group_and_the_closest_choice(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError) as excinfo:
        check_overrides(overrides)
    assert str(excinfo.value) == message
    with pytest.raises(ConfigError) as excinfo:  # the tools' compose() says the same
        compose(overrides)
    assert str(excinfo.value) == message


SWEEP_MISTAKES = [
    (
        ["model=glob(*)"],
        "model=glob(*) also matches model_schema, the schema the model presets extend, not a preset; leave it "
        "out, e.g. model=glob(*,exclude=*_schema)",
    ),
    (
        ["data=builtin,text", "data.files=a.txt"],
        "data.files is not a key of data=builtin; it is a key of data=text and data=hf (add data=text or data=hf)",
    ),
    (
        ["optim.lr=interval(1e-4,1e-3)"],
        "optim.lr=interval(1e-4,1e-3): a sweep over an interval needs a sweeper that samples it; list the values "
        "instead, e.g. optim.lr=1,2,3 or optim.lr=range(1,4)",
    ),
    (
        ["train.max_steps=10,abc"],
        "train.max_steps=abc is not an integer; set train.max_steps to an integer, or null",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), SWEEP_MISTAKES, ids=[" ".join(o) for o, _ in SWEEP_MISTAKES]
)
def test_a_sweeps_mistake_is_refused_for_every_job(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        check_command(["trainer.main", "-m", *overrides])
    assert str(excinfo.value) == message


LEGITIMATE = [
    ["+model.extra.n_inner=64"],
    ["++train.max_steps=3"],
    ["+train.max_steps=3"],
    ["hydra.job.chdir=false"],
    ["hydra/job_logging=none"],
    ["run.dir=outputs/lr_${optim.lr}"],
    ["train.max_steps=${train.log_every}"],
    ["run.name='my run'"],
    ["train.max_steps='5'"],
    ["data=text", "data.files=x.jsonl"],
    ["data=text", "data.files=[a/*.txt,b.jsonl]"],
    ["data=hf", "data.path=json", "data.files=x.jsonl"],
    ["schedule=wsd_s", "schedule.period_steps=[100,100,100]"],
    ["schedule=polynomial", "schedule.power=2"],
    ["backend=deepspeed", "backend.zero_stage=2"],
    ["backend=deepspeed", "+backend.extra.fp16.enabled=false"],
    ["backend=deepspeed", "+backend.extra={fp16:{enabled:false}}"],
    ["+model.extra={n_inner:64}"],
    ["logger.wandb.mode=disabled"],
    ["logger.wandb.tags=[a,b]"],
    ["logger.wandb={mode:disabled,project:x}"],
    ["optim.groups=[{name:embed,match:['*wte*'],lr_mult:0.1}]"],
    ["optim.betas=[0.9,0.99]"],
    ["optim.betas.0=0.8"],
    ["train={max_steps:3,seq_len:64}"],
    ["train.precision=bf16"],
    ["train.compile=true"],
    ["train.threads=null"],
    ["train.max_tokens=2B"],
    ["train.stop_at=2B tokens"],
    ["train.batch_schedule=0:8 1M:16"],
    ["model=llama-tiny", "model.num_kv_heads=2"],
    ["logger=tensorboard"],
]


@pytest.mark.parametrize("overrides", LEGITIMATE, ids=" ".join)
def test_every_legitimate_form_still_composes(overrides: list[str]) -> None:
    compose(overrides)


@pytest.mark.parametrize(
    ("overrides", "jobs"),
    [
        (["-m", "optim.lr=1e-3,2e-3", "model=gpt2-tiny"], 2),
        (["-m", "train.max_steps=range(1,4)"], 3),
        (["-m", "model=gpt2-tiny,llama-tiny", "model.num_layers=2"], 2),
        (["-m", "data=text,hf", "data.files=x.jsonl"], 2),
        (["-m", "model=glob(*,exclude=*_schema)"], 4),
        (["--multirun", "run.dir=outputs/lr_${optim.lr}", "optim.lr=1e-3,2e-3"], 2),
        (["optim.lr=1e-3"], 1),
    ],
)
def test_sweeps_pass_the_check_and_each_job_composes(overrides: list[str], jobs: int) -> None:
    argv = ["trainer.main", *overrides]
    check_command(argv)
    expanded = command_jobs(argv)
    assert len(expanded) == jobs
    for job in expanded:
        compose(job)


def test_a_command_that_takes_its_presets_elsewhere_is_left_to_hydra(tmp_path: Path) -> None:
    check_command(["trainer.main", "--config-dir", str(tmp_path), "model=mine"])
    assert command_jobs(["trainer.main", "--config-dir", str(tmp_path), "model=mine"]) == []


def test_closest_knows_other_trainers_names_spelling_and_initials() -> None:
    keys = ["optim.lr", "optim.weight_decay", "optim.betas"]
    assert closest("optim.learning_rate", keys) == ["optim.lr"]
    assert closest("optim.weight_decy", keys) == ["optim.weight_decay"]
    assert closest("optim.wd", keys) == ["optim.weight_decay"]  # initials
    assert closest("optim.momentum", keys) == []
    assert closest("train.block_size", ["train.seq_len", "train.seed"]) == ["train.seq_len"]


def test_help_lists_real_presets_and_every_key_with_its_description() -> None:
    text = help_text()
    assert "_schema" not in text
    lines = text.splitlines()
    assert "  model     gpt2-124m  gpt2-tiny*  llama-1b  llama-tiny" in lines
    assert "  data      builtin*  hf  text" in lines
    rows = [line.split(None, 1) for line in lines if line.startswith("  ") and "." in line.split()[0]]
    described = {key: doc for key, doc in rows}
    assert described["train.max_steps"].startswith("The run's length in optimizer steps")
    assert described["optim.lr"] == "Peak learning rate; the schedule multiplies it."
    assert described["logger.wandb.mode"].startswith("offline")
    assert described["schedule.power"] == "(schedule=polynomial) Exponent of the decay; 1.0 is linear."
    files = [doc for key, doc in rows if key == "data.files"]
    assert [doc.split(")")[0] for doc in files] == ["(data=text", "(data=hf"]
    assert all(len(row) == 2 and row[1] for row in rows), "every key has a description"


def ramp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.main", *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [MISTAKES[0], MISTAKES[1], MISTAKES[2], MISTAKES[3], MISTAKES[4], MISTAKES[5]],
    ids=["data.files", "optim.learning_rate", "model=gpt3", "train.max_step", "model=model_schema", "abc"],
)
def test_trainer_main_reports_a_mistake_in_one_line_and_exits_2(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    result = ramp(*overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"ramp: error: {message}"]
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "a refused start writes nothing"


def test_trainer_main_help_lists_presets_and_keys_and_exits_0(tmp_path: Path) -> None:
    result = ramp("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == help_text()
    assert "_schema" not in result.stdout
