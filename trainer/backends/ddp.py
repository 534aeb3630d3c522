"""PyTorch DDP (or a single process): gradient sync, backward, clipping and the AdamW step by hand."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.backends import AppliedLRs, Backend, state
from trainer.config import Config, Precision
from trainer.config import DDPBackend as DDPConfig
from trainer.distributed import DistInfo
from trainer.models import build_optimizer

if TYPE_CHECKING:
    from trainer.resume import CheckpointMeta


class DDPBackend(Backend):
    """DistributedDataParallel across ranks (gloo on CPU, nccl on GPU); the bare model alone."""

    name = "ddp"

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo) -> None:
        assert isinstance(cfg.backend, DDPConfig)
        self.device = info.device
        self.module = model.to(info.device)
        self.optimizer = build_optimizer(self.module, cfg.optim, info.device)
        self.probe = AppliedLRs(self.optimizer)
        # Fused AdamW drops an update on the device when told ``found_inf`` (as under GradScaler):
        # weights, moments and its step count stay as they were, and the host never waits on the norm.
        self.on_device = bool(self.optimizer.defaults.get("fused"))
        self.max_grad_norm = cfg.train.max_grad_norm
        self.dtype = torch.bfloat16 if cfg.train.precision == Precision.bf16 else None
        network: nn.Module = torch.compile(self.module) if cfg.train.compile else self.module  # type: ignore[assignment]
        self.ddp: DistributedDataParallel | None = None
        if info.distributed:
            self.ddp = DistributedDataParallel(
                network,
                device_ids=[info.device.index] if info.device.type == "cuda" else None,
                bucket_cap_mb=cfg.backend.bucket_cap_mb,
                find_unused_parameters=cfg.backend.find_unused_parameters,
                gradient_as_bucket_view=True,
            )
            network = self.ddp
        self.model = network
        self.background: state.BackgroundSaves | None = None
        """Built by the first background save (collective: every rank saves)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The AdamW groups (decay and no_decay)."""
        return self.optimizer.param_groups

    @property
    def applied_lrs(self) -> dict[str, float]:
        """Read by the pre-step hook on the AdamW optimizer."""
        return self.probe.read()

    def accumulate(self, last: bool) -> AbstractContextManager[Any]:
        """DDP's ``no_sync`` on every micro-batch but the step's last, which all-reduces the gradients."""
        if last or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast with ``train.precision=bf16``; weights, gradients and AdamW state stay fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``: DDP averages over ranks, micro-batches of one step add up."""
        loss.backward()

    def step(self, hold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip (``train.max_grad_norm``), step AdamW unless the norm is not finite or ``hold`` is set,
        zero the gradients. The norm is of the all-reduced gradients: every rank decides alike."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        applied = torch.isfinite(norm) if hold is None else torch.isfinite(norm) & ~hold
        if self.on_device:
            self.optimizer.found_inf = (~applied).float()  # type: ignore[attr-defined]
            self.optimizer.step()
        elif bool(applied):  # note: a host-device sync, for an optimizer that cannot drop an update itself
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), applied

    def save(self, folder: Path, info: DistInfo, background: bool = False) -> Future[Any] | None:
        """Weights and AdamW state into ``folder/dcp``, each rank writing a share of the replicated tensors
        (see :mod:`trainer.backends.state`)."""
        if background and self.background is None:
            self.background = state.BackgroundSaves(info)
        return state.save(self.module, self.optimizer, folder, info, self.background if background else None)

    def load(self, folder: Path, meta: CheckpointMeta, info: DistInfo) -> None:
        """Weights and AdamW state, saved on any number of ranks (or a format-1 ``model.pt``)."""
        state.load(self.module, self.optimizer, folder, info)
