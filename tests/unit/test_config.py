"""The Hydra configuration: every preset composes into its typed schema, and bad settings fail early."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.config import (
    BACKENDS,
    DATA_SOURCES,
    Config,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    compose,
    conf_dir,
)
from trainer.errors import ConfigError
from trainer.schedules import SCHEDULES, CosineSchedule, WarmupStableDecaySchedule

GROUPS = ("model", "data", "schedule", "optim", "backend", "logger")
ONE_SCHEMA: dict[str, type] = {"model": ModelConfig, "optim": OptimConfig, "logger": LoggerConfig}
BY_OPTION: dict[str, dict[str, type]] = {
    "data": dict(DATA_SOURCES),
    "schedule": dict(SCHEDULES),
    "backend": dict(BACKENDS),
}


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (conf_dir() / group).glob("*.yaml"))


def expected_class(group: str, option: str) -> type:
    return BY_OPTION[group][option] if group in BY_OPTION else ONE_SCHEMA[group]


def test_every_group_has_presets_and_every_schedule_and_backend_one() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no presets"
    assert options("schedule") == sorted(SCHEDULES)
    assert options("backend") == sorted(BACKENDS)
    assert options("data") == sorted(DATA_SOURCES)


@pytest.mark.parametrize(
    ("group", "option"), [pytest.param(g, o, id=f"{g}={o}") for g in GROUPS for o in options(g)]
)
def test_every_preset_composes(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    node: Any = getattr(cfg, group)
    # data.name is a Hugging Face dataset's config name; a data preset is named by its source.
    label = node.source if group == "data" else getattr(node, "name", option)
    assert type(node) is expected_class(group, option)
    assert label == option


def test_schedule_presets_have_their_schema() -> None:
    assert type(compose(["schedule=cosine"]).schedule) is CosineSchedule
    wsd = compose(["schedule=warmup_stable_decay"]).schedule
    assert type(wsd) is WarmupStableDecaySchedule
    assert wsd.decay_ratio == 0.2
    assert wsd.decay_type == "1-sqrt"


def test_default_composition_values() -> None:
    cfg = compose()
    assert isinstance(cfg, Config)
    assert cfg.model.name == "gpt2-tiny"
    assert cfg.backend.name == "ddp"
    assert cfg.logger.wandb.mode == "offline"
    assert cfg.run.name == "gpt2-tiny"
    assert cfg.run.dir == "outputs/" + cfg.run.name
    assert cfg.run.resume == "auto"
    assert cfg.train.precision is Precision.fp32
    assert cfg.train.compile is False
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.schedule.name == "cosine"


def test_run_dir_follows_run_name() -> None:
    cfg = compose(["run.name=exp1", "model=llama-tiny"])
    assert cfg.run.dir == "outputs/exp1"
    assert compose(["model=llama-tiny"]).run.dir == "outputs/llama-tiny"


def test_overrides_reach_the_typed_config() -> None:
    cfg = compose(["train.max_steps=42", "train.precision=bf16", "optim.lr=1e-3"])
    assert cfg.train.max_steps == 42
    assert cfg.train.precision is Precision.bf16
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        pytest.param(["train.max_stepz=3"], ["max_stepz"], id="unknown-key"),
        pytest.param(["train.max_steps=abc"], ["train.max_steps=abc", "an integer"], id="wrong-type"),
        pytest.param(["train.precision=fp16"], ["train.precision", "fp16", "bf16"], id="bad-enum"),
        pytest.param(
            ["schedule=cosine", "schedule.power=2"],
            ["schedule.power", "schedule=cosine", "schedule=polynomial"],
            id="other-schedule-key",
        ),
        pytest.param(
            ["schedule=linear", "schedule.num_cycles=2"],
            ["schedule.num_cycles", "schedule=cosine_with_restarts"],
            id="linear-cycles",
        ),
        pytest.param(
            ["model=gpt2-tinyy"], ["model=gpt2-tinyy", "did you mean gpt2-tiny"], id="unknown-preset"
        ),
    ],
)
def test_composition_refuses(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        compose(overrides)
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize("override", ["+train.max_stepz=3", "+schedule.power=2"])
def test_appended_unknown_key_is_refused(override: str) -> None:
    with pytest.raises(ConfigError, match="is not a key of"):
        compose([override])


def test_model_extra_accepts_appended_keys() -> None:
    assert compose(["+model.extra.n_inner=64"]).model.extra == {"n_inner": 64}


CROSS_KEY_ERRORS = [
    (["train.seq_len=2048"], ["train.seq_len", "model.max_position_embeddings"]),
    (["train.grad_accum_steps=0"], ["train.grad_accum_steps"]),
    (["train.micro_batch_size=0"], ["train.micro_batch_size"]),
    (["train.eval_every=10", "train.eval_steps=0"], ["train.eval_steps"]),
    (["optim.lr=0"], ["optim.lr"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["optim.betas=[0.9,1.0]"], ["optim.betas"]),
    (["schedule.warmup_steps=500", "train.max_steps=100"], ["schedule.warmup_steps", "train.max_steps"]),
    (["schedule=polynomial", "schedule.lr_end=1e-3"], ["schedule.lr_end"]),
    (["logger.wandb.mode=sometimes"], ["logger.wandb.mode"]),
    (["run.resume=/does/not/exist"], ["run.resume"]),
    (["model.num_heads=5"], ["model.hidden_size", "model.num_heads"]),
    (["model=llama-tiny", "model.num_kv_heads=3"], ["model.num_kv_heads"]),
    (["model.hidden_size=???"], ["model.hidden_size"]),
]


@pytest.mark.parametrize(
    ("overrides", "needles"), [pytest.param(o, n, id=" ".join(o)) for o, n in CROSS_KEY_ERRORS]
)
def test_cross_key_validation_names_the_key(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        compose(overrides)
    for needle in needles:
        assert needle in str(excinfo.value)


def test_resume_accepts_an_existing_path(tmp_path: Path) -> None:
    assert compose([f"run.resume={tmp_path}"]).run.resume == str(tmp_path)
    assert compose(["run.resume=never"]).run.resume == "never"


def test_composing_any_schedule_or_backend_imports_no_torch() -> None:
    """The schedule preview and a config check are torch-free for every configuration."""
    import subprocess
    import sys

    combos = [f"schedule={name}" for name in sorted(SCHEDULES)] + [
        f"backend={name}" for name in sorted(BACKENDS)
    ]
    program = (
        "import sys\n"
        "from trainer.config import compose\n"
        f"for option in {combos!r}:\n"
        "    compose([option]).lr_schedule.lr(1)\n"
        "heavy = sorted(m for m in ('torch', 'deepspeed', 'transformers', 'numpy') if m in sys.modules)\n"
        "print('imported:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported: []"
