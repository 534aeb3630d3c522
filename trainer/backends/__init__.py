"""The seam between the loop and whoever owns gradient sync, backward and the optimizer step.

Cut where Lightning Fabric and torchtitan cut it: the loop owns the forward pass and the loss,
evaluation and the learning rate (written into :attr:`Backend.param_groups` before each step); a
backend owns wrapping the model, gradient synchronisation, backward, clipping and the optimizer
step, and its state in a checkpoint. The loop drives every backend the same way::

    for group in backend.param_groups:
        group["lr"] = lr                                   # the LR this global step trains at
    for i in range(grad_accum_steps):
        with backend.accumulate(last=i == grad_accum_steps - 1):  # gradients sync on the last only
            with backend.autocast():
                loss = causal_lm_loss(backend.model, batch)     # forward and loss
            backend.backward(loss * scale)                      # the step's token mean
    grad_norm, applied = backend.step(hold)                # clip, step if finite, zero the gradients

No backend holds an LR scheduler: exactly one owner (the loop) advances the schedule, whatever an
engine would otherwise do.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from trainer.resume import CheckpointMeta


class Backend(ABC):
    """What the loop asks of DDP, DeepSpeed or FSDP: one small interface, each backend's quirks inside it."""

    name: str
    """``backend.name``: recorded in every checkpoint, which only the same backend resumes."""
    module: nn.Module
    """The bare model (not wrapped): evaluation, saving and export use it."""
    model: nn.Module
    """What the training forward pass calls (the DDP wrapper, the compiled model, the engine)."""
    on_device: bool = False
    """Whether the step needs nothing from the host: the LR may be a device tensor and a non-finite
    update is dropped on the device (``step`` then never reads the norm back). The loop then reads the
    step's outcome only at its sync points; otherwise it reads it after every step."""

    @property
    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the loop writes each step's LR into them."""

    def accumulate(self, last: bool) -> AbstractContextManager[Any]:
        """A context for one micro-batch's forward and backward; gradients sync only when ``last``."""
        return contextlib.nullcontext()

    def set_global_batch(self, global_batch: int) -> None:
        """The global batch (samples) of the steps from now on, before their first micro-batch: called
        when train.batch_schedule changes it. The loop counts the micro-batches itself, so a backend that
        keeps no count of its own has nothing to do."""
        return None

    def autocast(self) -> AbstractContextManager[Any]:
        """A context for the forward pass in the configured precision (none by default)."""
        return contextlib.nullcontext()

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (already scaled to the step's token mean)."""

    @abstractmethod
    def step(self, hold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip and take the optimizer step unless the norm is not finite or ``hold`` is set, then zero
        the gradients.

        Args:
            hold: a bool tensor on the device; True drops the update whatever the norm (a halted run).
                None: never held.

        Returns:
            The pre-clip global gradient norm and whether the update was applied, both tensors on the
            device. A dropped update leaves the weights and the optimizer state untouched.
        """

    @property
    @abstractmethod
    def applied_lrs(self) -> dict[str, float]:
        """The LR of every parameter group, by name, as the optimizer read it in its last step: recorded
        by a pre-step hook on the optimizer that really steps, so a record shows what trained."""

    @abstractmethod
    def save(self, folder: Path, info: DistInfo, background: bool = False) -> Future[Any] | None:
        """Write the model and optimizer state into a checkpoint folder (called on every rank).

        Args:
            background: copy the state to host memory and write it in a background thread
                (``train.ckpt_async``; DDP and FSDP2 only).

        Returns:
            The background write's future, or None when the state is written already.
        """

    @abstractmethod
    def load(self, folder: Path, meta: CheckpointMeta, info: DistInfo) -> None:
        """Restore what ``save`` wrote (called on every rank).

        Raises:
            ConfigError: the checkpoint cannot resume on this backend as configured, saying why.
        """


class AppliedLRs:
    """The LR of each parameter group at the moment ``optimizer.step()`` runs (a step pre-hook).

    What the loop wrote before the step is not proof: the LR that trained is what the optimizer held
    when it stepped, whoever wrapped it (DeepSpeed steps its torch optimizer inside ``engine.step()``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.lrs: dict[str, Any] = {}
        optimizer.register_step_pre_hook(self._record)

    def _record(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Merged, not replaced: ZeRO 1 and 2 step their torch optimizer once per group, showing it one.
        # Kept as given (a device tensor stays one: reading it here would wait for the device).
        self.lrs.update({str(g["name"]): g["lr"] for g in optimizer.param_groups})

    def read(self) -> dict[str, float]:
        """The recorded LRs as numbers (a sync point when they are device tensors)."""
        return {name: float(lr) for name, lr in self.lrs.items()}


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not block the host: from pinned memory on a GPU."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def build_backend(cfg: Config, model: nn.Module, info: DistInfo) -> Backend:
    """Wrap ``model`` in the backend ``backend.name`` names; deepspeed is imported only when chosen.

    Raises:
        ConfigError: an unknown backend, or one the backend refuses on this machine.
    """
    if cfg.backend.name == "ddp":
        from trainer.backends.ddp import DDPBackend

        return DDPBackend(cfg, model, info)
    if cfg.backend.name == "fsdp":
        from trainer.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg, model, info)
    if cfg.backend.name == "deepspeed":
        from trainer.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, model, info)
    raise ConfigError(
        f"backend={cfg.backend.name} is unknown; use backend=ddp, backend=fsdp or backend=deepspeed"
    )
