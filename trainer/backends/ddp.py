"""PyTorch DDP (or a single process): gradient sync, backward, clipping and the AdamW step by hand."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.backends.torch_step import TorchStepBackend
from trainer.config import Config, Precision
from trainer.config import DDPBackend as DDPConfig
from trainer.distributed import DistInfo
from trainer.models import build_optimizer

if TYPE_CHECKING:
    pass


class DDPBackend(TorchStepBackend):
    """DistributedDataParallel across ranks (gloo on CPU, nccl on GPU); the bare model alone."""

    name = "ddp"

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo) -> None:
        assert isinstance(cfg.backend, DDPConfig)
        self.device = info.device
        self.module = model.to(info.device)
        self.adopt(build_optimizer(self.module, cfg.optim, info.device))
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
