"""Checkpoint files, verification, fallback, pruning, safe loading and the non-finite policy, in one process."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.helpers import REPO
from trainer import checkpoint
from trainer.backends import build_backend
from trainer.backends.ddp import DDPBackend
from trainer.config import Config, ConfigError, register_configs, to_config
from trainer.distributed import DistInfo
from trainer.models import build_model

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def config(*overrides: str) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_config(
            compose("config", overrides=["train.seq_len=32", "train.micro_batch_size=2", *overrides])
        )


def make_backend(*overrides: str) -> DDPBackend:
    cfg = config(*overrides)
    torch.manual_seed(0)
    backend = build_backend(cfg, build_model(cfg.model, tokenizer_vocab=257, eos_id=256), INFO)
    assert isinstance(backend, DDPBackend)
    return backend


def train_one_step(backend: DDPBackend, seed: int) -> None:
    batch = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(seed))
    backend.set_lr(1e-3)
    backend.micro_step(batch, last=True)
    backend.optimizer_step()


def params(backend: DDPBackend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.module.parameters()]


def save(root: Path, step: int, backend: DDPBackend, keep: int = 3) -> Path:
    meta = {"tokens": step * 64, "sampler": {"epoch": 0, "position": step}, "config": {}}
    return checkpoint.save(root, step, INFO, backend, meta, {"meter": {"steps": step}}, keep)


def test_a_save_is_complete_verified_and_pointed_to(tmp_path: Path) -> None:
    backend = make_backend()
    path = save(tmp_path, 7, backend)
    assert path == tmp_path / "step_7"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.pt", "optimizer.pt", "rank_0.pt"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 7 and meta["world_size"] == 1 and meta["sampler"] == {"epoch": 0, "position": 7}
    assert set(meta["files"]) == {"model.pt", "optimizer.pt", "rank_0.pt"}
    assert all(meta["files"][name] == checkpoint.checksum(path / name) for name in meta["files"])
    assert (tmp_path / "latest").read_text() == "step_7"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert checkpoint.problem(path) is None


def test_only_the_newest_are_kept(tmp_path: Path) -> None:
    backend = make_backend()
    for step in (2, 4, 6, 8, 10):
        save(tmp_path, step, backend, keep=3)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_10", "step_8", "step_6"]


def test_a_partial_save_is_never_picked_and_is_cleaned_up(tmp_path: Path) -> None:
    backend = make_backend()
    save(tmp_path, 2, backend)
    partial = tmp_path / ".tmp-step_4"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"half a file")
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_2"]
    checkpoint.remove_partial_saves(tmp_path)
    assert not partial.exists() and (tmp_path / "step_2").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "meta"])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make_backend()
    save(tmp_path, 2, backend)
    newest = save(tmp_path, 4, backend)
    target = newest / "optimizer.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete":
        target.unlink()
    else:
        (newest / "meta.json").write_text("{not json")
    assert checkpoint.problem(newest) is not None
    with caplog.at_level(logging.WARNING, logger="ramp"):
        chosen = checkpoint.choose(checkpoint.complete_checkpoints(tmp_path), INFO, explicit=False)
    assert chosen == tmp_path / "step_2"
    assert str(newest) in caplog.text and "unusable" in caplog.text
    with pytest.raises(ConfigError, match="step_4"):
        checkpoint.choose([newest], INFO, explicit=True)


def test_load_restores_weights_and_optimizer_exactly(tmp_path: Path) -> None:
    backend = make_backend()
    train_one_step(backend, seed=1)
    path = save(tmp_path, 1, backend)
    train_one_step(backend, seed=2)
    expected_params = params(backend)

    restored = make_backend()  # fresh weights and an empty optimizer
    resumed = checkpoint.load(path, INFO, restored)
    assert resumed.rank_state == {"meter": {"steps": 1}}
    train_one_step(restored, seed=2)  # the same next step: bit-identical only if Adam's moments came back
    assert all(torch.equal(a, b) for a, b in zip(params(restored), expected_params, strict=True))


def test_load_restores_the_torch_rng_stream(tmp_path: Path) -> None:
    backend = make_backend()
    torch.manual_seed(5)
    path = save(tmp_path, 1, backend)
    after_save = torch.rand(4)
    torch.manual_seed(77)
    checkpoint.load(path, INFO, backend)
    assert torch.equal(torch.rand(4), after_save)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/ramp-checkpoint-executed-code",))


def test_loading_never_executes_code(tmp_path: Path) -> None:
    backend = make_backend()
    path = save(tmp_path, 1, backend)
    marker = Path("/tmp/ramp-checkpoint-executed-code")
    marker.unlink(missing_ok=True)
    (path / "model.pt").write_bytes(pickle.dumps({"weights": _Payload()}))
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model.pt"] = checkpoint.checksum(path / "model.pt")  # checksums alone do not protect
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.load(path, INFO, backend)
    assert not marker.exists()


def test_a_non_finite_gradient_leaves_weights_and_optimizer_untouched() -> None:
    backend = make_backend()
    train_one_step(backend, seed=1)
    before = params(backend)
    state_before = {
        k: v.clone() for k, v in backend.optimizer.state[next(backend.module.parameters())].items()
    }
    first = next(backend.module.parameters())
    handle = first.register_hook(lambda grad: grad * float("nan"))
    batch = torch.randint(0, 257, (2, 33), generator=torch.Generator().manual_seed(3))
    backend.micro_step(batch, last=True)
    handle.remove()
    norm, applied = backend.optimizer_step()
    assert not applied and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(params(backend), before, strict=True))
    state_after = backend.optimizer.state[first]
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert all(p.grad is None for p in backend.module.parameters())


def test_config_changes_name_math_keys_only() -> None:
    saved = {"train": {"seq_len": 256, "log_every": 10}, "optim": {"lr": 1e-3}, "run": {"name": "a"}}
    current = {"train": {"seq_len": 128, "log_every": 1}, "optim": {"lr": 1e-3}, "run": {"name": "b"}}
    assert checkpoint.config_changes(saved, current) == ["train.seq_len: 256 -> 128"]
