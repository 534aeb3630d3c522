"""Data: sources, tokenizers, the cached memory-mapped token files, and the resumable sampler.

``build_data`` is the one entry point. Every rank checks the configuration it can check cheaply
(files exist, the tokenizer loads), one process per node tokenizes the corpus into the cache while
the others wait, and then every rank memory-maps the same files.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer import distributed
from trainer.config import Config, DataConfig, TrainConfig
from trainer.data.sampler import WindowSampler, eval_batches
from trainer.data.sources import Source, build_source
from trainer.data.store import TokenFiles, build, cache_key, default_cache_dir, lookup
from trainer.data.tokenizer import load_tokenizer, train_identity
from trainer.distributed import DistInfo
from trainer.errors import ConfigError

__all__ = ["Data", "build_data", "prepare"]

DONE, BUILDING, FAILED = 0, 1, 2
POLL_S = 1.0
"""How often the builder reports progress to the waiting ranks: a collective every second keeps
them inside the process group's timeout however long tokenizing takes."""


@dataclass
class Data:
    """What training reads: the cached token files, the training sampler and the validation tokens."""

    files: TokenFiles
    train: WindowSampler
    val_tokens: np.ndarray
    vocab_size: int
    eos_id: int
    tokenizer_file: Path | None = None
    """The tokenizer.json the tokens were made with (None for bytes), kept next to the cached tokens."""

    def eval_indices(self, cfg: Config, info: DistInfo) -> list[np.ndarray]:
        """This rank's validation sample indices, one array per micro-batch: the same every evaluation."""
        return eval_batches(
            self.val_tokens,
            cfg.train.seq_len,
            cfg.train.micro_batch_size,
            info.rank,
            info.world_size,
            cfg.train.eval_steps,
        )

    def save_tokenizer(self, run_dir: Path) -> None:
        """Copy the tokenizer into the run folder, so the run's checkpoints come with it (rank 0 only)."""
        if self.tokenizer_file is not None:
            shutil.copyfile(self.tokenizer_file, run_dir / "tokenizer.json")


def prepare(cfg: DataConfig) -> tuple[Source, Callable[[], TokenFiles], Path]:
    """The source, a function that builds (or reuses) its cache entry, and the entry's path.

    Everything that can fail without reading the corpus fails here, on every rank.
    """
    source = build_source(cfg)
    tokenizer = load_tokenizer(cfg)
    name = tokenizer.name if tokenizer is not None else train_identity(cfg)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    entry = cache_dir / cache_key(source, name, cfg.val_fraction)
    return source, lambda: build(source, tokenizer, cfg, entry), entry


def _once_per_node(build_entry: Callable[[], TokenFiles], entry: Path, info: DistInfo) -> TokenFiles:
    """Local rank 0 builds in a thread and reports every POLL_S; the rest wait, then read the entry."""
    if not info.distributed:
        return build_entry()
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["files"] = build_entry()
        except BaseException as err:  # raised again below, on the main thread
            outcome["error"] = err

    builder = (
        threading.Thread(target=run, name="ramp-data-build", daemon=True) if info.is_local_main else None
    )
    if builder is not None:
        builder.start()
    while True:
        if builder is not None:
            builder.join(timeout=POLL_S)
        mine = (
            FAILED if "error" in outcome else BUILDING if builder is not None and builder.is_alive() else DONE
        )
        status = distributed.all_reduce_max(torch.tensor([mine], device=info.device), info)
        if int(status.item()) != BUILDING:
            break
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    if int(status.item()) == FAILED:
        raise ConfigError("data: building the token cache failed on another node; its error is printed there")
    files = lookup(entry)
    assert files is not None, f"the token cache entry {entry} is missing after it was built"
    return files


def _batch_words(t: TrainConfig, world_size: int) -> str:
    """``train.micro_batch_size=8 on each of 2 ranks (16 windows)``, for messages."""
    ranks = (
        f" on each of {world_size} ranks ({t.micro_batch_size * world_size} windows)"
        if world_size > 1
        else ""
    )
    return f"train.micro_batch_size={t.micro_batch_size}{ranks}"


def _check_train_batch(describe: str, train_tokens: int, t: TrainConfig, world_size: int) -> None:
    """Refuse a training slice with fewer windows of train.seq_len than one micro-batch on every rank.

    Raises:
        ConfigError: the numbers, and the micro-batch size or sequence length that would fit.
    """
    windows = (train_tokens - 1) // t.seq_len  # as the sampler counts them
    if windows >= t.micro_batch_size * world_size:
        return
    fits = windows // world_size
    fixes = [f"lower train.micro_batch_size to {fits} or less"] if fits else []
    shorter = (train_tokens - 1) // (t.micro_batch_size * world_size)
    if shorter >= 1:
        fixes.append(f"lower train.seq_len to {shorter} or less")
    raise ConfigError(
        f"{describe} has {windows} training windows of train.seq_len={t.seq_len}, fewer than one micro-batch "
        f"for every rank: {_batch_words(t, world_size)}; " + ", ".join([*fixes, "or add text"])
    )


def _check_val_batch(describe: str, train_tokens: int, val_tokens: int, cfg: Config, world_size: int) -> None:
    """Refuse evaluation on a validation slice with fewer windows than one micro-batch on every rank;
    raising data.val_fraction is offered only where the corpus holds both slices at a fraction below 1.

    Raises:
        ConfigError: the numbers, and the fixes that would work.
    """
    t, need = cfg.train, cfg.train.micro_batch_size * world_size
    windows = max(val_tokens - 1, 0) // t.seq_len
    if windows >= need:
        return
    fixes = (
        [f"lower train.micro_batch_size to {windows // world_size} or less"] if windows >= world_size else []
    )
    if (val_tokens - 1) // need >= max(1, t.seq_len // 4):  # a shorter sequence, not a degenerate one
        fixes.append(f"lower train.seq_len to {(val_tokens - 1) // need} or less")
    slice_tokens, total = need * t.seq_len + 1, train_tokens + val_tokens
    # Documents are held out whole (by a hash of their text), so a fraction only approximates the
    # share of tokens: ask for a quarter more than the bare minimum.
    fraction = float(f"{1.25 * slice_tokens / total:.2g}") if total else 1.0
    if cfg.data.val_fraction < fraction < 1 and (1 - fraction) * total >= slice_tokens:
        fixes.append(f"raise data.val_fraction to {fraction:g}")
    fixes.append("set train.eval_every=0 to skip evaluation")
    raise ConfigError(
        f"the validation slice of {describe} (data.val_fraction={cfg.data.val_fraction:g}) holds {val_tokens} "
        f"tokens, {windows} windows of train.seq_len={t.seq_len}: fewer than one micro-batch for every rank, "
        f"{_batch_words(t, world_size)}; "
        + ", ".join(fixes[:-1])
        + (", or " if fixes[:-1] else "")
        + fixes[-1]
    )


def build_data(cfg: Config, info: DistInfo) -> Data:
    """Tokenize once per node (local rank 0 builds while the others wait), then memory-map on every rank.

    Raises:
        ConfigError: too little text for one training window, one micro-batch on every rank or (with
            train.eval_every) one validation micro-batch; a bad source or tokenizer; a failed build.
    """
    source, build_entry, entry = prepare(cfg.data)
    files = _once_per_node(build_entry, entry, info)
    t = cfg.train
    train_tokens = files.tokens("train")
    if len(train_tokens) < t.seq_len + 1:
        shortest = (len(train_tokens) - 1) // (t.micro_batch_size * info.world_size)  # one micro-batch a rank
        raise ConfigError(
            f"{source.describe} holds {len(train_tokens)} training tokens, fewer than one sample of "
            f"train.seq_len + 1 = {t.seq_len + 1}; "
            + (f"lower train.seq_len to {shortest} or less, or " if shortest else "")
            + "add text"
        )
    sampler = WindowSampler(train_tokens, t.seq_len, t.micro_batch_size, info.rank, info.world_size, t.seed)
    _check_train_batch(source.describe, len(train_tokens), t, info.world_size)
    val_tokens = files.tokens("val")
    if t.eval_every:
        _check_val_batch(source.describe, len(train_tokens), len(val_tokens), cfg, info.world_size)
    meta = files.meta
    return Data(files, sampler, val_tokens, meta["vocab_size"], meta["eos_id"], files.tokenizer_file)
