"""The token cache: a corpus tokenized once into flat memory-mapped files, under a content key.

Layout of one entry, ``<cache_dir>/<key>/``: ``train.bin`` and ``val.bin`` (documents joined with
the end-of-document token, uint16 when the vocabulary fits, else uint32), ``meta.json``, and
``tokenizer.json`` for every tokenizer but bytes (a trained tokenizer lives only here and in the
run folders). The key hashes the source's fingerprint, the tokenizer and the split, so a changed
file, tokenizer or ``val_fraction`` gets a new entry and an unchanged one is reused.

An entry is built in a temporary folder and renamed into place, so a reader never sees half of one
and two builders (two nodes on a shared disk, two jobs) cannot corrupt each other.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.config import DataConfig
from trainer.data.pack import VAL_RULES, PackStats, is_validation, pack
from trainer.data.sources import Source
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, token_dtype, train_bpe

FORMAT_VERSION = 2
log = logging.getLogger("ramp")


@dataclass(frozen=True)
class TokenFiles:
    """One complete cache entry: its folder and its meta.json."""

    path: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> np.ndarray:
        """The tokens of ``split`` ("train" or "val"), memory-mapped read-only; empty when it has none."""
        dtype = np.dtype(self.meta["dtype"])
        if self.meta["tokens"][split] == 0:  # an empty file cannot be memory-mapped
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.path / f"{split}.bin", dtype=dtype, mode="r")

    @property
    def tokenizer_file(self) -> Path | None:
        """The entry's tokenizer.json, or None (the byte tokenizer has none)."""
        path = self.path / "tokenizer.json"
        return path if path.exists() else None


def val_rule(meta: dict[str, Any]) -> str:
    """How an entry's validation slice was held out, in words with its fraction (entries written before
    the rule was recorded held out documents)."""
    rule = str(meta.get("val_split", "documents"))
    share = "" if rule == "last document" else f", data.val_fraction={meta['val_fraction']:g}"
    return VAL_RULES[rule] + share


def default_cache_dir() -> Path:
    """``$RAMP_CACHE_DIR``, else ``~/.cache/ramp``."""
    return Path(os.environ.get("RAMP_CACHE_DIR") or Path.home() / ".cache" / "ramp")


def cache_key(source: Source, tokenizer_name: str, val_fraction: float) -> str:
    """An entry's name: 16 hex digits of the SHA-256 of the format, source, tokenizer and split."""
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "source": source.fingerprint(),
            "tokenizer": tokenizer_name,
            "val_fraction": val_fraction,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lookup(entry: Path) -> TokenFiles | None:
    """The entry at ``entry``, or None when none has been built there (no meta.json)."""
    if (entry / "meta.json").exists():
        return TokenFiles(entry, json.loads((entry / "meta.json").read_text()))
    return None


def _train_tokenizer(source: Source, cfg: DataConfig) -> HFTokenizer:
    """A BPE learned from the training documents only: validation text stays unseen."""

    def texts() -> Any:
        for batch in source.batches():
            yield [
                text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
                for text in batch
                if not is_validation(text, cfg.val_fraction)
            ]

    started = time.perf_counter()
    tokenizer = train_bpe(texts(), cfg.vocab_size)
    log.info(
        "ramp | data: trained a byte-level BPE of %d tokens in %.1f s",
        tokenizer.vocab_size,
        time.perf_counter() - started,
    )
    return tokenizer


def _staging_prefix(entry: Path) -> str:
    return f".{entry.name}-{socket.gethostname()}-"


def _remove_abandoned_staging(entry: Path) -> None:
    """Remove the staging folders of ``entry`` that builds on this host left when killed (Ctrl-C during
    tokenizing, a SIGKILL): their process is gone. Other hosts' builds, and live ones, are left alone."""
    prefix = _staging_prefix(entry)
    for folder in entry.parent.glob(f"{glob.escape(prefix)}*"):
        pid = folder.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _meta(
    source: Source, tokenizer: ByteTokenizer | HFTokenizer, cfg: DataConfig, stats: PackStats, seconds: float
) -> dict[str, Any]:
    """An entry's meta.json: what was tokenized, how, into what, and how the validation slice was cut."""
    return {
        "format": FORMAT_VERSION,
        "source": source.describe,
        "tokenizer": cfg.tokenizer,
        "tokenizer_name": tokenizer.name,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokens": stats.tokens,
        "documents": stats.documents,
        "val_fraction": cfg.val_fraction,
        "val_split": stats.val_split,
        "seconds": round(seconds, 3),
    }


def build(
    source: Source, tokenizer: ByteTokenizer | HFTokenizer | None, cfg: DataConfig, entry: Path
) -> TokenFiles:
    """Build ``entry`` (``tokenizer`` None: train one first), unless it exists: then reuse it."""
    found = lookup(entry)
    if found is not None:
        log.info(
            "ramp | data: reusing cached tokens in %s (%d train, %d val tokens; validation: %s)",
            entry,
            found.meta["tokens"]["train"],
            found.meta["tokens"]["val"],
            val_rule(found.meta),
        )
        return found
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(entry)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(entry)}{os.getpid()}-", dir=entry.parent))
    try:
        log.info(
            "ramp | data: tokenizing %s with data.tokenizer=%s into %s", source.describe, cfg.tokenizer, entry
        )
        if tokenizer is None:
            tokenizer = _train_tokenizer(source, cfg)
        spec = tokenizer.to_json()
        if spec is not None:
            (staging / "tokenizer.json").write_text(spec)
        started = time.perf_counter()
        stats = pack(source, tokenizer, cfg.val_fraction, staging, cfg.num_proc)
        seconds = time.perf_counter() - started
        total = stats.tokens["train"] + stats.tokens["val"]
        meta = _meta(source, tokenizer, cfg, stats, seconds)
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        with contextlib.suppress(OSError):  # another builder finished first; its entry is identical
            os.rename(staging, entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "ramp | data: %d document%s, %d tokens (%d val; validation: %s) in %.1f s: %.0f tokens/s",
        stats.documents["train"] + stats.documents["val"],
        "" if stats.documents["train"] + stats.documents["val"] == 1 else "s",
        total,
        stats.tokens["val"],
        val_rule(meta),
        seconds,
        total / max(seconds, 1e-9),
    )
    files = lookup(entry)
    assert files is not None, f"the token cache entry {entry} vanished while it was built"
    return files
