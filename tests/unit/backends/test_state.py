"""Checkpoint state of DDP and FSDP2 (trainer.backends.state): ramp's first format (model.pt, before DCP)
still resumes DDP exactly, and FSDP2 refuses it in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import (
    checkpoint_weights,
    one_step,
    random_batch,
    save_format_1_checkpoint,
    tiny_backend,
)
from trainer import resume
from trainer.backends.ddp import DDPBackend
from trainer.config import Config, compose
from trainer.data.sampler import WindowSampler
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.loop import IntervalMeter
from trainer.testing import run_distributed


def params(backend: DDPBackend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.module.parameters()]


def test_a_format_1_checkpoint_restores_weights_and_optimizer_exactly(
    tmp_path: Path, small_config: Callable[..., Config], ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    one_step(ddp_backend, random_batch(1))
    one_step(ddp_backend, random_batch(2))
    path = save_format_1_checkpoint(tmp_path, 2, ddp_backend)
    saved_weights = {k: v.clone() for k, v in ddp_backend.module.state_dict().items()}
    saved_moments = [
        {k: v.clone() for k, v in s.items()} for s in ddp_backend.optimizer.state_dict()["state"].values()
    ]
    one_step(ddp_backend, random_batch(3))
    expected = params(ddp_backend)
    assert resume.problem(path) is None  # its checksums hold
    assert resume.read_meta(path).format == 1

    restored = tiny_backend(small_config(), alone)  # fresh weights and an empty optimizer
    sampler = WindowSampler(np.arange(1000, dtype=np.uint16), 8, 2, 0, 1, seed=0)
    meter = IntervalMeter(alone.device)
    resume.restore(
        resume.Start(path, resume.read_meta(path)), alone, restored, sampler, meter, compose().optim
    )
    weights = restored.module.state_dict()
    assert set(weights) == set(saved_weights)
    assert all(torch.equal(weights[k], v) for k, v in saved_weights.items())
    moments = list(restored.optimizer.state_dict()["state"].values())
    assert len(moments) == len(saved_moments) > 0
    for mine, theirs in zip(moments, saved_moments, strict=True):
        assert set(mine) == set(theirs)
        assert all(torch.equal(mine[k], v) for k, v in theirs.items())
    assert sampler.state_dict() == {"epoch": 0, "position": 2}
    assert meter.state_dict()["steps"] == 2
    one_step(restored, random_batch(3))  # the same next step, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(params(restored), expected, strict=True))
    # Export and init.weights read the same weights from it.
    exported = checkpoint_weights(path)
    assert all(torch.equal(exported[k], v) for k, v in saved_weights.items())


def _load_with_fsdp(info: DistInfo, folder: str) -> str:
    backend = tiny_backend(compose(["backend=fsdp", "train.seq_len=32", "train.micro_batch_size=2"]), info)
    before = [p.full_tensor().clone() for p in backend.module.parameters()]
    try:
        backend.load(Path(folder), resume.read_meta(Path(folder)), info)
    except ConfigError as err:
        untouched = all(
            torch.equal(a, p.full_tensor()) for a, p in zip(before, backend.module.parameters(), strict=True)
        )
        return f"{err}" if untouched else "weights changed"
    return "loaded"


def test_fsdp_refuses_a_format_1_checkpoint_in_one_line(tmp_path: Path, ddp_backend: DDPBackend) -> None:
    path = save_format_1_checkpoint(tmp_path, 1, ddp_backend)
    messages = run_distributed(_load_with_fsdp, str(path), world_size=2)
    assert messages[0] == messages[1]
    assert messages[0] == (
        f"checkpoint {path} is a DDP checkpoint of ramp's first format (model.pt); resume it with backend=ddp, "
        "which then saves in the new format"
    )


def test_a_folder_without_dcp_or_model_pt_is_refused_naming_the_backend(
    tmp_path: Path, ddp_backend: DDPBackend, alone: DistInfo
) -> None:
    path = save_format_1_checkpoint(tmp_path, 1, ddp_backend)
    (path / "model.pt").unlink()
    with pytest.raises(
        ConfigError, match=r"holds no dcp/ folder .* resume it with the backend that wrote it"
    ):
        ddp_backend.load(path, resume.read_meta(path), alone)
