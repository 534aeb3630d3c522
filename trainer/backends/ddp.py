"""PyTorch DDP (or a single process): the loop's backward and optimizer step, done by hand."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.backends import Backend, group_lrs, to_device
from trainer.checkpoint import torch_save_durably
from trainer.config import Config, ConfigError, Precision
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
        batch = to_device(batch, self.device)
        # Gradients are all-reduced only on the step's last micro-batch.
        sync = contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync()
        with sync:
            with self._autocast():
                loss = causal_lm_loss(self.network, batch)
            (loss * self.loss_scale).backward()
        return loss.detach()

    def optimizer_step(self) -> tuple[torch.Tensor, bool]:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        # note: a host-device sync, the price of never applying a non-finite update. The norm is of
        # the all-reduced gradients, so every rank reaches the same answer without talking.
        finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), finite

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        try:
            with self._autocast():
                return causal_lm_loss(self.module, to_device(batch, self.device))
        finally:
            self.module.train()

    def lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer.param_groups)

    def save(self, folder: Path, info: DistInfo) -> None:
        # DDP keeps identical replicas: one copy, from global rank 0.
        if info.is_main:
            torch_save_durably(self.module.state_dict(), folder / "model.pt")
            torch_save_durably(self.optimizer.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path, info: DistInfo) -> None:
        if not (folder / "model.pt").is_file():
            raise ConfigError(
                f"run.resume: {folder} holds no model.pt (written by another backend); resume it with the "
                "backend.name its meta.json records"
            )
        model = torch.load(folder / "model.pt", weights_only=True, map_location=self.device)
        self.module.load_state_dict(model)
        optimizer = torch.load(folder / "optimizer.pt", weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(optimizer)
