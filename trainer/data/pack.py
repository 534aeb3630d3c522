"""Tokenize documents batch by batch and pack them into two flat token files, train and val.

Each document's tokens are followed by the end-of-document token, so a training window that spans
two documents sees where one ends (nanoGPT's and Megatron's packing). Which file a document lands
in depends only on a hash of its text: not on where the corpus lives or in which order it is listed,
and copies of one document never straddle the split. Reading runs one batch ahead in a thread, and tokenizing runs
in the tokenizer's own threads (tokenizers' Rust code uses every core) or in ``num_proc`` worker
processes, so the packer keeps pace with the tokenizer.
"""

from __future__ import annotations

import collections
import math
import multiprocessing
import os
import queue
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from trainer.data.sources import Batch, Source
from trainer.data.tokenizer import ByteTokenizer, Text, Tokenizer, token_dtype
from trainer.errors import ConfigError

READ_AHEAD = 4
"""Batches read ahead of the tokenizer: enough to hide a slow file, bounded to cap memory."""


def is_validation(text: Text, val_fraction: float) -> bool:
    """Is this document held out? A hash of its text decides, the same on every node and every run."""
    raw = text if isinstance(text, bytes) else text.encode("utf-8", errors="surrogateescape")
    return zlib.crc32(raw) % 1_000_000 < val_fraction * 1_000_000


def read_ahead(batches: Iterator[Any], depth: int = READ_AHEAD) -> Iterator[Any]:
    """The same batches, read by a background thread while the caller tokenizes the last ones."""
    slots: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(("batch", batch), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(("end", None))
        except BaseException as err:  # handed to the consumer, who raises it
            slots.put(("error", err))

    reader = threading.Thread(target=produce, name="ramp-data-read", daemon=True)
    reader.start()
    try:
        while True:
            kind, item = slots.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


_worker_tokenizer: Tokenizer | None = None
"""A tokenizing worker's own copy of the tokenizer, set once by the pool's initializer."""


def _init_worker(tokenizer: Tokenizer) -> None:
    global _worker_tokenizer
    # num_proc processes each running a thread per core would oversubscribe the machine
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[Text]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def encoded(
    batches: Iterator[Batch], tokenizer: Tokenizer, val_fraction: float, num_proc: int
) -> Iterator[tuple[list[bool], list[np.ndarray]]]:
    """(held out?, token array) of every document, batch by batch, in the source's order."""
    # the reading thread also hashes, so neither step waits for the tokenizer
    marked = ((texts, [is_validation(t, val_fraction) for t in texts]) for texts in batches)
    if num_proc <= 1 or isinstance(tokenizer, ByteTokenizer):  # bytes run at memory speed: no workers
        for texts, held_out in read_ahead(marked):
            yield held_out, tokenizer.encode_batch(texts)
        return
    # spawn, not fork: the caller may hold process-group and tokenizer threads
    context = multiprocessing.get_context("spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: collections.deque[tuple[list[bool], Any]] = collections.deque()
        for texts, held_out in read_ahead(marked):
            pending.append((held_out, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * num_proc:  # bounded: the corpus never sits in memory at once
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


class SplitWriter:
    """Appends documents, each followed by the end-of-document token, to one flat token file."""

    def __init__(self, path: Path, dtype: np.dtype, eos_id: int) -> None:
        self.path = path
        self.handle = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self.dtype = dtype
        self.eos = np.array([eos_id], dtype=dtype)
        self.tokens = 0
        self.documents = 0

    def add(self, documents: list[np.ndarray]) -> None:
        """Append ``documents``, each followed by the end-of-document token."""
        if not documents:
            return
        pieces = [piece for ids in documents for piece in (ids, self.eos)]
        packed = np.concatenate(pieces).astype(self.dtype, copy=False)
        self.handle.write(packed.tobytes())
        self.tokens += len(packed)
        self.documents += len(documents)

    def add_head(self, tokens: np.ndarray) -> None:
        """Append the first part of a document that continues in the other split: no end-of-document token
        (the document does not end here), and it counts as that document."""
        self.handle.write(tokens.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(tokens)
        self.documents += 1

    def drop_last(self, document: np.ndarray) -> None:
        """Remove the last document added (it must be ``document``)."""
        self.tokens -= len(document) + 1
        self.documents -= 1
        self.handle.truncate(self.tokens * self.dtype.itemsize)
        self.handle.seek(self.tokens * self.dtype.itemsize)

    def __enter__(self) -> SplitWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()


VAL_RULES = {
    "documents": "documents held out by a hash of their text",
    "last document": "the last document (the hash held out none)",
    "tokens": "the last tokens of the corpus, which is one document (split by tokens, as nanoGPT splits its file)",
}
"""How the validation slice was held out (a cache entry's ``val_split``), in words for the start-up line."""


@dataclass
class PackStats:
    """Tokens (end-of-document tokens included) and documents written, by split: "train" and "val"; and
    the rule that held out the validation slice (a key of :data:`VAL_RULES`)."""

    tokens: dict[str, int]
    documents: dict[str, int]
    val_split: str = "documents"


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """One document split as nanoGPT splits its one file: the first tokens train, the last
    ``ceil(val_fraction x len)`` (at least one) validate. Shapes ``(n,)`` -> ``(n - k,)``, ``(k,)``."""
    held = min(max(1, math.ceil(val_fraction * len(tokens))), len(tokens) - 1)
    return tokens[: len(tokens) - held], tokens[len(tokens) - held :]


def _rebalance(
    train: SplitWriter,
    val: SplitWriter,
    last_train: np.ndarray | None,
    last_val: np.ndarray | None,
    val_fraction: float,
) -> str:
    """Give both splits text where the hash left one empty; the rule used (a key of :data:`VAL_RULES`)."""
    if train.documents + val.documents == 1:  # one document: split by tokens
        writer, document = (train, last_train) if train.documents else (val, last_val)
        if document is None or len(document) < 2:
            return "documents"
        writer.drop_last(document)
        head, tail = split_tokens(document, val_fraction)
        train.add_head(head)
        val.add([tail])
        val.documents -= 1  # the same document, counted once
        return "tokens"
    if val.documents == 0 and last_train is not None:
        train.drop_last(last_train)
        val.add([last_train])
        return "last document"
    if train.documents == 0 and last_val is not None:
        val.drop_last(last_val)
        train.add([last_val])
        return "documents"
    return "documents"


def pack(source: Source, tokenizer: Tokenizer, val_fraction: float, folder: Path, num_proc: int) -> PackStats:
    """Write ``folder/train.bin`` and ``folder/val.bin``; empty documents are skipped.

    When the hash holds out no document (a tiny corpus), the last training document moves to
    validation, and when it holds out every document, the last one moves to training, so any corpus of
    two documents or more has both slices; a corpus of one document (one .txt file) is split by tokens
    instead (:func:`split_tokens`): its head trains, its tail (ending in the end-of-document token)
    validates, and it counts as one document.

    Raises:
        ConfigError: the source holds no non-empty document.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    last_train: np.ndarray | None = None
    last_val: np.ndarray | None = None
    with (
        SplitWriter(folder / "train.bin", dtype, tokenizer.eos_id) as train,
        SplitWriter(folder / "val.bin", dtype, tokenizer.eos_id) as val,
    ):
        for held_out, arrays in encoded(source.batches(), tokenizer, val_fraction, num_proc):
            to_train: list[np.ndarray] = []
            to_val: list[np.ndarray] = []
            for is_val, tokens in zip(held_out, arrays, strict=True):
                if len(tokens):
                    (to_val if is_val else to_train).append(tokens)
            train.add(to_train)
            val.add(to_val)
            last_train = to_train[-1] if to_train else last_train
            last_val = to_val[-1] if to_val else last_val
        rule = _rebalance(train, val, last_train, last_val, val_fraction)
    if train.documents + val.documents == 0:
        raise ConfigError(f"{source.describe} holds no text (no non-empty document); point it at your corpus")
    return PackStats(
        tokens={"train": train.tokens, "val": val.tokens},
        documents={"train": train.documents, "val": val.documents},
        val_split=rule,
    )
