"""The checkpoint format: complete, checksummed, atomic saves, the latest pointer and pruning."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from tests.helpers import checkpoint_meta, checkpoint_weights, one_step, random_batch, snapshot, tiny_backend
from tests.helpers import save_checkpoint as save
from trainer import checkpoint, distributed
from trainer.backends.ddp import DDPBackend
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.testing import run_distributed


def test_a_save_is_complete_verified_and_pointed_to(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    path = save(tmp_path, 7, ddp_backend, alone)
    assert path == tmp_path / "step_7"
    assert sorted(p.name for p in path.iterdir()) == ["dcp", "meta.json", "rank_0.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7
    assert meta["world_size"] == 1
    assert meta["sampler"] == {"epoch": 0, "position": 7}
    assert set(meta["files"]) == {"dcp/.metadata", "dcp/__0_0.distcp", "rank_0.pt"}
    assert all(meta["files"][name] == checkpoint.checksum(path / name) for name in meta["files"])
    assert (tmp_path / "latest").read_text() == "step_7"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert checkpoint.verify(path, meta["files"]) is None


def test_only_the_newest_are_kept(tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo) -> None:
    for step in (2, 4, 6, 8, 10):
        save(tmp_path, step, ddp_backend, alone, keep=3)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_10", "step_8", "step_6"]


def test_a_checkpoint_a_background_evaluation_reads_outlives_its_turn_until_it_is_done(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    save(tmp_path, 2, ddp_backend, alone, keep=1)
    save(tmp_path, 4, ddp_backend, alone, keep=1, protect=(2,))  # step 2 still being evaluated
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_4", "step_2"]
    save(tmp_path, 6, ddp_backend, alone, keep=1)  # its evaluation is done: pruned with the rest
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_6"]


def test_a_partial_save_is_never_picked_and_is_cleaned_up(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    save(tmp_path, 2, ddp_backend, alone)
    partial = tmp_path / ".tmp-step_4"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"half a file")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_2"]
    checkpoint.remove_partial_saves(tmp_path)
    assert not partial.exists()
    assert (tmp_path / "step_2").exists()


def test_verify_names_a_missing_or_damaged_file(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    path = save(tmp_path, 1, ddp_backend, alone)
    files = json.loads((path / "meta.json").read_text())["files"]
    target = path / "dcp" / "__0_0.distcp"
    target.write_bytes(target.read_bytes()[:1000])
    assert (
        checkpoint.verify(path, files)
        == "dcp/__0_0.distcp does not match its checksum (truncated or corrupted)"
    )
    target.unlink()
    assert checkpoint.verify(path, files) == "dcp/__0_0.distcp is missing"


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    torch.manual_seed(5)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = torch.rand(4)
    torch.manual_seed(77)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(4), expected)


# ---------------------------------------------------------------------------------------------------
# Background saves (train.ckpt_async): complete only once the backend's write has finished


class BackgroundWriter:
    """A backend whose background write is a future the test finishes by hand (:meth:`finish`)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Future[Any]]] = []

    def save(self, folder: Path, info: DistInfo, background: bool = False) -> Future[Any] | None:
        """Start the write: nothing is in ``folder/dcp`` until :meth:`finish`."""
        assert background
        future: Future[Any] = Future()
        self.pending.append((folder, future))
        return future

    def finish(self, error: BaseException | None = None) -> None:
        """The oldest write ends: its file written, or ``error`` raised."""
        folder, future = self.pending.pop(0)
        if error is not None:
            future.set_exception(error)
            return
        (folder / "dcp").mkdir()
        (folder / "dcp" / "state.bin").write_bytes(folder.name.encode())
        future.set_result(None)


def start_save(
    root: Path, step: int, backend: BackgroundWriter, info: DistInfo, keep: int = 3
) -> checkpoint.Saving:
    """``checkpoint.save`` in the background, as the loop calls it with train.ckpt_async."""
    meta = checkpoint_meta(step)
    return checkpoint.save(root, step, info, backend, meta, {"meter": {}}, keep, background=True)


def finished_save(
    root: Path,
    step: int,
    backend: BackgroundWriter,
    info: DistInfo,
    keep: int = 3,
    protect: tuple[int, ...] = (),
) -> Path:
    """A background save whose write finishes at once, completed as the loop completes it."""
    saving = start_save(root, step, backend, info, keep)
    backend.finish()
    return saving.complete(protect)


def test_a_background_save_counts_only_once_its_write_is_done(tmp_path: Path, alone: DistInfo) -> None:
    backend = BackgroundWriter()
    finished_save(tmp_path, 2, backend, alone)
    saving = start_save(tmp_path, 4, backend, alone)
    assert not saving.done()
    assert (tmp_path / "latest").read_text() == "step_2"
    assert not (tmp_path / "step_4").exists()
    assert (tmp_path / ".tmp-step_4" / "rank_0.pt").is_file()
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_2"]
    backend.finish()
    assert saving.done()
    assert saving.complete() == tmp_path / "step_4"
    assert (tmp_path / "latest").read_text() == "step_4"
    assert not (tmp_path / ".tmp-step_4").exists()
    meta = json.loads((tmp_path / "step_4" / "meta.json").read_text())
    assert set(meta["files"]) == {"dcp/state.bin", "rank_0.pt"}
    assert checkpoint.verify(tmp_path / "step_4", meta["files"]) is None
    assert saving.complete() == tmp_path / "step_4"  # idempotent


def test_a_failed_background_write_raises_at_completion_and_the_previous_checkpoint_stays(
    tmp_path: Path, alone: DistInfo
) -> None:
    backend = BackgroundWriter()
    finished_save(tmp_path, 2, backend, alone)
    before = snapshot(tmp_path / "step_2")
    saving = start_save(tmp_path, 4, backend, alone)
    backend.finish(OSError("No space left on device"))
    assert saving.done()
    with pytest.raises(OSError, match="No space left"):
        saving.complete()
    assert (tmp_path / "latest").read_text() == "step_2"
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_2"]
    assert snapshot(tmp_path / "step_2") == before
    checkpoint.remove_partial_saves(tmp_path)  # what the next run does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_2"]


def test_a_non_main_rank_completes_nothing_but_waits_for_its_write(tmp_path: Path) -> None:
    rank_1 = DistInfo(rank=1, local_rank=1, world_size=2, local_world_size=2, device=torch.device("cpu"))
    saving = checkpoint.Saving(tmp_path, 4, rank_1, checkpoint_meta(4), keep=3)
    saving.staging.mkdir()
    saving.write = Future()
    assert not saving.done()
    saving.write.set_result(None)
    assert saving.complete() == tmp_path / "step_4"
    assert saving.staging.is_dir()  # rank 0 renames it
    assert not (tmp_path / "step_4").exists()
    assert not (tmp_path / "latest").exists()


def test_completing_a_background_save_prunes_by_keep_and_spares_protected_steps(
    tmp_path: Path, alone: DistInfo
) -> None:
    backend = BackgroundWriter()
    for step in (2, 4, 6):
        finished_save(tmp_path, step, backend, alone, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_6", "step_4"]
    saving = start_save(tmp_path, 8, backend, alone, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_6", "step_4"]  # not yet
    backend.finish()
    saving.complete(protect=(4,))  # a background evaluation still reads step 4
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_8", "step_6", "step_4"]
    finished_save(tmp_path, 10, backend, alone, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_10", "step_8"]


WRITE_GATE = threading.Event()
"""Open (set) unless a test holds DCP's background writes back: they then wait until it opens."""
WRITE_GATE.set()


_WRITE_DATA = _FileSystemWriter.write_data


def _gated_write_data(self: Any, *args: Any, **kwargs: Any) -> Any:
    """DCP's file writer, once :data:`WRITE_GATE` opens (a minute at most)."""
    assert WRITE_GATE.wait(timeout=60), "the write gate never opened"
    return _WRITE_DATA(self, *args, **kwargs)


def _held_back_save(info: DistInfo, root: Path, name: str) -> bool:
    """Step once; save step 1 in the background with the write held back; step again; let the write go.
    Also saved synchronously: step 1 (the reference) and step 2 (the weights after). Whether the write was
    still pending after the second step."""
    config = compose(
        ["train.seq_len=32", "train.micro_batch_size=2", f"backend={name}", "train.ckpt_async=true"]
    )
    backend = tiny_backend(config, info)
    one_step(backend, random_batch(1))

    def save_into(folder: str, step: int, background: bool = False) -> checkpoint.Saving:
        rank_state: dict[str, Any] = {"meter": {}}
        meta = checkpoint_meta(step, name)
        return checkpoint.save(root / folder, step, info, backend, meta, rank_state, 3, (), background)

    save_into("sync", 1)
    WRITE_GATE.clear()
    saving = save_into("async", 1, background=True)
    one_step(backend, random_batch(2))  # changes the weights while the write waits
    pending = not saving.done()
    WRITE_GATE.set()
    saving.complete()
    distributed.barrier(info)
    save_into("sync", 2)
    return pending


def _saved_while_training_went_on(info: DistInfo, root: str) -> dict[str, bool]:
    """:func:`_held_back_save` with DDP, then FSDP2, each under ``root/<backend>``."""
    _FileSystemWriter.write_data = _gated_write_data  # type: ignore[method-assign]  # this rank's process only
    return {name: _held_back_save(info, Path(root, name), name) for name in ("ddp", "fsdp")}


def test_a_background_save_holds_the_state_of_its_step_not_a_later_one(tmp_path: Path) -> None:
    """On 2 ranks, DDP and FSDP2: a background save whose write is held back until the next optimizer step
    has changed the weights writes the weights of its own step, bit-identical to a synchronous save of it."""
    reports = run_distributed(_saved_while_training_went_on, str(tmp_path))
    assert reports == [{"ddp": True, "fsdp": True}] * 2  # each write was still pending after the step
    for name in ("ddp", "fsdp"):
        saved = checkpoint_weights(tmp_path / name / "async" / "step_1")
        expected = checkpoint_weights(tmp_path / name / "sync" / "step_1")
        later = checkpoint_weights(tmp_path / name / "sync" / "step_2")
        assert saved.keys() == expected.keys()
        assert all(torch.equal(saved[key], expected[key]) for key in expected), name
        assert not all(torch.equal(saved[key], later[key]) for key in expected)  # the step did change them
        # Every rank's shard file too (weights and AdamW state), byte for byte.
        shards = [snapshot(tmp_path / name / kind / "step_1" / "dcp") for kind in ("async", "sync")]
        written, synchronous = ({k: v for k, v in s.items() if k.endswith(".distcp")} for s in shards)
        assert len(written) == 2
        assert written == synchronous, name
        assert json.loads((tmp_path / name / "async" / "step_1" / "meta.json").read_text())["world_size"] == 2
