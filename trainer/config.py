"""Typed configuration: the root :class:`Config`, one schema per Hydra group, and :func:`compose`.

Every YAML under ``conf/<group>/`` extends one of these schemas through its defaults list, so an
unknown key or a value of the wrong type fails while Hydra composes the config, before anything
runs. Each schema checks its own keys (``check()``); :meth:`Config.check` adds the checks that span
groups. Every key is declared with :func:`trainer.schema.setting`: its docstring below the field
is its documentation (the README's key table is generated from it, ``python -m trainer.keys``),
and its metadata says what changing it on resume does (applies, changes the math, or is refused).

This module imports no torch and no implementation module: composing any configuration (every
schedule, ``backend=deepspeed``) loads Hydra, OmegaConf, these schemas and the schedule registry
(:mod:`trainer.schedules`, whose classes are the schedule group's schemas) only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from trainer.durations import (
    Batching,
    BatchRamp,
    Clock,
    NeedsData,
    parse_batch_schedule,
    parse_count,
    parse_length,
)
from trainer.errors import ConfigError
from trainer.overrides import ConfigShape, command_overrides
from trainer.schedules import SCHEDULES, SHAPES, Schedule, ScheduleConfig, branch_schedule, build_schedule
from trainer.schema import MISSING, OnResume, on_resume, setting

if typing.TYPE_CHECKING:
    from omegaconf import DictConfig


DEFAULT_STEPS = 300
"""The run's length when none is given."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _at_least(group: str, node: object, keys: Sequence[str], minimum: int) -> None:
    for key in keys:
        value = getattr(node, key)
        _require(value >= minimum, f"{group}.{key}={value} must be at least {minimum}")


class Precision(str, Enum):
    """Numeric precision of the forward pass."""

    fp32 = "fp32"
    bf16 = "bf16"


class OnNan(str, Enum):
    """What a non-finite gradient norm does."""

    halt = "halt"
    skip = "skip"


class ResumeMode(str, Enum):
    """The two words ``run.resume`` takes besides a checkpoint path."""

    auto = "auto"
    never = "never"


class Offload(str, Enum):
    """Where DeepSpeed keeps offloaded state."""

    none = "none"
    cpu = "cpu"


@dataclass
class RunConfig:
    """Where a run writes, and where it starts from."""

    name: str = setting("${model.name}", on_resume=OnResume.applies)
    """Run name: the run folder's name and the wandb run's name."""
    dir: str = setting("outputs/${run.name}", on_resume=OnResume.applies)
    """Run folder. Only global rank 0 writes into it."""
    resume: str = setting(ResumeMode.auto.value, on_resume=OnResume.applies)
    """auto: continue the newest complete checkpoint in run.dir; never: refuse a run.dir that holds a run;
    or a checkpoint PATH (a checkpoints/step_<N> folder)."""

    def check(self) -> None:
        """Raises ConfigError: ``run.resume`` is neither a mode nor an existing path."""
        _require(
            self.resume in (ResumeMode.auto.value, ResumeMode.never.value) or os.path.exists(self.resume),
            f"run.resume={self.resume} is neither auto, never nor an existing checkpoint path; "
            "point it at a checkpoints/step_<N> folder",
        )


@dataclass
class TrainConfig:
    """The run's length, batch, cadences and numerics."""

    max_steps: int | None = setting(None, on_resume=OnResume.changes_math)
    """The run's length in optimizer steps (the global step runs 1..max_steps); wins over train.epochs.
    With no length given at all, 300 steps."""
    max_tokens: Any = setting(None, on_resume=OnResume.changes_math)
    """The run's length in tokens (2e9, 2B, 500M): the steps that train on that many, rounded up."""
    max_samples: Any = setting(None, on_resume=OnResume.changes_math)
    """The run's length in samples (sequences), rounded up to whole steps."""
    epochs: float | None = setting(None, on_resume=OnResume.changes_math)
    """The run's length in epochs (passes over the training samples), counted in steps as the Hugging Face
    Trainer counts them."""
    micro_batch_size: int = setting(8, on_resume=OnResume.changes_math)
    """Sequences per rank per forward pass."""
    grad_accum_steps: int = setting(1, on_resume=OnResume.changes_math)
    """Micro-batches per optimizer step. Never changes the global step."""
    batch_schedule: str | None = setting(None, on_resume=OnResume.refused)
    """The global batch (sequences) by tokens trained on, e.g. '0:256 2B:512 6B:1024'; reached by the
    number of accumulation micro-batches. The LR schedule then counts samples."""
    stop_at: Any = setting(None, on_resume=OnResume.applies)
    """End the run early, with a checkpoint and exit 0, at this many steps (500) or tokens, samples or epochs
    ('2B tokens'); the schedule keeps its full length, so a later stop_at (or none) continues exactly."""
    seq_len: int = setting(256, on_resume=OnResume.refused)
    """Tokens per sequence (the model sees seq_len inputs and predicts seq_len targets)."""
    seed: int = setting(1337, on_resume=OnResume.refused)
    """Seeds model initialisation, data order and every random number generator."""
    log_every: int = setting(10, on_resume=OnResume.applies)
    """Reduce and log metrics every N optimizer steps, and at the first and the last step."""
    eval_every: int = setting(100, on_resume=OnResume.applies)
    """Evaluate on the validation slice every N steps and at the end; 0 disables evaluation."""
    eval_steps: int = setting(10, on_resume=OnResume.applies)
    """Validation micro-batches per rank in one evaluation."""
    ckpt_every: int = setting(0, on_resume=OnResume.applies)
    """Save a checkpoint every N steps (and always at the end); 0 saves only at the end."""
    lm_eval_every: int = setting(0, on_resume=OnResume.applies)
    """Evaluate the checkpoint of every N-th step (and the last) on train.lm_eval_tasks with lm-eval, in a
    background process of rank 0 that training never waits on (python -m trainer.evaluate; its output in
    run.dir/lm_eval/); results go to metrics.jsonl at the checkpoint's step (and to wandb, on the lm_eval/step
    axis). A multiple of train.ckpt_every; 0 disables it."""
    lm_eval_tasks: list[str] = setting(factory=list, on_resume=OnResume.applies)
    """lm-eval task names for train.lm_eval_every, e.g. [ramp_tiny] (ramp's offline task) or [hellaswag]."""
    lm_eval_device: str = setting("cpu", on_resume=OnResume.applies)
    """Device of the background evaluations: cpu (takes no accelerator memory from training), cuda or cuda:N."""
    ckpt_async: bool = setting(False, on_resume=OnResume.applies)
    """Save checkpoints in the background (backend=ddp or fsdp, DCP's async save): training waits only
    for the copy of the state to host memory; a checkpoint counts once its background write has finished
    and been checksummed, and a kill before that leaves the previous one in force."""
    keep_checkpoints: int = setting(3, on_resume=OnResume.applies)
    """Keep the newest N checkpoints; older ones are deleted once a newer one is complete."""
    on_nan: OnNan = setting(OnNan.halt, on_resume=OnResume.applies)
    """Non-finite gradient norm: halt (stop before the optimizer step, weights untouched, exit 3) or skip
    (drop the update, count it, do not advance the global step or the schedule)."""
    max_grad_norm: float = setting(1.0, on_resume=OnResume.changes_math)
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    precision: Precision = setting(Precision.fp32, on_resume=OnResume.changes_math)
    """fp32, or bf16 (autocast of the forward pass with DDP; weights and optimizer state stay fp32)."""
    compile: bool = setting(False, on_resume=OnResume.applies)
    """Compile the model with torch.compile."""
    activation_checkpointing: bool = setting(False, on_resume=OnResume.applies)
    """Recompute each block's activations in the backward pass: less memory, about a third more compute."""
    threads: int | None = setting(None, on_resume=OnResume.applies)
    """Intra-op threads per rank; default: the machine's cores divided by the ranks on this node."""

    def lengths(self) -> dict[str, Any]:
        """The run lengths given, by key (``train.max_steps``, ``max_tokens``, ``max_samples``, ``epochs``)."""
        keys = ("max_steps", "max_tokens", "max_samples", "epochs")
        return {f"train.{key}": getattr(self, key) for key in keys if getattr(self, key) is not None}

    def check_lm_eval(self) -> None:
        """Raises ConfigError: train.lm_eval_every without tasks, or off the checkpoints' cadence."""
        if not self.lm_eval_every:
            return
        _require(
            bool(self.lm_eval_tasks),
            f"train.lm_eval_every={self.lm_eval_every} needs tasks: set train.lm_eval_tasks=[ramp_tiny] (or "
            "[hellaswag,...])",
        )
        _require(
            self.ckpt_every > 0 and self.lm_eval_every % self.ckpt_every == 0,
            f"train.lm_eval_every={self.lm_eval_every} evaluates saved checkpoints: make it a multiple of "
            f"train.ckpt_every={self.ckpt_every} (e.g. train.ckpt_every={self.lm_eval_every})",
        )

    def check(self) -> None:
        """Raises ConfigError: a count below its minimum, or two run lengths (but max_steps with epochs)."""
        given = self.lengths()
        _require(
            len(given) < 2 or set(given) == {"train.max_steps", "train.epochs"},
            f"{' and '.join(given)} each give the run's length: keep one (train.max_steps may come with train.epochs, "
            "and wins)",
        )
        _require(
            self.max_steps is None or self.max_steps >= 1,
            f"train.max_steps={self.max_steps} must be at least 1",
        )
        _require(self.epochs is None or self.epochs > 0, f"train.epochs={self.epochs} must be > 0")
        for key in ("max_tokens", "max_samples"):
            value = getattr(self, key)
            _require(
                value is None or parse_count(value, f"train.{key}") > 0, f"train.{key}={value} must be > 0"
            )
        _at_least("train", self, ("micro_batch_size", "grad_accum_steps", "seq_len", "log_every"), 1)
        if self.stop_at is not None:
            count, _ = parse_length(self.stop_at, "train.stop_at")
            _require(count > 0, f"train.stop_at={self.stop_at} must be > 0")
        if self.batch_schedule is not None:
            parse_batch_schedule(self.batch_schedule)
            _require(
                self.grad_accum_steps == 1,
                f"train.grad_accum_steps={self.grad_accum_steps} and train.batch_schedule both set the batch: "
                "with a batch schedule each step accumulates what its stage needs; drop train.grad_accum_steps",
            )
        _at_least("train", self, ("keep_checkpoints",), 1)
        _at_least("train", self, ("eval_every", "eval_steps", "ckpt_every", "lm_eval_every"), 0)
        self.check_lm_eval()
        _require(
            self.eval_every == 0 or self.eval_steps >= 1,
            "train.eval_steps must be at least 1 when train.eval_every > 0 (set train.eval_every=0 to skip "
            "evaluation)",
        )
        _require(
            self.max_grad_norm >= 0,
            f"train.max_grad_norm={self.max_grad_norm} must be >= 0 (0 disables clipping)",
        )
        _require(
            self.threads is None or self.threads >= 1, f"train.threads={self.threads} must be at least 1"
        )


BRANCH_DECAY_KEYS = {"decay_steps": "steps", "decay_tokens": "tokens", "decay_samples": "samples"}


@dataclass
class BranchConfig:
    """A decay branched off a checkpoint: the run continues ``branch.checkpoint`` (weights, optimizer,
    data position, global step) into a new run folder, follows the schedule up to that step, then decays
    from the LR in effect there to a floor."""

    checkpoint: str | None = setting(None, on_resume=OnResume.refused)
    """The checkpoint to branch off (a checkpoints/step_<N> folder of any run); its folder is never written."""
    decay_steps: int | None = setting(None, on_resume=OnResume.changes_math)
    """The decay's length in steps after the branch step; the run ends there."""
    decay_tokens: Any = setting(None, on_resume=OnResume.changes_math)
    """The decay's length in tokens (2B, 500M), rounded up to whole steps (samples under a batch schedule)."""
    decay_samples: Any = setting(None, on_resume=OnResume.changes_math)
    """The decay's length in samples."""
    decay_type: str = setting("1-sqrt", on_resume=OnResume.changes_math)
    """Shape of the decay: linear, cosine or 1-sqrt (Hägele et al. 2024), as warmup_stable_decay's; or any
    registered schedule by name (polynomial, inverse_sqrt, ...), run without warmup over the decay."""
    decay_keys: dict[str, Any] = setting(factory=dict, on_resume=OnResume.changes_math)
    """Keys of the schedule named by decay_type (+branch.decay_keys.power=2); none for a shape."""
    min_lr_ratio: float = setting(0.0, on_resume=OnResume.changes_math)
    """The floor the decay ends at, as a fraction of optim.lr."""

    def check(self) -> None:
        """Raises ConfigError: a decay without a checkpoint or the other way round, two lengths, a shape
        or floor out of range, or a checkpoint folder without a ramp checkpoint's meta.json."""
        lengths = [f"branch.{key}" for key in BRANCH_DECAY_KEYS if getattr(self, key) is not None]
        if self.checkpoint is None:
            _require(
                not lengths, f"{lengths[0] if lengths else ''} needs branch.checkpoint=<checkpoints/step_N>"
            )
            return
        _require(
            len(lengths) == 1,
            f"branch.checkpoint={self.checkpoint} needs one decay length: branch.decay_steps, branch.decay_tokens "
            "or branch.decay_samples" + (f" (got {' and '.join(lengths)})" if lengths else ""),
        )
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, f"branch.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"
        )
        self.step()

    def step(self) -> int:
        """The global step of ``branch.checkpoint`` (its meta.json).

        Raises:
            ConfigError: the folder holds no readable ramp checkpoint metadata.
        """
        meta = Path(str(self.checkpoint)) / "meta.json"
        try:
            return int(json.loads(meta.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(
                f"branch.checkpoint={self.checkpoint} is not a ramp checkpoint (no readable meta.json); point "
                "it at a checkpoints/step_<N> folder"
            ) from None

    def decay_length(self) -> tuple[str, float, str]:
        """(key, count, unit) of the one decay length given.

        Raises:
            ConfigError: none is given, or it is not a count.
        """
        for key, unit in BRANCH_DECAY_KEYS.items():
            value = getattr(self, key)
            if value is not None:
                return f"branch.{key}", parse_count(value, f"branch.{key}"), unit
        raise ConfigError(
            "branch: no decay length; set branch.decay_steps, branch.decay_tokens or branch.decay_samples"
        )


INIT_DATA = ("fresh", "continue")


@dataclass
class InitConfig:
    """A new run that starts from a checkpoint's model weights alone: a fresh optimizer, its own schedule
    from ``init.step``, and the data from its start or from where the checkpoint left it."""

    weights: str | None = setting(None, on_resume=OnResume.applies)
    """A checkpoints/step_<N> folder whose model weights a fresh run starts from; its folder is never written."""
    step: int = setting(0, on_resume=OnResume.changes_math)
    """The global step the run starts after (0: the schedule from step 1)."""
    data: str = setting("fresh", on_resume=OnResume.changes_math)
    """fresh: the data from its start; continue: from the checkpoint's data position."""

    def check(self) -> None:
        """Raises ConfigError: a step below 0 or an unknown data choice."""
        _require(self.step >= 0, f"init.step={self.step} must be >= 0")
        _require(self.data in INIT_DATA, f"init.data={self.data} must be fresh or continue")


@dataclass
class ModelConfig:
    """A causal language model built with transformers from a config; nothing is downloaded."""

    name: str = setting(MISSING, on_resume=OnResume.refused)
    """Preset name, used in the default run name."""
    arch: str = setting(MISSING, on_resume=OnResume.refused)
    """transformers model type: gpt2 or llama (any AutoModelForCausalLM type works through model.extra)."""
    hidden_size: int = setting(MISSING, on_resume=OnResume.refused)
    """Width of the residual stream."""
    num_layers: int = setting(MISSING, on_resume=OnResume.refused)
    """Transformer blocks."""
    num_heads: int = setting(MISSING, on_resume=OnResume.refused)
    """Attention (query) heads; must divide hidden_size."""
    num_kv_heads: int | None = setting(None, on_resume=OnResume.refused)
    """Key/value heads for grouped-query attention (llama); default: num_heads."""
    intermediate_size: int | None = setting(None, on_resume=OnResume.refused)
    """MLP width; default: the architecture's own (4 x hidden_size for gpt2)."""
    max_position_embeddings: int = setting(1024, on_resume=OnResume.refused)
    """Longest sequence the model takes; train.seq_len must fit."""
    vocab_size: int | None = setting(None, on_resume=OnResume.refused)
    """Default: the tokenizer's vocabulary, padded up to a multiple of 64."""
    tie_word_embeddings: bool = setting(True, on_resume=OnResume.refused)
    """Share the input embeddings with the output layer."""
    dropout: float = setting(0.0, on_resume=OnResume.changes_math)
    """Dropout probability everywhere the architecture has dropout."""
    rope_theta: float | None = setting(None, on_resume=OnResume.refused)
    """RoPE base (llama); default: the architecture's own."""
    extra: dict[str, Any] = setting(factory=dict, on_resume=OnResume.refused)
    """Further keyword arguments for the transformers config, passed as they are; a key ramp sets from its
    own keys (n_embd, hidden_size, ...) is refused: set the ramp key."""

    def check(self) -> None:
        """Raises ConfigError: a size below 1, heads that do not divide the width, a bad dropout."""
        _at_least("model", self, ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"), 1)
        _require(
            self.hidden_size % self.num_heads == 0,
            f"model.hidden_size={self.hidden_size} must be divisible by model.num_heads={self.num_heads}",
        )
        _require(
            self.num_kv_heads is None or (self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0),
            f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}",
        )
        _require(0 <= self.dropout < 1, f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    """Keys every data source shares; pick the source with ``data=<source>``."""

    source: str = setting(MISSING, on_resume=OnResume.refused)
    """builtin (the Python standard library's sources), text (local files) or hf (datasets.load_dataset)."""
    tokenizer: str = setting("bytes", on_resume=OnResume.refused)
    """bytes (byte-level, no training); a tokenizer.json path; a transformers tokenizer name or folder
    (AutoTokenizer); or train (a byte-level BPE of data.vocab_size trained on the training documents)."""
    vocab_size: int = setting(8192, on_resume=OnResume.refused)
    """Vocabulary of the BPE that data.tokenizer=train learns, its end-of-document token included."""
    eos_token: str | None = setting(None, on_resume=OnResume.refused)
    """End-of-document token of a tokenizer.json or AutoTokenizer; default: the tokenizer's eos_token,
    else the first of <|endoftext|>, </s>, <eos>, <|end_of_text|> that its vocabulary holds."""
    val_fraction: float = setting(0.01, on_resume=OnResume.refused)
    """Share of documents held out for validation (chosen by a hash of each document's text)."""
    num_proc: int = setting(1, on_resume=OnResume.applies)
    """Processes that tokenize. One is enough on a few cores: Rust tokenizers use every core inside it;
    on many cores more processes keep its Python side (reading, collecting ids) from holding them back."""
    cache_dir: str | None = setting(None, on_resume=OnResume.applies)
    """Where tokenized data is cached; default: $RAMP_CACHE_DIR, else ~/.cache/ramp."""

    def check(self) -> None:
        """Value checks only: a missing file or a tokenizer that cannot load fail when the data is built.

        Raises:
            ConfigError: an empty tokenizer, a vocabulary too small to train, a bad fraction or count.
        """
        _require(0 < self.val_fraction < 1, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _require(
            bool(self.tokenizer), "data.tokenizer is empty; use bytes, train, a tokenizer.json path or a name"
        )
        _require(
            self.tokenizer != "train" or 258 <= self.vocab_size < 2**32,
            f"data.vocab_size={self.vocab_size} must be at least 258 (256 bytes, the end-of-document token and "
            "one merge) for data.tokenizer=train",
        )
        _require(self.num_proc >= 1, f"data.num_proc={self.num_proc} must be at least 1")


def _check_files(files: Any) -> None:
    _require(
        files is None
        or isinstance(files, str)
        or (isinstance(files, list) and all(isinstance(f, str) for f in files)),
        f"data.files={files} must be a path or glob, or a list of them, e.g. data.files=[corpus/*.txt]",
    )


@dataclass
class BuiltinData(DataConfig):
    """The Python standard library's ``.py`` sources: on every Python install, nothing to download."""

    source: str = setting("builtin", on_resume=OnResume.refused)
    """Selected with data=builtin."""


SAMPLE_BY = ("document", "paragraph", "line")
"""How data=text splits a .txt file into documents (data.sample_by)."""


@dataclass
class TextData(DataConfig):
    """Your own files: ``.txt``, ``.jsonl`` / ``.json`` and ``.parquet``."""

    source: str = setting("text", on_resume=OnResume.refused)
    """Selected with data=text."""
    # Any, not list[str]: a single path or glob is the common case, and OmegaConf cannot type a
    # union of a string and a list. check() checks the value.
    files: Any = setting(None, on_resume=OnResume.refused)
    """A path, a glob or a folder, or a list of them: .txt (one document per file), .jsonl / .json and
    .parquet (one document per record)."""
    text_field: str = setting("text", on_resume=OnResume.refused)
    """The field holding a record's text in .jsonl, .json and .parquet files."""
    sample_by: str = setting("document", on_resume=OnResume.refused)
    """How a .txt file is split into documents: document (the whole file), paragraph (at blank lines) or
    line (each line, without its line break), as datasets' text builder's sample_by."""

    def check(self) -> None:
        """As :meth:`DataConfig.check`; ``data.files`` must be a path or a list of paths, and
        ``data.sample_by`` one of document, paragraph, line.

        Raises:
            ConfigError: either is not.
        """
        super().check()
        _check_files(self.files)
        _require(
            self.sample_by in SAMPLE_BY,
            f"data.sample_by={self.sample_by} must be {', '.join(SAMPLE_BY[:-1])} or {SAMPLE_BY[-1]}",
        )


@dataclass
class HFData(DataConfig):
    """Any dataset ``datasets.load_dataset`` (or ``load_from_disk``) reads."""

    source: str = setting("hf", on_resume=OnResume.refused)
    """Selected with data=hf."""
    path: str | None = setting(None, on_resume=OnResume.refused)
    """A hub dataset name, a local data folder, a save_to_disk folder, or a builder (json, parquet, text,
    csv, arrow) that reads data.files."""
    name: str | None = setting(None, on_resume=OnResume.refused)
    """The dataset's configuration name (load_dataset's second argument)."""
    revision: str | None = setting(None, on_resume=OnResume.refused)
    """A hub dataset's branch, tag or commit (load_dataset's revision); default its main branch. The token
    cache is keyed by the commit it resolves to, so a new revision is tokenized anew."""
    split: str = setting("train", on_resume=OnResume.refused)
    """The split to train on; the validation documents are held out from it."""
    files: Any = setting(None, on_resume=OnResume.refused)
    """data_files for a builder: a path or glob, or a list of them."""
    text_field: str = setting("text", on_resume=OnResume.refused)
    """The column holding a record's text."""
    streaming: bool = setting(False, on_resume=OnResume.applies)
    """Stream the dataset instead of downloading it whole before tokenizing."""

    def check(self) -> None:
        """As :meth:`DataConfig.check`, and ``data.files`` must be a path or a list of paths."""
        super().check()
        _check_files(self.files)


DATA_SOURCES: dict[str, type[DataConfig]] = {
    schema.source: schema for schema in (BuiltinData, TextData, HFData)
}
"""Every data schema by its ``data.source``."""


@dataclass
class ParamGroupConfig:
    """One parameter group of ``optim.groups``: the parameters it takes, its LR multiplier, its decay."""

    name: str = setting(MISSING, on_resume=OnResume.refused)
    """The group's name: its LR is logged as lr/<name>."""
    match: list[str] = setting(factory=list, on_resume=OnResume.refused)
    """Parameter-name glob patterns (fnmatch, e.g. '*wte*'); empty: any name (then ndim decides)."""
    ndim: int | None = setting(None, on_resume=OnResume.refused)
    """Take only parameters of this many dimensions (1: vectors, biases and norm weights)."""
    lr_mult: float = setting(1.0, on_resume=OnResume.refused)
    """The group's LR is lr_mult x the schedule's LR."""
    weight_decay: float | None = setting(None, on_resume=OnResume.refused)
    """The group's decoupled weight decay; default: optim.weight_decay."""


@dataclass
class OptimConfig:
    """AdamW, the one optimizer."""

    name: str = setting("adamw", on_resume=OnResume.refused)
    """The optimizer: adamw."""
    lr: float = setting(6e-4, on_resume=OnResume.changes_math)
    """Peak learning rate; the schedule multiplies it."""
    weight_decay: float = setting(0.1, on_resume=OnResume.changes_math)
    """Decoupled weight decay (AdamW) of the parameters not matched by no_decay."""
    betas: list[float] = setting(factory=lambda: [0.9, 0.95], on_resume=OnResume.changes_math)
    """AdamW's two moment decay rates."""
    eps: float = setting(1e-8, on_resume=OnResume.changes_math)
    """AdamW's epsilon."""
    no_decay: list[str] = setting(factory=lambda: ["*.bias", "*norm*", "*ln_*"], on_resume=OnResume.refused)
    """Parameter-name glob patterns excluded from weight decay (biases and norm weights)."""
    groups: list[ParamGroupConfig] = setting(factory=list, on_resume=OnResume.refused)
    """Parameter groups with their own LR multiplier and weight decay, e.g. [{name: embed, match: ['*wte*'],
    lr_mult: 0.1}]; a parameter in none of them falls in decay / no_decay as without groups."""
    fused: bool | None = setting(None, on_resume=OnResume.changes_math)
    """Fused AdamW kernel; default: on (CPU and CUDA). It drops a non-finite update on the device, so the
    step never waits for the host; false uses torch's foreach kernel and reads the norm every step."""

    def check(self) -> None:
        """Raises ConfigError: an unknown optimizer or a number out of range, naming the key."""
        _require(self.name == "adamw", f"optim.name={self.name} is not supported; use optim=adamw")
        _require(self.lr > 0, f"optim.lr={self.lr} must be > 0 (it is the peak learning rate)")
        _require(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay} must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas={list(self.betas)} must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95]",
        )
        _require(self.eps > 0, f"optim.eps={self.eps} must be > 0")
        names = [group.name for group in self.groups]
        for group in self.groups:
            _require(
                names.count(group.name) == 1 and group.name not in ("decay", "no_decay"),
                f"optim.groups: the name {group.name} is taken (by another group, or by ramp's decay / no_decay); "
                "give each group its own name",
            )
            _require(group.lr_mult >= 0, f"optim.groups.{group.name}.lr_mult={group.lr_mult} must be >= 0")
            _require(
                group.weight_decay is None or group.weight_decay >= 0,
                f"optim.groups.{group.name}.weight_decay={group.weight_decay} must be >= 0",
            )
            _require(
                bool(group.match) or group.ndim is not None,
                f"optim.groups.{group.name} selects nothing: give it match patterns or an ndim",
            )

    def lr_mults(self) -> dict[str, float]:
        """Each parameter group's LR multiplier, by group name (decay and no_decay: 1)."""
        return {"decay": 1.0, "no_decay": 1.0, **{group.name: group.lr_mult for group in self.groups}}


@dataclass
class BackendConfig:
    """Who wraps the model and owns backward and the optimizer step; pick it with ``backend=<name>``."""

    name: str = setting(MISSING, on_resume=OnResume.refused)
    """ddp, fsdp or deepspeed; pick it with backend=<name>."""

    def check(self, cfg: Config) -> None:
        """The backend's own keys, and what it cannot do with the rest of ``cfg``.

        Raises:
            ConfigError: naming the key and the fix.
        """


@dataclass
class DDPBackend(BackendConfig):
    """PyTorch DistributedDataParallel (gloo on CPU, nccl on GPU); a single process needs no wrapper."""

    name: str = setting("ddp", on_resume=OnResume.refused)
    """Selected with backend=ddp."""
    bucket_cap_mb: int = setting(25, on_resume=OnResume.applies)
    """DDP's gradient bucket size in MiB."""
    find_unused_parameters: bool = setting(False, on_resume=OnResume.applies)
    """DDP's search for parameters without a gradient (models with unused parameters)."""

    def check(self, cfg: Config) -> None:
        """Raises ConfigError: a bucket size below 1."""
        _require(self.bucket_cap_mb >= 1, f"backend.bucket_cap_mb={self.bucket_cap_mb} must be at least 1")


@dataclass
class FSDPBackend(BackendConfig):
    """PyTorch FSDP2 (``fully_shard`` on every decoder block, then on the whole model): parameters,
    gradients and optimizer state sharded across the ranks (gloo on CPU, nccl on GPU)."""

    name: str = setting("fsdp", on_resume=OnResume.refused)
    """Selected with backend=fsdp."""
    reshard_after_forward: bool = setting(True, on_resume=OnResume.applies)
    """Free each block's gathered parameters after its forward and gather them again for the backward
    (ZeRO-3's memory); false keeps them until the backward (ZeRO-2's: one all-gather less per block)."""
    reduce_every_micro_batch: bool = setting(False, on_resume=OnResume.applies)
    """Reduce-scatter the gradients after every micro-batch (each rank keeps only its gradient shard:
    least memory) instead of only after a step's last (full gradients held between micro-batches: one
    reduce-scatter a step). The same numbers either way, up to summation order."""
    cpu_offload: bool = setting(False, on_resume=OnResume.applies)
    """Keep parameters, gradients and optimizer state on the CPU between uses, the optimizer step there
    too (FSDP2's CPUOffloadPolicy; needs a GPU)."""
    shard_group_size: int | None = setting(None, on_resume=OnResume.applies)
    """HSDP: shard within groups of this many ranks (e.g. a node's GPUs) and replicate across the groups;
    null shards across all ranks. Must divide the world size."""

    def check(self, cfg: Config) -> None:
        """Raises ConfigError: a shard group below 1."""
        if self.shard_group_size is not None:
            _require(
                self.shard_group_size >= 1,
                f"backend.shard_group_size={self.shard_group_size} must be at least 1 (or null: all ranks)",
            )


DEEPSPEED_OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "train.precision",
    "bfloat16": "train.precision",
    "torch_autocast": "train.precision",
    "amp": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "schedule.* (ramp's schedule is the only one that sets the LR)",
    "zero_optimization.stage": "backend.zero_stage",
    "zero_optimization.offload_optimizer": "backend.offload_optimizer",
    "zero_optimization.offload_param": "backend.offload_params",
    "zero_optimization.cpu_offload": "backend.offload_optimizer",
    "zero_optimization.cpu_offload_params": "backend.offload_params",
    "zero_optimization.compute_grad_norm": "train.on_nan (the norm decides whether an update is applied)",
}
"""DeepSpeed config keys ramp sets from its own keys: one source of truth, so backend.extra may not set them."""


def flat_keys(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Every key of a nested dict as a dotted path, parents before their children."""
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flat_keys(value, f"{prefix}{key}.")


@dataclass
class DeepSpeedBackend(BackendConfig):
    """DeepSpeed's engine. Batch sizes, accumulation, clipping and precision come from ``train.*``."""

    name: str = setting("deepspeed", on_resume=OnResume.refused)
    """Selected with backend=deepspeed."""
    zero_stage: int = setting(2, on_resume=OnResume.refused)
    """0: plain data parallel through the engine; 1: shard optimizer state; 2: also gradients; 3: also
    parameters."""
    offload_optimizer: Offload = setting(Offload.none, on_resume=OnResume.refused)
    """cpu: keep optimizer state and the update on the CPU (ZeRO 1-3; DeepSpeed's CPU Adam)."""
    offload_params: Offload = setting(Offload.none, on_resume=OnResume.refused)
    """cpu: keep parameters on the CPU between uses (ZeRO 3 only)."""
    extra: dict[str, Any] = setting(factory=dict, on_resume=OnResume.refused)
    """Further DeepSpeed config keys, merged in as they are; a key ramp sets from its own keys is refused."""

    def fp16(self) -> bool:
        """Whether ``backend.extra`` turns DeepSpeed's fp16 mode on."""
        fp16 = self.extra.get("fp16")
        return isinstance(fp16, dict) and bool(fp16.get("enabled", False))

    def check(self, cfg: Config) -> None:
        """Refuse what DeepSpeed would refuse later, or what would set one thing in two places.

        fp16 on a machine without a GPU is refused when the engine is built (it needs the device).

        Raises:
            ConfigError: naming the key and the fix.
        """
        _require(
            self.zero_stage in (0, 1, 2, 3), f"backend.zero_stage={self.zero_stage} must be 0, 1, 2 or 3"
        )
        _require(
            self.offload_params == Offload.none or self.zero_stage == 3,
            f"backend.offload_params={self.offload_params.value} needs ZeRO 3 (only it partitions parameters); "
            "set backend.zero_stage=3 or backend.offload_params=none",
        )
        _require(
            self.offload_optimizer == Offload.none or self.zero_stage != 0,
            f"backend.offload_optimizer={self.offload_optimizer.value} needs ZeRO 1, 2 or 3; "
            "set backend.zero_stage=1 (or higher) or backend.offload_optimizer=none",
        )
        _require(
            not cfg.train.compile,
            "train.compile=true is not supported with backend=deepspeed; set train.compile=false",
        )
        _require(
            not cfg.train.ckpt_async,
            "train.ckpt_async=true needs backend=ddp or backend=fsdp (DeepSpeed's engine writes its own files, "
            "synchronously); set train.ckpt_async=false",
        )
        for key in flat_keys(dict(self.extra)):
            _require(
                key not in DEEPSPEED_OWNED_KEYS,
                f"backend.extra.{key} is set by ramp from {DEEPSPEED_OWNED_KEYS.get(key)}; remove it from "
                "backend.extra and set that instead",
            )
        if self.fp16():
            self._check_fp16(cfg.train)

    @staticmethod
    def _check_fp16(train: TrainConfig) -> None:
        _require(
            train.precision == Precision.fp32,
            f"backend.extra.fp16.enabled=true conflicts with train.precision={train.precision.value}; "
            "set train.precision=fp32 to train in fp16",
        )
        _require(
            train.on_nan != OnNan.halt,
            "backend.extra.fp16.enabled=true with train.on_nan=halt: fp16's dynamic loss scaling overflows "
            "and skips steps by design while it calibrates; set train.on_nan=skip (fp16 needs a GPU: "
            "DeepSpeed has none on the CPU)",
        )


BACKENDS: dict[str, type[BackendConfig]] = {
    schema.name: schema for schema in (DDPBackend, FSDPBackend, DeepSpeedBackend)
}
"""Every backend schema by its ``backend.name``."""

PROGRESS_MODES = ("auto", "bar", "lines", "off")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class WandbConfig:
    """One wandb run per job, created by global rank 0."""

    mode: str = setting("offline", on_resume=OnResume.applies)
    """offline (written under run.dir, upload later with `wandb sync`), online, or disabled."""
    project: str = setting("ramp", on_resume=OnResume.applies)
    """wandb project."""
    entity: str | None = setting(None, on_resume=OnResume.applies)
    """wandb entity (user or team); default: the account's own."""
    name: str | None = setting(None, on_resume=OnResume.applies)
    """wandb run name; default: run.name."""
    group: str | None = setting(None, on_resume=OnResume.applies)
    """wandb group; default: run.name, and a branch's parent's group, so a run and its branches group together."""
    tags: list[str] = setting(factory=list, on_resume=OnResume.applies)
    """wandb tags."""


@dataclass
class LoggerConfig:
    """Where metrics go: the console and metrics.jsonl always, wandb and tensorboard by choice."""

    progress: str = setting("auto", on_resume=OnResume.applies)
    """auto: a progress bar in an interactive terminal, else one line per log step; bar; lines; off."""
    wandb: WandbConfig = setting(factory=WandbConfig, on_resume=OnResume.applies)
    """The wandb settings (logger.wandb.*)."""
    tensorboard: bool = setting(False, on_resume=OnResume.applies)
    """Also write tensorboard event files under run.dir/tensorboard (metrics.jsonl is always written)."""
    peak_flops: float | None = setting(None, on_resume=OnResume.applies)
    """Peak FLOP/s of one device, for MFU; default: the bf16 dense peak of a known GPU (A100, H100,
    H200), and no MFU where none is known (a CPU)."""

    def check(self) -> None:
        """Raises ConfigError: an unknown mode, or a peak that is not positive."""
        _require(
            self.progress in PROGRESS_MODES,
            f"logger.progress={self.progress} must be auto, bar, lines or off",
        )
        _require(
            self.peak_flops is None or self.peak_flops > 0,
            f"logger.peak_flops={self.peak_flops} must be > 0 (FLOP/s of one device, e.g. 989e12), or null",
        )
        _require(
            self.wandb.mode in WANDB_MODES,
            f"logger.wandb.mode={self.wandb.mode} must be offline, online or disabled",
        )


@dataclass
class Config:
    """The whole run: one node per group. Built by :func:`compose` (or :func:`to_config`), checked."""

    run: RunConfig = setting(factory=RunConfig, on_resume=OnResume.applies)
    """Where the run writes and starts from (run.*)."""
    train: TrainConfig = setting(factory=TrainConfig, on_resume=OnResume.refused)
    """Length, batch, cadences and numerics (train.*)."""
    branch: BranchConfig = setting(factory=BranchConfig, on_resume=OnResume.changes_math)
    """A decay branched off a checkpoint (branch.*)."""
    init: InitConfig = setting(factory=InitConfig, on_resume=OnResume.applies)
    """A fresh run from a checkpoint's weights alone (init.*)."""
    model: ModelConfig = setting(MISSING, on_resume=OnResume.refused)
    """The model preset (model=<preset>) and its keys."""
    data: DataConfig = setting(MISSING, on_resume=OnResume.refused)
    """The data source (data=<source>) and its keys."""
    schedule: ScheduleConfig = setting(MISSING, on_resume=OnResume.refused)
    """The LR schedule (schedule=<name>) and its keys."""
    optim: OptimConfig = setting(MISSING, on_resume=OnResume.refused)
    """The optimizer and its keys."""
    backend: BackendConfig = setting(MISSING, on_resume=OnResume.applies)
    """The backend (backend=<name>) and its keys."""
    logger: LoggerConfig = setting(MISSING, on_resume=OnResume.applies)
    """The metric sinks (logger=<preset>) and their keys."""

    def check(self) -> None:
        """Every group's own checks, then the checks across groups, each naming the key to change.

        Raises:
            ConfigError: the first problem found.
        """
        self.run.check()
        self.train.check()
        self.branch.check()
        self.init.check()
        given = {"branch.checkpoint": self.branch.checkpoint, "init.weights": self.init.weights}
        starts = [key for key, value in given.items() if value is not None]
        if self.run.resume not in (ResumeMode.auto.value, ResumeMode.never.value):
            starts.append(f"run.resume={self.run.resume}")
        _require(
            len(starts) < 2,
            f"{' and '.join(starts[:2])} both name where the run starts: keep branch.checkpoint for a branch, "
            "init.weights for a fresh run from weights alone, run.resume for a plain resume",
        )
        self.model.check()
        self.data.check()
        self.optim.check()
        self.logger.check()
        _require(
            self.train.seq_len <= self.model.max_position_embeddings,
            f"train.seq_len={self.train.seq_len} exceeds model.max_position_embeddings="
            f"{self.model.max_position_embeddings}; lower train.seq_len or raise model.max_position_embeddings",
        )
        schema = BACKENDS.get(self.backend.name)
        _require(
            schema is None or isinstance(self.backend, schema),
            f"backend.name={self.backend.name} contradicts the backend group's keys ({type(self.backend).__name__}); "
            f"choose the backend with backend={self.backend.name}, not backend.name",
        )
        self.backend.check(self)
        with contextlib.suppress(NeedsData):  # a length in epochs is checked once the data is built
            _ = self.lr_schedule  # the schedule's own checks need the run's length and optim.lr

    def batching(self, world_size: int, samples_per_epoch: int | None = None) -> Clock:
        """What each step takes on ``world_size`` ranks (a fixed batch, or train.batch_schedule's), and the
        samples in an epoch once the data is built.

        Raises:
            ConfigError: a batch schedule's batch that the micro-batches on ``world_size`` ranks do not divide.
        """
        t = self.train
        if t.batch_schedule is not None:
            stages = parse_batch_schedule(t.batch_schedule)
            return BatchRamp(stages, t.seq_len, t.micro_batch_size, world_size, samples_per_epoch)
        return Batching(t.seq_len, t.micro_batch_size, t.grad_accum_steps, world_size, samples_per_epoch)

    def run_steps(self, clock: Clock) -> int:
        """The run's length in optimizer steps: train.max_steps, else the one length given, else 300.

        Raises:
            ConfigError: a length that is not a count. NeedsData: epochs before the data is built.
        """
        t = self.train
        if t.max_steps is not None:
            return t.max_steps
        units = {"train.max_tokens": "tokens", "train.max_samples": "samples", "train.epochs": "epochs"}
        for key, value in t.lengths().items():
            return clock.run_steps(parse_count(value, key), units[key], key)
        return DEFAULT_STEPS

    def schedule_for(self, world_size: int, samples_per_epoch: int | None = None) -> Schedule:
        """The LR schedule of this run on ``world_size`` ranks: its length in steps, every other length in
        the schedule's clock (steps, or samples under train.batch_schedule).

        Raises:
            ConfigError: a length or schedule key out of range. NeedsData: epochs before the data is built.
        """
        clock = self.batching(world_size, samples_per_epoch)
        max_steps = self.run_steps(clock)
        given = self.train.lengths()
        key = next(iter(given), None)
        length_key = f"{key}={given[key]}" if key else f"train.max_steps default {DEFAULT_STEPS}"
        schedule = build_schedule(
            self.schedule, max_steps=max_steps, peak_lr=self.optim.lr, clock=clock, length_key=length_key
        )
        if self.branch.checkpoint is None:
            return schedule
        decay_key, count, unit = self.branch.decay_length()
        at_step = self.branch.step()
        _require(count >= 1, f"{decay_key}={count:g} must be at least 1")
        if unit == "steps":
            decay = clock.clock(at_step + math.ceil(count)) - clock.clock(at_step)
        else:
            decay = clock.to_units(count, unit, decay_key)
        return branch_schedule(
            schedule,
            at_step=at_step,
            decay=decay,
            decay_type=self.branch.decay_type,
            min_lr_ratio=self.branch.min_lr_ratio,
            decay_keys={**preset_keys(self.branch.decay_type), **self.branch.decay_keys},
        )

    def stop_step(self, clock: Clock) -> int | None:
        """The global step train.stop_at ends the run at (the first that reaches it), or None.

        Raises:
            ConfigError: not a length. NeedsData: epochs before the data is built.
        """
        if self.train.stop_at is None:
            return None
        count, unit = parse_length(self.train.stop_at, "train.stop_at")
        return clock.run_steps(count, unit, "train.stop_at")

    @functools.cached_property
    def lr_schedule(self) -> Schedule:
        """The schedule as far as the config alone tells it: the world size from ``WORLD_SIZE`` (the
        launcher's; 1 without one), no data. The trainer builds it again with the data
        (:meth:`schedule_for`) when a length is in epochs.

        Raises:
            ConfigError: as :meth:`schedule_for`; NeedsData when a length is in epochs.
        """
        return self.schedule_for(int(os.environ.get("WORLD_SIZE", "1")))

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (enums as their values): what config.yaml and checkpoints record."""
        from omegaconf import OmegaConf

        tree = OmegaConf.to_container(OmegaConf.structured(self), enum_to_str=True)
        assert isinstance(tree, dict)
        return tree  # type: ignore[return-value]


GROUP_SCHEMAS: dict[str, dict[str, type[Any]]] = {
    "data": dict(DATA_SOURCES),
    "schedule": dict(SCHEDULES),
    "backend": dict(BACKENDS),
}
"""The groups whose schema depends on the option: data by ``source``, schedule and backend by ``name``."""


def schema_of(group: str, node: dict[str, Any]) -> type[Any]:
    """The schema class of one group of a config tree, picked by its option for data, schedule, backend."""
    options = GROUP_SCHEMAS.get(group)
    if options is None:
        return typing.get_type_hints(Config)[group]
    return options.get(str(node.get("source" if group == "data" else "name")), next(iter(options.values())))


def from_tree(tree: dict[str, Any]) -> Config:
    """A resolved config tree (a run's config.yaml, a checkpoint's recorded config) as a typed
    :class:`Config`, unchecked: what that run trained with, e.g. to rebuild its schedule.

    Raises:
        ValueError: a group, key or value today's schemas do not take (a tree of an older ramp).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        groups: dict[str, Any] = {
            group: OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema_of(group, node)), node))
            for group, node in tree.items()
        }
        return Config(**groups)
    except (OmegaConfBaseException, TypeError, AttributeError) as err:
        raise ValueError(f"not a config of this ramp: {str(err).splitlines()[0]}") from None


def declared_keys(schema: type[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, field)`` of every key a schema declares, nested schemas (logger.wandb) expanded."""
    hints = typing.get_type_hints(schema)
    for declared in fields(schema):
        kind = hints[declared.name]
        if is_dataclass(kind):
            yield from declared_keys(kind, f"{prefix}{declared.name}.")  # type: ignore[arg-type]
        else:
            yield f"{prefix}{declared.name}", declared


def resume_facts(tree: dict[str, Any]) -> dict[str, OnResume]:
    """What changing each key of a resolved config tree does on resume, from the schemas' metadata."""
    facts: dict[str, OnResume] = {}
    for group, node in tree.items():
        if isinstance(node, dict) and group in typing.get_type_hints(Config):
            schema = schema_of(group, node)
            facts.update({key: on_resume(f) for key, f in declared_keys(schema, f"{group}.")})
    return facts


def preset_keys(name: str) -> dict[str, Any]:
    """The schedule-specific keys ``conf/schedule/<name>.yaml`` sets (the preset a user picks with
    schedule=<name>: cosine_with_restarts' num_cycles=2, ...), for a branch's registry tail; none for a
    WSD shape or a name that is no preset. Warmup keys are left out: a tail has no warmup."""
    if name in SHAPES or name not in SCHEDULES:
        return {}
    preset = conf_dir() / "schedule" / f"{name}.yaml"
    if not preset.is_file():
        return {}
    import yaml

    common = {f.name for f in fields(ScheduleConfig)}
    return {
        k: v
        for k, v in (yaml.safe_load(preset.read_text()) or {}).items()
        if k != "defaults" and k not in common
    }


def conf_dir() -> Path:
    """The Hydra config folder: ``trainer/conf`` inside an installed wheel, else the checkout's ``conf/``."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def stored_schemas() -> dict[str, dict[str, type[Any]]]:
    """The groups with presets, each with its schemas by the name the ConfigStore holds them under: the
    name a preset's defaults list gives (``text_schema``), never a preset itself."""
    stored: dict[str, dict[str, type[Any]]] = {
        group: {f"{group}_schema": typing.get_type_hints(Config)[group]}
        for group in ("model", "optim", "logger")
    }
    for group, options in GROUP_SCHEMAS.items():
        stored[group] = {f"{option}_schema": schema for option, schema in options.items()}
    return stored


def register_configs() -> None:
    """Register every schema in Hydra's ConfigStore, so each YAML can name its own in its defaults list."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="config_schema", node=Config)
    for group, schemas in stored_schemas().items():
        for name, schema in schemas.items():
            store.store(group=group, name=name, node=schema)


def config_shape() -> ConfigShape:
    """What command-line overrides are checked against: :class:`Config`, the schemas each group's presets
    extend, and the config folder."""
    return ConfigShape(Config, stored_schemas(), conf_dir())


def check_overrides(overrides: Sequence[str], multirun: bool = False) -> None:
    """Refuse, before Hydra composes anything, an override that names no key or preset or sets a value
    its key does not take (:meth:`trainer.overrides.ConfigShape.check`).

    Raises:
        ConfigError: one line naming the key, its group and the closest valid key or preset.
    """
    config_shape().check(overrides, multirun)


def command_jobs(argv: Sequence[str]) -> list[list[str]]:
    """The overrides of each job a ``trainer.main`` command line runs (one, or each of a ``-m`` sweep's), to
    compose one by one; none when the command takes its presets from another folder (``--config-dir``).

    Raises:
        ConfigError: an override Hydra cannot read.
    """
    command = command_overrides(argv)
    return config_shape().jobs(*command) if command is not None else []


def check_command(argv: Sequence[str]) -> None:
    """:func:`check_overrides` on a ``trainer.main`` command line (``sys.argv``), read as Hydra reads it; a
    command that takes its presets from another folder (``--config-dir``) is left to Hydra.

    Raises:
        ConfigError: as :func:`check_overrides`.
    """
    command = command_overrides(argv)
    if command is not None:
        check_overrides(*command)


def _reject_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra lets ``+key=value`` add keys to a typed node; ramp accepts only the keys its schemas declare."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if schema is not None and is_dataclass(schema) else None
    if known is None:
        return
    for key in map(str, node):
        _require(
            key in known,
            f"{prefix}{key} is not a ramp setting; remove it or check its spelling in the README's key table",
        )
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            _reject_unknown_keys(child, f"{prefix}{key}.")


def _omegaconf_message(err: Exception) -> str:
    key = getattr(err, "full_key", None)
    text = str(err).splitlines()[0]
    if key:
        return f"{key}: {text}; set it on the command line, e.g. {key}=VALUE"
    return text


def to_config(dcfg: DictConfig) -> Config:
    """A composed DictConfig as a typed, checked :class:`Config` (interpolations resolved).

    Raises:
        ConfigError: an unknown key, a missing value, a bad interpolation or a failed check.
    """
    from omegaconf import OmegaConf

    _reject_unknown_keys(dcfg)
    try:
        config = OmegaConf.to_object(dcfg)
    except Exception as err:  # omegaconf reports a missing value or a bad interpolation
        raise ConfigError(_omegaconf_message(err)) from None
    assert isinstance(config, Config)
    config.check()
    return config


def compose(overrides: Sequence[str] = ()) -> Config:
    """The typed, checked config that ``trainer.main`` runs with these Hydra overrides.

    The one way to turn overrides into a config outside the entry point (whose ``@hydra.main`` composes
    the same files and hands the result to :func:`to_config`): the schedule preview, the tests, the test
    workers and the benchmarks use it.

    Raises:
        ConfigError: an unknown key, group option or value, or a failed check; the message names it.
    """
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    check_overrides(overrides)
    register_configs()
    try:
        with hydra.initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            dcfg = hydra.compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_compose_message(err)) from None
    return to_config(dcfg)


def _compose_message(err: BaseException) -> str:
    """Hydra's message and its causes', one line each, joined, with where to look the key up."""
    parts: list[str] = []
    current: BaseException | None = err
    while current is not None and len(parts) < 3:
        lines = str(current).strip().splitlines()
        if lines and "$VALUE" not in lines[0] and lines[0] not in parts:
            parts.append(lines[0].rstrip("."))
        current = current.__cause__ or current.__context__
    return f"{': '.join(parts)}. Check the key against the README's key table"
