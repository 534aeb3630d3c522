"""What DDP and FSDP2 share: ramp's own clipping and AdamW step, and DCP checkpoints of both.

The loop writes each step's LR into :attr:`TorchStepBackend.param_groups`; :meth:`TorchStepBackend.step`
clips by the global gradient norm and steps torch's AdamW unless the norm is not finite. The gradients
are DDP's all-reduced tensors or FSDP2's reduce-scattered DTensor shards: ``clip_grad_norm_`` over
DTensors sums each shard's partial norm over the ranks (torch 2.13, ``torch.nn.utils.clip_grad_norm_``),
so every rank holds the full gradient's norm and decides alike.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.backends import AppliedLRs, Backend, state
from trainer.distributed import DistInfo

if TYPE_CHECKING:
    from trainer.resume import CheckpointMeta


class TorchStepBackend(Backend):
    """A backend whose torch optimizer ramp steps itself (DDP, FSDP2); subclasses build the model, the
    optimizer and then call :meth:`adopt`."""

    device: torch.device
    optimizer: torch.optim.Optimizer
    max_grad_norm: float

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Take ``optimizer`` as the one that steps: its LRs recorded as it reads them, and whether it can drop
        a non-finite update on the device (the fused AdamW, told ``found_inf``, as under GradScaler)."""
        self.optimizer = optimizer
        self.probe = AppliedLRs(optimizer)
        self.on_device = bool(optimizer.defaults.get("fused"))
        self.background: state.BackgroundSaves | None = None
        """Built by the first background save (collective: every rank saves)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The AdamW groups (decay, no_decay and optim.groups')."""
        return self.optimizer.param_groups

    @property
    def applied_lrs(self) -> dict[str, float]:
        """Read by the pre-step hook on the AdamW optimizer."""
        return self.probe.read()

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``: the reduction averages over ranks, micro-batches of one step add up."""
        loss.backward()

    def step(self, hold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (``train.max_grad_norm``) by the global gradient norm, step AdamW unless it is not finite or
        ``hold`` is set, zero the gradients. The outcome is computed on the gradients' device (the CPU with
        FSDP2's CPU offload, where the optimizer steps too) and returned on the training device."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
        applied = torch.isfinite(norm) if hold is None else torch.isfinite(norm) & ~hold.to(norm.device)
        if self.on_device:
            self.optimizer.found_inf = (~applied).float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif bool(applied):  # note: a host-device sync, for an optimizer that cannot drop an update itself
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach().to(self.device), applied.to(self.device)

    def save(self, folder: Path, info: DistInfo, background: bool = False) -> Future[Any] | None:
        """Weights and AdamW state into ``folder/dcp``, every rank its part (see :mod:`trainer.backends.state`)."""
        if background and self.background is None:
            self.background = state.BackgroundSaves(info)
        return state.save(self.module, self.optimizer, folder, info, self.background if background else None)

    def load(self, folder: Path, meta: CheckpointMeta, info: DistInfo) -> None:
        """Weights and AdamW state, saved on any number of ranks, resharded for these (or a format-1
        ``model.pt`` with DDP).

        Raises:
            ConfigError: a checkpoint without DCP state (another backend's), or a format-1 one with FSDP2.
        """
        state.load(self.module, self.optimizer, folder, info)
