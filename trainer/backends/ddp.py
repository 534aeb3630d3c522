"""PyTorch DDP (or a single process): the loop's backward and optimizer step, done by hand."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.backends import Backend
from trainer.config import Config, Precision
from trainer.config import DDPBackend as DDPConfig
from trainer.distributed import DistInfo
from trainer.models import build_optimizer, causal_lm_loss


class DDPBackend(Backend):
    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo) -> None:
        assert isinstance(cfg.backend, DDPConfig)
        self.device = info.device
        self.module = model.to(info.device)
        self.optimizer = build_optimizer(self.module, cfg.optim, info.device)
        self.max_grad_norm = cfg.train.max_grad_norm
        self.dtype = torch.bfloat16 if cfg.train.precision == Precision.bf16 else None
        # Each rank backpropagates its share of the step's token mean: DDP averages over ranks, and
        # the micro-batches of one step add up, so the gradient is that of the global token mean.
        t = cfg.train
        self.loss_scale = 1.0 / (t.grad_accum_steps * t.micro_batch_size * t.seq_len)
        network: nn.Module = torch.compile(self.module) if t.compile else self.module  # type: ignore[assignment]
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
        self.network = network

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, batch: torch.Tensor, last: bool) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        # Gradients are all-reduced only on the step's last micro-batch.
        sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
        with sync:
            with self._autocast():
                loss = causal_lm_loss(self.network, batch)
            (loss * self.loss_scale).backward()
        return loss.detach()

    def optimizer_step(self) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        try:
            with self._autocast():
                return causal_lm_loss(self.module, batch.to(self.device, non_blocking=True))
        finally:
            self.module.train()

    def lrs(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
