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
from trainer.config import Config, DataConfig
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
        raise ConfigError(
            f"{source.describe} holds {len(train_tokens)} training tokens, fewer than one sample of "
            f"train.seq_len + 1 = {t.seq_len + 1}; add text or lower train.seq_len"
        )
    sampler = WindowSampler(train_tokens, t.seq_len, t.micro_batch_size, info.rank, info.world_size, t.seed)
    if sampler.num_samples < sampler.global_batch:
        raise ConfigError(
            f"{source.describe} has {sampler.num_samples} training windows of train.seq_len={t.seq_len}, "
            f"fewer than one micro-batch for every rank ({sampler.global_batch}); lower train.micro_batch_size "
            "or train.seq_len, or add text"
        )
    val_tokens = files.tokens("val")
    if t.eval_every and max(len(val_tokens) - 1, 0) // t.seq_len < t.micro_batch_size * info.world_size:
        raise ConfigError(
            f"the validation slice of {source.describe} holds fewer than one micro-batch of "
            f"train.seq_len={t.seq_len} ({len(val_tokens)} tokens); raise data.val_fraction or set train.eval_every=0"
        )
    meta = files.meta
    return Data(files, sampler, val_tokens, meta["vocab_size"], meta["eos_id"], files.tokenizer_file)
