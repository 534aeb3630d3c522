"""The seam between the loop and whoever owns backward and the optimizer step.

The loop drives every backend the same way, once per optimizer step::

    backend.set_lr(lr)                       # the LR this global step trains at
    for i in range(grad_accum_steps):
        backend.micro_step(batch, last=...)  # forward + backward; gradients sync only on the last
    grad_norm, applied = backend.optimizer_step()  # clip, step if finite, zero the gradients

No backend holds an LR scheduler: the loop computes the LR from the global step and hands it over,
so exactly one owner advances the schedule, whatever a backend's engine would otherwise do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import Config, ConfigError
from trainer.distributed import DistInfo


class Backend(ABC):
    module: nn.Module
    """The bare model (not wrapped), for evaluation, saving and export."""

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @abstractmethod
    def micro_step(self, batch: torch.Tensor, last: bool) -> torch.Tensor:
        """Forward and backward one micro-batch; return its summed loss, detached, on the device."""

    @abstractmethod
    def optimizer_step(self) -> tuple[torch.Tensor, bool]:
        """Clip and take the optimizer step, then zero the gradients.

        Returns the pre-clip global gradient norm and whether the update was applied: a non-finite
        norm leaves the weights and optimizer state untouched (the loop then halts or skips).
        """

    @abstractmethod
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Summed loss of a batch without gradients."""

    @abstractmethod
    def lrs(self) -> dict[str, float]:
        """The LR of every parameter group, by group name."""

    @abstractmethod
    def save(self, folder: Path, info: DistInfo) -> None:
        """Write the model and optimizer state into a checkpoint folder (called on every rank)."""

    @abstractmethod
    def load(self, folder: Path, info: DistInfo) -> None:
        """Restore what ``save`` wrote (called on every rank)."""


def group_lrs(param_groups: list[dict[str, Any]]) -> dict[str, float]:
    """Each parameter group's LR, by the group's name."""
    return {group.get("name", str(i)): float(group["lr"]) for i, group in enumerate(param_groups)}


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not block the host: from pinned memory on a GPU."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def build_backend(cfg: Config, model: nn.Module, info: DistInfo) -> Backend:
    if cfg.backend.name == "ddp":
        from trainer.backends.ddp import DDPBackend

        return DDPBackend(cfg, model, info)
    if cfg.backend.name == "deepspeed":
        from trainer.backends.deepspeed import DeepSpeedBackend  # imports deepspeed: only when chosen

        return DeepSpeedBackend(cfg, model, info)
    raise ConfigError(f"backend={cfg.backend.name} is unknown; use backend=ddp or backend=deepspeed")
