"""Typed configuration: one dataclass per Hydra group, registered in Hydra's ConfigStore.

Every YAML under ``conf/<group>/`` extends one of these schemas through its defaults list, so an
unknown key or a value of the wrong type fails while Hydra composes the config, before anything runs.
Checks that span several keys (a warmup longer than the run, an impossible batch) live in
:func:`validate` and raise :class:`ConfigError` with the key to change and how.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration a run cannot start with. The message names the key and the fix."""


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class OnNan(str, Enum):
    halt = "halt"
    skip = "skip"


class ResumeMode(str, Enum):
    auto = "auto"
    never = "never"


class Offload(str, Enum):
    none = "none"
    cpu = "cpu"


@dataclass
class RunConfig:
    name: str = "${model.name}"
    """Run name: the run folder's name and the wandb run's name."""
    dir: str = "outputs/${run.name}"
    """Run folder. Only global rank 0 writes into it."""
    resume: str = "auto"
    """auto: continue the newest complete checkpoint in run.dir; never: refuse an existing run.dir; or a
    checkpoint PATH."""


@dataclass
class TrainConfig:
    max_steps: int = 300
    """Total optimizer steps. The global step runs 1..max_steps."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step. Never changes the global step."""
    seq_len: int = 256
    """Tokens per sequence (the model sees seq_len inputs and predicts seq_len targets)."""
    seed: int = 1337
    """Seeds model initialisation, data order and every random number generator."""
    log_every: int = 10
    """Reduce and log metrics every N optimizer steps, and at the first and the last step."""
    eval_every: int = 100
    """Evaluate on the validation slice every N steps and at the end; 0 disables evaluation."""
    eval_steps: int = 10
    """Validation micro-batches per rank in one evaluation."""
    ckpt_every: int = 0
    """Save a checkpoint every N steps (and always at the end); 0 saves only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest N checkpoints; older ones are deleted once a newer one is complete."""
    on_nan: OnNan = OnNan.halt
    """Non-finite gradient norm: halt (stop before the optimizer step, weights untouched) or skip
    (drop the update, count it, do not advance the global step or the schedule)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    precision: Precision = Precision.fp32
    """fp32, or bf16 autocast for the forward pass (weights and optimizer state stay fp32)."""
    compile: bool = False
    """Compile the model with torch.compile."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, about a third more compute."""
    threads: int | None = None
    """Intra-op threads per rank; default: the machine's cores divided by the ranks on this node."""


@dataclass
class ModelConfig:
    """A causal language model built with transformers from a config; nothing is downloaded."""

    name: str = MISSING
    """Preset name, used in the default run name."""
    arch: str = MISSING
    """transformers model type: gpt2 or llama (any AutoModelForCausalLM type works through `extra`)."""
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_heads: int = MISSING
    num_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama); default: num_heads."""
    intermediate_size: int | None = None
    """MLP width; default: the architecture's own (4 x hidden for gpt2)."""
    max_position_embeddings: int = 1024
    vocab_size: int | None = None
    """Default: the tokenizer's vocabulary, padded up to a multiple of 64."""
    tie_word_embeddings: bool = True
    dropout: float = 0.0
    rope_theta: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the transformers config, passed as they are."""


@dataclass
class DataConfig:
    """Keys every data source shares; pick the source with ``data=<source>``."""

    source: str = MISSING
    """builtin (the Python standard library's sources), text (local files) or hf (datasets.load_dataset)."""
    tokenizer: str = "bytes"
    """bytes (byte-level, no training); a tokenizer.json path; a transformers tokenizer name or folder
    (AutoTokenizer); or train (a byte-level BPE of data.vocab_size trained on the training documents)."""
    vocab_size: int = 8192
    """Vocabulary of the BPE that data.tokenizer=train learns, its end-of-document token included."""
    eos_token: str | None = None
    """End-of-document token of a tokenizer.json or AutoTokenizer; default: the tokenizer's eos_token,
    else the first of <|endoftext|>, </s>, <eos>, <|end_of_text|> that its vocabulary holds."""
    val_fraction: float = 0.01
    """Share of documents held out for validation (chosen by a hash of each document's id)."""
    num_proc: int = 1
    """Processes that tokenize. One is enough on a few cores: Rust tokenizers use every core inside it;
    on many cores more processes keep its Python side (reading, collecting ids) from holding them back."""
    cache_dir: str | None = None
    """Where tokenized data is cached; default: $RAMP_CACHE_DIR, else ~/.cache/ramp."""


@dataclass
class BuiltinData(DataConfig):
    source: str = "builtin"


@dataclass
class TextData(DataConfig):
    source: str = "text"
    # Any, not list[str]: a single path or glob is the common case, and OmegaConf cannot type a
    # union of a string and a list. validate() checks the value.
    files: Any = None
    """A path, a glob or a folder, or a list of them: .txt (one document per file), .jsonl / .json and
    .parquet (one document per record)."""
    text_field: str = "text"
    """The field holding a record's text in .jsonl, .json and .parquet files."""


@dataclass
class HFData(DataConfig):
    source: str = "hf"
    path: str | None = None
    """A hub dataset name, a local data folder, a save_to_disk folder, or a builder (json, parquet, text,
    csv, arrow) that reads data.files."""
    name: str | None = None
    """The dataset's configuration name (load_dataset's second argument)."""
    split: str = "train"
    """The split to train on; the validation documents are held out from it."""
    files: Any = None
    """data_files for a builder: a path or glob, or a list of them."""
    text_field: str = "text"
    """The column holding a record's text."""
    streaming: bool = False
    """Stream the dataset instead of downloading it whole before tokenizing."""


DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    schema.source: schema for schema in (BuiltinData, TextData, HFData)
}


@dataclass
class ScheduleConfig:
    """LR multiplier as a function of the global step; names and formulas follow transformers.get_scheduler."""

    name: str = MISSING
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps; wins over warmup_ratio when set."""
    warmup_ratio: float | None = None
    """Warmup length as a fraction of train.max_steps (rounded up)."""


@dataclass
class ConstantSchedule(ScheduleConfig):
    name: str = "constant"


@dataclass
class ConstantWithWarmupSchedule(ScheduleConfig):
    name: str = "constant_with_warmup"


@dataclass
class LinearSchedule(ScheduleConfig):
    name: str = "linear"


@dataclass
class CosineSchedule(ScheduleConfig):
    name: str = "cosine"
    num_cycles: float = 0.5
    """Cosine waves over the decay; 0.5 is one half-wave from peak to 0."""


@dataclass
class CosineWithRestartsSchedule(ScheduleConfig):
    name: str = "cosine_with_restarts"
    num_cycles: int = 1
    """Hard restarts: the decay is split into this many half-cosines."""


@dataclass
class PolynomialSchedule(ScheduleConfig):
    name: str = "polynomial"
    lr_end: float = 1e-7
    """Absolute LR reached at train.max_steps; must be below optim.lr."""
    power: float = 1.0


@dataclass
class InverseSqrtSchedule(ScheduleConfig):
    name: str = "inverse_sqrt"
    timescale: int | None = None
    """Default: the warmup length, or 10000 without warmup."""


@dataclass
class CosineWithMinLRSchedule(ScheduleConfig):
    name: str = "cosine_with_min_lr"
    num_cycles: float = 0.5
    min_lr: float | None = None
    """Absolute floor of the cosine; wins over min_lr_rate when set."""
    min_lr_rate: float | None = None
    """Floor as a fraction of optim.lr."""


@dataclass
class CosineWarmupWithMinLRSchedule(CosineWithMinLRSchedule):
    name: str = "cosine_warmup_with_min_lr"
    warmup_lr_rate: float | None = None
    """First warmup step's LR as a fraction of optim.lr; default 1/warmup_steps."""


@dataclass
class WarmupStableDecaySchedule(ScheduleConfig):
    name: str = "warmup_stable_decay"
    num_decay_steps: int | None = None
    """Decay length in steps; wins over decay_ratio when set."""
    decay_ratio: float | None = None
    """Decay length as a fraction of train.max_steps (rounded up)."""
    num_stable_steps: int | None = None
    """Default: what warmup and decay leave of train.max_steps."""
    warmup_type: str = "linear"
    """linear, cosine or 1-sqrt."""
    decay_type: str = "cosine"
    """linear, cosine or 1-sqrt."""
    min_lr_ratio: float = 0.0
    num_cycles: float = 0.5


SCHEDULE_SCHEMAS: dict[str, type[ScheduleConfig]] = {
    schema.name: schema
    for schema in (
        ConstantSchedule,
        ConstantWithWarmupSchedule,
        LinearSchedule,
        CosineSchedule,
        CosineWithRestartsSchedule,
        PolynomialSchedule,
        InverseSqrtSchedule,
        CosineWithMinLRSchedule,
        CosineWarmupWithMinLRSchedule,
        WarmupStableDecaySchedule,
    )
}


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4
    """Peak learning rate; the schedule multiplies it."""
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    no_decay: list[str] = field(default_factory=lambda: ["*.bias", "*norm*", "*ln_*"])
    """Parameter-name glob patterns excluded from weight decay (biases and norm weights)."""
    fused: bool | None = None
    """Fused AdamW kernel; default: on for CUDA."""


@dataclass
class BackendConfig:
    name: str = MISSING


@dataclass
class DDPBackend(BackendConfig):
    name: str = "ddp"
    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False


@dataclass
class DeepSpeedBackend(BackendConfig):
    """DeepSpeed's engine. Batch sizes, accumulation, clipping and precision come from train.*."""

    name: str = "deepspeed"
    zero_stage: int = 2
    """0: plain data parallel through the engine; 1: shard optimizer state; 2: also gradients; 3: also
    parameters."""
    offload_optimizer: Offload = Offload.none
    """cpu: keep optimizer state and the update on the CPU (ZeRO 1-3; DeepSpeed's CPU Adam)."""
    offload_params: Offload = Offload.none
    """cpu: keep parameters on the CPU between uses (ZeRO 3 only)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further DeepSpeed config keys, merged in as they are; a key ramp sets from its own keys is refused."""


@dataclass
class WandbConfig:
    mode: str = "offline"
    """offline (written under run.dir, upload later with `wandb sync`), online, or disabled."""
    project: str = "ramp"
    entity: str | None = None
    name: str | None = None
    """Default: run.name."""
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    name: str = MISSING
    progress: str = "auto"
    """auto: a progress bar in an interactive terminal, else one line per log step; bar; lines; off."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: bool = False
    """Also write tensorboard event files under run.dir/tensorboard (metrics.jsonl is always written)."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device, for MFU; default: the bf16 dense peak of a known GPU (A100, H100,
    H200), and no MFU where none is known (a CPU)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    schedule: ScheduleConfig = MISSING
    optim: OptimConfig = MISSING
    backend: BackendConfig = MISSING
    logger: LoggerConfig = MISSING


def register_configs() -> None:
    """Register every schema, so each YAML can name its own in its defaults list."""
    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    store.store(group="model", name="model_schema", node=ModelConfig)
    for source, data_schema in DATA_SCHEMAS.items():
        store.store(group="data", name=f"{source}_schema", node=data_schema)
    store.store(group="optim", name="optim_schema", node=OptimConfig)
    store.store(group="backend", name="ddp_schema", node=DDPBackend)
    store.store(group="backend", name="deepspeed_schema", node=DeepSpeedBackend)
    store.store(group="logger", name="logger_schema", node=LoggerConfig)
    for name, schema in SCHEDULE_SCHEMAS.items():
        store.store(group="schedule", name=f"{name}_schema", node=schema)


def _reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra lets ``+key=value`` add keys to a typed node; ramp accepts only the keys its schemas declare."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if schema is not None and is_dataclass(schema) else None
    for key in map(str, node):
        if known is not None and key not in known:
            raise ConfigError(
                f"{prefix}{key} is not a ramp setting; remove it or check its spelling in the README's key table"
            )
        child = node._get_node(key)
        if isinstance(child, DictConfig) and known is not None:
            _reject_unknown_keys(child, f"{prefix}{key}.")


def to_config(cfg: DictConfig) -> Config:
    """Turn a composed DictConfig into typed objects, resolving interpolations, then validate."""
    _reject_unknown_keys(cfg)
    try:
        config = OmegaConf.to_object(cfg)
    except Exception as err:  # omegaconf reports a missing value or a bad interpolation
        raise ConfigError(_omegaconf_message(err)) from None
    assert isinstance(config, Config)
    validate(config)
    return config


def _omegaconf_message(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    text = str(err).splitlines()[0]
    if key:
        return f"{key}: {text}; set it on the command line, e.g. {key}=VALUE"
    return text


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Checks across keys, with the fix named. Schedule numbers are checked by the schedule itself."""
    from trainer.schedules import build_schedule

    t = cfg.train
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "seq_len", "log_every"):
        value = getattr(t, key)
        _require(value >= 1, f"train.{key}={value} must be at least 1")
    _require(t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints} must be at least 1")
    for key in ("eval_every", "eval_steps", "ckpt_every"):
        value = getattr(t, key)
        _require(value >= 0, f"train.{key}={value} must be 0 or more")
    _require(
        t.eval_every == 0 or t.eval_steps >= 1,
        "train.eval_steps must be at least 1 when train.eval_every > 0 (set train.eval_every=0 to skip evaluation)",
    )
    _require(
        t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm} must be >= 0 (0 disables clipping)"
    )
    _require(t.threads is None or t.threads >= 1, f"train.threads={t.threads} must be at least 1")
    o = cfg.optim
    _require(o.name == "adamw", f"optim.name={o.name} is not supported; use optim=adamw")
    _require(o.lr > 0, f"optim.lr={o.lr} must be > 0 (it is the peak learning rate)")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas={list(o.betas)} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]",
    )
    _require(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    m = cfg.model
    for key in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        value = getattr(m, key)
        _require(value >= 1, f"model.{key}={value} must be at least 1")
    _require(
        m.hidden_size % m.num_heads == 0,
        f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}",
    )
    _require(
        m.num_kv_heads is None or (m.num_kv_heads >= 1 and m.num_heads % m.num_kv_heads == 0),
        f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads={m.num_heads}",
    )
    _require(
        t.seq_len <= m.max_position_embeddings,
        f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings={m.max_position_embeddings}; "
        "lower train.seq_len or raise model.max_position_embeddings",
    )
    _require(0 <= m.dropout < 1, f"model.dropout={m.dropout} must be in [0, 1)")
    _require(0 < cfg.data.val_fraction < 1, f"data.val_fraction={cfg.data.val_fraction} must be in (0, 1)")
    _validate_data(cfg.data)
    _require(
        cfg.logger.progress in ("auto", "bar", "lines", "off"),
        f"logger.progress={cfg.logger.progress} must be auto, bar, lines or off",
    )
    _require(
        cfg.logger.peak_flops is None or cfg.logger.peak_flops > 0,
        f"logger.peak_flops={cfg.logger.peak_flops} must be > 0 (FLOP/s of one device, e.g. 989e12), or null",
    )
    _require(
        cfg.logger.wandb.mode in ("offline", "online", "disabled"),
        f"logger.wandb.mode={cfg.logger.wandb.mode} must be offline, online or disabled",
    )
    _require(
        cfg.run.resume in (ResumeMode.auto.value, ResumeMode.never.value) or os.path.exists(cfg.run.resume),
        f"run.resume={cfg.run.resume} is neither auto, never nor an existing checkpoint path; "
        "point it at a checkpoints/step_<N> folder",
    )
    build_schedule(cfg.schedule, max_steps=t.max_steps, peak_lr=o.lr)
    if isinstance(cfg.backend, DeepSpeedBackend):
        from trainer.backends.deepspeed import check_config

        check_config(cfg)


def _validate_data(d: DataConfig) -> None:
    """Value checks only: a file that is missing or a tokenizer that cannot load fail in build_data."""
    _require(bool(d.tokenizer), "data.tokenizer is empty; use bytes, train, a tokenizer.json path or a name")
    _require(
        d.tokenizer != "train" or 258 <= d.vocab_size < 2**32,
        f"data.vocab_size={d.vocab_size} must be at least 258 (256 bytes, the end-of-document token and "
        "one merge) for data.tokenizer=train",
    )
    _require(d.num_proc >= 1, f"data.num_proc={d.num_proc} must be at least 1")
    files = getattr(d, "files", None)
    _require(
        files is None
        or isinstance(files, str)
        or (isinstance(files, list) and all(isinstance(f, str) for f in files)),
        f"data.files={files} must be a path or glob, or a list of them, e.g. data.files=[corpus/*.txt]",
    )
