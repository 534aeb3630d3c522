"""The Hydra configuration: every preset composes into its typed schema, and bad settings fail early."""

from __future__ import annotations

from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from trainer.config import (
    DATA_SCHEMAS,
    SCHEDULE_SCHEMAS,
    Config,
    ConfigError,
    CosineSchedule,
    DataConfig,
    DDPBackend,
    DeepSpeedBackend,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    WarmupStableDecaySchedule,
    register_configs,
    to_config,
)
from trainer.models import build_model, count_parameters, padded_vocab_size, param_groups

CONF_DIR = Path(__file__).parents[1] / "conf"
GROUPS = ("model", "data", "schedule", "optim", "backend", "logger")
GROUP_CLASSES: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "logger": LoggerConfig,
}
BACKEND_CLASSES: dict[str, type] = {"ddp": DDPBackend, "deepspeed": DeepSpeedBackend}
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException)


@pytest.fixture(scope="module", autouse=True)
def _schemas_registered() -> None:
    register_configs()


def compose(*overrides: str) -> DictConfig:
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra.compose("config", overrides=list(overrides))


def error_chain(err: BaseException) -> str:
    """The messages of an exception and of everything that caused it."""
    messages: list[str] = []
    current: BaseException | None = err
    while current is not None and len(messages) < 10:
        messages.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(messages)


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def expected_class(group: str, option: str) -> type:
    if group == "schedule":
        return SCHEDULE_SCHEMAS[option]
    if group == "backend":
        return BACKEND_CLASSES[option]
    if group == "data":
        return DATA_SCHEMAS[option]
    return GROUP_CLASSES[group]


def test_every_group_has_presets() -> None:
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no presets"
    assert options("schedule") == sorted(SCHEDULE_SCHEMAS)


@pytest.mark.parametrize(
    ("group", "option"), [pytest.param(g, o, id=f"{g}={o}") for g in GROUPS for o in options(g)]
)
def test_every_preset_composes(group: str, option: str) -> None:
    cfg = to_config(compose(f"{group}={option}"))
    node = getattr(cfg, group)
    assert type(node) is expected_class(group, option)
    # data.name is a Hugging Face dataset's config name; a data preset is named by its source.
    assert (node.source if group == "data" else node.name) == option


def test_schedule_presets_have_their_schema() -> None:
    assert type(to_config(compose("schedule=cosine")).schedule) is CosineSchedule
    wsd = to_config(compose("schedule=warmup_stable_decay")).schedule
    assert type(wsd) is WarmupStableDecaySchedule
    assert wsd.decay_ratio == 0.2
    assert wsd.decay_type == "1-sqrt"


DOCUMENTED_KEYS = [
    "train.max_steps",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.seq_len",
    "train.seed",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.ckpt_every",
    "train.max_grad_norm",
    "train.precision",
    "train.compile",
    "optim.lr",
    "optim.weight_decay",
    "optim.betas",
    "optim.eps",
    "optim.no_decay",
    "schedule.warmup_steps",
    "schedule.warmup_ratio",
    "run.name",
    "run.dir",
    "run.resume",
    "logger.wandb.mode",
    "model.name",
    "backend.name",
]


@pytest.fixture(scope="module")
def default_dcfg() -> DictConfig:
    return compose()


@pytest.mark.parametrize("key", DOCUMENTED_KEYS)
def test_default_composition_has_documented_key(default_dcfg: DictConfig, key: str) -> None:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(default_dcfg, parent)
    assert isinstance(node, DictConfig)
    assert leaf in node
    attrgetter(key)(to_config(default_dcfg))  # the typed object has it too


def test_default_composition_values(default_dcfg: DictConfig) -> None:
    cfg = to_config(default_dcfg)
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
    cfg = to_config(compose("run.name=exp1", "model=llama-tiny"))
    assert cfg.run.dir == "outputs/exp1"
    assert to_config(compose("model=llama-tiny")).run.dir == "outputs/llama-tiny"


def test_overrides_reach_the_typed_config() -> None:
    cfg = to_config(compose("train.max_steps=42", "train.precision=bf16", "optim.lr=1e-3"))
    assert cfg.train.max_steps == 42
    assert cfg.train.precision is Precision.bf16
    assert cfg.optim.lr == 1e-3


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        pytest.param(["train.max_stepz=3"], ["max_stepz"], id="unknown-key"),
        pytest.param(["train.max_steps=abc"], ["train.max_steps", "Integer"], id="wrong-type"),
        pytest.param(["train.precision=fp16"], ["train.precision", "fp16", "bf16"], id="bad-enum"),
        pytest.param(["schedule=cosine", "schedule.power=2"], ["schedule.power"], id="other-schedule-key"),
        pytest.param(
            ["schedule=linear", "schedule.num_cycles=2"], ["schedule.num_cycles"], id="linear-cycles"
        ),
        pytest.param(["model=gpt2-tinyy"], ["gpt2-tinyy"], id="unknown-preset"),
    ],
)
def test_composition_refuses(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(COMPOSE_ERRORS) as excinfo:
        compose(*overrides)
    text = error_chain(excinfo.value)
    for needle in needles:
        assert needle in text


@pytest.mark.parametrize("override", ["+train.max_stepz=3", "+schedule.power=2"])
def test_appended_unknown_key_is_refused(override: str) -> None:
    with pytest.raises(ConfigError, match="is not a ramp setting"):
        to_config(compose(override))


def test_model_extra_accepts_appended_keys() -> None:
    assert to_config(compose("+model.extra.n_inner=64")).model.extra == {"n_inner": 64}


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
    dcfg = compose(*overrides)
    with pytest.raises(ConfigError) as excinfo:
        to_config(dcfg)
    for needle in needles:
        assert needle in str(excinfo.value)


def test_resume_accepts_an_existing_path(tmp_path: Path) -> None:
    assert to_config(compose(f"run.resume={tmp_path}")).run.resume == str(tmp_path)
    assert to_config(compose("run.resume=never")).run.resume == "never"


@pytest.fixture(scope="module", params=["gpt2-tiny", "llama-tiny"])
def built(request: pytest.FixtureRequest) -> Iterator[tuple[Config, nn.Module]]:
    cfg = to_config(compose(f"model={request.param}"))
    torch.manual_seed(0)
    yield cfg, build_model(cfg.model, tokenizer_vocab=257, eos_id=256)


def test_param_groups_split_by_shape(built: tuple[Config, nn.Module]) -> None:
    cfg, model = built
    groups = {group["name"]: group for group in param_groups(model, cfg.optim)}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["weight_decay"] == cfg.optim.weight_decay == 0.1
    assert groups["no_decay"]["weight_decay"] == 0.0
    placed = [id(p) for group in groups.values() for p in group["params"]]
    assert len(placed) == len(set(placed)), "a parameter is in two groups"
    assert set(placed) == {id(p) for p in model.parameters()}, "a parameter is in no group"
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    no_decay_ids = {id(p) for p in groups["no_decay"]["params"]}
    for name, param in model.named_parameters():
        assert param.ndim in (1, 2), name
        assert id(param) in (no_decay_ids if param.ndim == 1 else decay_ids), name
    assert groups["decay"]["params"] and groups["no_decay"]["params"]


def test_built_model_pads_the_vocabulary(built: tuple[Config, nn.Module]) -> None:
    cfg, model = built
    assert model.config.model_type == cfg.model.arch
    assert model.config.vocab_size == 320
    assert model.get_input_embeddings().weight.shape == (320, cfg.model.hidden_size)
    assert 1_000_000 <= count_parameters(model) <= 3_000_000


@pytest.mark.parametrize(("tokens", "padded"), [(1, 64), (64, 64), (256, 256), (257, 320), (50_257, 50_304)])
def test_padded_vocab_size(tokens: int, padded: int) -> None:
    assert padded_vocab_size(tokens) == padded
