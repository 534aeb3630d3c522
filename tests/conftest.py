"""Fixtures shared by the unit and end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_backend
from trainer.backends.ddp import DDPBackend
from trainer.config import Config, compose
from trainer.distributed import DistInfo

SMALL = ("train.seq_len=32", "train.micro_batch_size=2")
"""A batch small enough for in-process tests of the backends and the loop."""


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One token cache for the whole session: the first run builds it, the rest reuse it."""
    return tmp_path_factory.mktemp("ramp-cache")


@pytest.fixture(scope="session")
def alone() -> DistInfo:
    """This process as a job of one rank on the CPU, without a process group."""
    return DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="session")
def small_config() -> Callable[..., Config]:
    """``small_config(*overrides)``: the default config with a tiny batch (:data:`SMALL`), then ``overrides``."""

    def make(*overrides: str) -> Config:
        return compose([*SMALL, *overrides])

    return make


@pytest.fixture
def ddp_backend(small_config: Callable[..., Config], alone: DistInfo) -> DDPBackend:
    """A fresh single-rank DDP backend on the gpt2-tiny model, seeded (the same weights every time)."""
    backend = tiny_backend(small_config(), alone)
    assert isinstance(backend, DDPBackend)
    return backend
