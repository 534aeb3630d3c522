"""Tokenize a corpus once into flat memory-mapped token files, cached under a content key.

Layout of one cache entry, ``<cache_dir>/<key>/``: ``train.bin`` and ``val.bin`` (documents joined
with the end-of-document token, uint16 when the vocabulary fits, else uint32) and ``meta.json``.
An entry is built in a temporary folder and renamed into place, so a reader never sees half of one
and two builders (two nodes on a shared disk) cannot corrupt each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

FORMAT_VERSION = 1


class Source(Protocol):
    def fingerprint(self) -> dict[str, object]: ...
    def documents(self) -> Iterator[tuple[str, bytes]]: ...


class Tokenizer(Protocol):
    name: str
    eos_id: int
    vocab_size: int

    def encode(self, data: bytes) -> np.ndarray: ...


@dataclass(frozen=True)
class TokenFiles:
    path: Path
    meta: dict[str, Any]

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.path / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]), mode="r")


def default_cache_dir() -> Path:
    return Path(os.environ.get("RAMP_CACHE_DIR") or Path.home() / ".cache" / "ramp")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    """Hold out documents by a hash of their id: stable whatever order the source lists them in."""
    return zlib.crc32(doc_id.encode()) % 1_000_000 < val_fraction * 1_000_000


def cache_key(source: Source, tokenizer: Tokenizer, val_fraction: float) -> str:
    blob = json.dumps(
        {
            "format": FORMAT_VERSION,
            "source": source.fingerprint(),
            "tokenizer": tokenizer.name,
            "val_fraction": val_fraction,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write(source: Source, tokenizer: Tokenizer, val_fraction: float, folder: Path) -> dict[str, Any]:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val:
        for doc_id, text in source.documents():
            split = "val" if is_validation(doc_id, val_fraction) else "train"
            ids = tokenizer.encode(text).astype(dtype)
            handle = val if split == "val" else train
            handle.write(ids.tobytes())
            handle.write(eos.tobytes())
            counts[split] += len(ids) + 1
            docs[split] += 1
        for handle in (train, val):
            handle.flush()
            os.fsync(handle.fileno())
    return {
        "dtype": np.dtype(dtype).name,
        "tokens": counts,
        "documents": docs,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
    }


def build_or_load(
    source: Source, tokenizer: Tokenizer, val_fraction: float, cache_dir: Path, build: bool
) -> TokenFiles | None:
    """Return the cached entry; build it first when ``build`` (one process per node does)."""
    key = cache_key(source, tokenizer, val_fraction)
    final = cache_dir / key
    if (final / "meta.json").exists():
        return TokenFiles(final, json.loads((final / "meta.json").read_text()))
    if not build:
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        meta = _write(source, tokenizer, val_fraction, staging)
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        with contextlib.suppress(OSError):  # another builder finished first; its entry is identical
            os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TokenFiles(final, json.loads((final / "meta.json").read_text()))
