"""The checkpoint format: atomic saves, checksums, the ``latest`` pointer and pruning.

Layout under ``run.dir/checkpoints/``::

    step_<N>/          a complete checkpoint: only a finished save carries this name
      dcp/             weights and optimizer state, written by the backend through DCP, every rank its
                       part (see trainer.backends.state); backend=deepspeed writes its engine's files
                       into deepspeed/ instead
      rank_<r>.pt      each rank's RNG states and its unreduced metrics of the open log interval
      meta.json        written last: global step, tokens, sampler position, world size, the resolved
                       config, and the CRC-32 of every other file (sub-folders included)
    latest             the name of the newest complete checkpoint, replaced after the rename
    .tmp-step_<N>/     a save in progress: never read, removed by the next run

A save writes everything into the temporary folder, flushes it to disk, renames it into place and
only then points ``latest`` at it, so a kill at any moment leaves the previous checkpoint whole. A
background save (``train.ckpt_async``) does the same once its write has finished (:class:`Saving`).
Loading uses ``torch.load(weights_only=True)``: a checkpoint can never execute code. Which
checkpoint a run starts from, the typed reader of ``meta.json`` and what a resume restores live in
:mod:`trainer.resume`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zlib
from collections.abc import Collection
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer import distributed
from trainer.distributed import DistInfo

log = logging.getLogger("ramp")

FORMAT_VERSION = 2
"""2: DDP and FSDP2 write DCP's ``dcp/`` folder; 1 (still loaded): DDP's ``model.pt`` and ``optimizer.pt``."""
META = "meta.json"
LATEST = "latest"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


def step_of(path: Path) -> int:
    """The global step of a ``step_<N>`` folder."""
    return int(path.name[len(PREFIX) :])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, newest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=step_of, reverse=True)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk before returning."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def torch_save_durably(obj: object, path: Path) -> None:
    """``torch.save`` to ``path``, flushed to disk before returning."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, for writers that do not (DeepSpeed's engine)."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(folder)


def checksum(path: Path) -> str:
    """CRC-32 of a file, as 8 hex digits.

    It guards against truncation and corruption (a kill mid-write, a bad disk), not tampering: loading
    is made safe by weights_only, not by the checksum. Measured here, zlib's CRC-32 runs at 3.8 GB/s
    against SHA-256's 1.0 GB/s, and checksumming was half of a save's blocking time.
    """
    crc = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states, as ``torch.load(weights_only=True)`` reads them."""
    version, mt, gauss = random.getstate()
    np_state: Any = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Saving:
    """A checkpoint being saved: complete once its files are written, checksummed, renamed into place and
    ``latest`` points at it (:meth:`complete`). A synchronous save is complete when :func:`save` returns;
    a background one (``train.ckpt_async``) when its write has finished and rank 0 has completed it.

    Completing is rank 0's file work alone: DCP's coordinator (rank 0) finishes a save only after every
    rank's write is done, so rank 0's finished write means every rank's is.
    """

    def __init__(self, root: Path, step: int, info: DistInfo, meta: dict[str, Any], keep: int) -> None:
        self.root, self.step, self.info, self.meta, self.keep = root, step, info, meta, keep
        self.path = root / f"{PREFIX}{step}"
        """The checkpoint's folder once complete."""
        self.staging = root / f"{TMP_PREFIX}{PREFIX}{step}"
        self.write: Future[Any] | None = None
        """The backend's background write, None once it is waited on (or for a synchronous save)."""
        self.completed = False

    def done(self) -> bool:
        """Whether the background write (if any) has finished: :meth:`complete` then does not wait."""
        return self.write is None or self.write.done()

    def complete(self, protect: Collection[int] = ()) -> Path:
        """Wait for this rank's background write (raising what it raised), then on rank 0 checksum the files,
        write ``meta.json``, rename the folder into place, point ``latest`` at it and prune: the newest
        ``keep`` complete checkpoints stay, and those of the steps in ``protect`` (read by a background
        evaluation). Idempotent; not collective. Returns the checkpoint's path."""
        if self.write is not None:
            self.write.result()
            self.write = None
        if self.info.is_main and not self.completed:
            _finalize(self.staging, self.path, self.root, {**self.meta, "world_size": self.info.world_size})
            prune(self.root, self.keep, protect)
        self.completed = True
        return self.path


def prune(root: Path, keep: int, protect: Collection[int] = ()) -> None:
    """Delete all but the newest ``keep`` complete checkpoints under ``root``, sparing those of the steps
    in ``protect`` (a background evaluation reads them); rank 0's job."""
    for old in complete_checkpoints(root)[keep:]:
        if step_of(old) not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _finalize(staging: Path, final: Path, root: Path, meta: dict[str, Any]) -> None:
    """Checksum every file (backends may write sub-folders: keys are paths relative to the checkpoint),
    write ``meta.json`` last, rename the folder into place and point ``latest`` at it, each flushed."""
    files = {
        p.relative_to(staging).as_posix(): checksum(p) for p in sorted(staging.rglob("*")) if p.is_file()
    }
    meta = {**meta, "format": FORMAT_VERSION, "step": step_of(final), "files": files}
    write_durably(staging / META, json.dumps(meta, indent=1).encode())
    _fsync_dir(staging)
    if final.exists():  # a save of the same step (e.g. a preemption right after the last save)
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(root)
    write_durably(root / f"{TMP_PREFIX}{LATEST}", final.name.encode())
    os.replace(root / f"{TMP_PREFIX}{LATEST}", root / LATEST)
    _fsync_dir(root)


def save(
    root: Path,
    step: int,
    info: DistInfo,
    backend: Any,
    meta: dict[str, Any],
    rank_state: dict[str, Any],
    keep: int,
    protect: Collection[int] = (),
    background: bool = False,
) -> Saving:
    """Save step ``step`` collectively (every rank calls this).

    Args:
        keep: complete checkpoints kept (the newest); older ones are pruned once this one is complete.
        protect: steps whose checkpoints stay anyway (a background evaluation reads them).
        background: the backend writes its state in the background (``train.ckpt_async``): the returned
            save is complete only after :meth:`Saving.complete`; a kill before that leaves the previous
            checkpoint in force.

    Returns:
        The save: complete already unless ``background``.
    """
    saving = Saving(root, step, info, meta, keep)
    if info.is_main:
        shutil.rmtree(saving.staging, ignore_errors=True)
        saving.staging.mkdir(parents=True)
    distributed.barrier(info)
    torch_save_durably({**rank_state, "rng": rng_state()}, saving.staging / f"rank_{info.rank}.pt")
    saving.write = backend.save(saving.staging, info, background)
    if saving.write is None:
        distributed.barrier(info)  # every rank's files are written
        saving.complete(protect)
        distributed.barrier(info)  # nobody reads the checkpoint before it is in place
    return saving


def verify(path: Path, files: dict[str, str]) -> str | None:
    """Why a checkpoint's files are unusable (missing, truncated, corrupted), or None when all match.

    Args:
        path: a ``step_<N>`` folder.
        files: its ``meta.json``'s checksums, by path relative to ``path``.
    """
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if checksum(file) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def remove_partial_saves(root: Path) -> None:
    """Temporary folders of saves that never finished (a kill mid-save)."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
