"""Data: sources, tokenizers, the cached memory-mapped token files, and the resumable sampler."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer import distributed
from trainer.config import Config, ConfigError
from trainer.data.sampler import WindowSampler, eval_batches
from trainer.data.sources import BuiltinSource
from trainer.data.store import TokenFiles, build_or_load, default_cache_dir
from trainer.data.tokenizer import ByteTokenizer
from trainer.distributed import DistInfo


@dataclass
class Data:
    files: TokenFiles
    train: WindowSampler
    val_tokens: np.ndarray
    vocab_size: int
    eos_id: int

    def eval_indices(self, cfg: Config, info: DistInfo) -> list[np.ndarray]:
        return eval_batches(
            self.val_tokens,
            cfg.train.seq_len,
            cfg.train.micro_batch_size,
            info.rank,
            info.world_size,
            cfg.train.eval_steps,
        )


def build_data(cfg: Config, info: DistInfo) -> Data:
    """Tokenize once per node (local rank 0 builds while the others wait), then memory-map on every rank."""
    source = BuiltinSource()
    tokenizer = ByteTokenizer()
    cache_dir = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()
    files = None
    if info.is_local_main:
        files = build_or_load(source, tokenizer, cfg.data.val_fraction, cache_dir, build=True)
    distributed.barrier(info)
    if files is None:
        files = build_or_load(source, tokenizer, cfg.data.val_fraction, cache_dir, build=False)
    assert files is not None, f"the token cache under {cache_dir} was not built"
    t = cfg.train
    train_tokens = files.tokens("train")
    sampler = WindowSampler(train_tokens, t.seq_len, t.micro_batch_size, info.rank, info.world_size, t.seed)
    if sampler.num_samples < sampler.global_batch:
        raise ConfigError(
            f"data={cfg.data.name} has {sampler.num_samples} training windows of train.seq_len={t.seq_len}, "
            f"fewer than one micro-batch for every rank ({sampler.global_batch}); lower train.micro_batch_size "
            "or train.seq_len"
        )
    val_tokens = files.tokens("val")
    if t.eval_every and (len(val_tokens) - 1) // t.seq_len < t.micro_batch_size * info.world_size:
        raise ConfigError(
            f"the validation slice holds fewer than one micro-batch of train.seq_len={t.seq_len}; raise "
            "data.val_fraction or set train.eval_every=0"
        )
    return Data(files, sampler, val_tokens, tokenizer.vocab_size, tokenizer.eos_id)
