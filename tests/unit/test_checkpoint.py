"""The checkpoint format: complete, checksummed, atomic saves, the latest pointer and pruning."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import save_checkpoint as save
from trainer import checkpoint
from trainer.backends.ddp import DDPBackend
from trainer.distributed import DistInfo


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
