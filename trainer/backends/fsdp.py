"""PyTorch FSDP2 behind the loop's seam: ``fully_shard`` on every decoder block, then on the whole model.

Each rank holds a shard of every parameter (a DTensor), of its gradient and of its AdamW state; a block's
parameters are all-gathered for its forward and backward, and its gradients reduce-scattered. As with
DDP, the loop owns the forward pass, the loss and the LR, and this backend owns the rest:

- **Blocks.** The decoder blocks are found generically, by the classes a transformers model names in
  ``_no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``, ...): the modules accelerate wraps too.
- **Precision.** ``train.precision=bf16`` is FSDP2's ``MixedPrecisionPolicy``: bf16 parameters in the
  forward and backward, fp32 gradient reduction, fp32 sharded master weights and AdamW state.
- **Accumulation.** Gradients reduce-scatter on a step's last micro-batch only
  (``set_requires_gradient_sync``), or after every one with ``backend.reduce_every_micro_batch``.
- **Clipping.** ``clip_grad_norm_`` over the DTensor gradients gives the norm of the full gradient
  (a partial sum per shard, all-reduced); every rank decides alike whether the update applies.
- **HSDP.** ``backend.shard_group_size`` builds a 2-D device mesh (replicate, shard): parameters are
  sharded within a group and the groups are replicas whose gradients are all-reduced.
- **Checkpoints.** DCP (:mod:`trainer.backends.state`): every rank writes its shards, and a checkpoint
  loads on any number of ranks.

Source: torch 2.13's ``torch.distributed.fsdp.fully_shard`` and its documentation; torchtitan's
``apply_fsdp`` (``torchtitan/models/llama3/infra/parallelize.py``) for the per-block wrapping.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from trainer import distributed
from trainer.backends.torch_step import TorchStepBackend
from trainer.config import Config, Precision
from trainer.config import FSDPBackend as FSDPConfig
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.models import build_optimizer

if TYPE_CHECKING:
    pass


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks, in order: the modules whose class ``model._no_split_modules`` names
    (transformers' list of what must not be split across devices).

    Raises:
        ConfigError: the model names no such class, or none of its modules is one.
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"backend=fsdp finds no decoder blocks in {type(model).__name__} (its _no_split_modules names "
            f"{sorted(names) or 'none'}); use backend=ddp or backend=deepspeed for this model"
        )
    return blocks


def device_mesh(cfg: FSDPConfig, info: DistInfo) -> DeviceMesh:
    """A 1-D mesh over all ranks, or with ``backend.shard_group_size`` a 2-D (replicate, shard) one.

    Raises:
        ConfigError: a shard group size that does not divide the world size.
    """
    size = cfg.shard_group_size or info.world_size
    if info.world_size % size:
        raise ConfigError(
            f"backend.shard_group_size={size} does not divide the {info.world_size} ranks; use a divisor "
            "(e.g. the GPUs of one node) or null"
        )
    if size == info.world_size:
        return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("shard",))
    shape = (info.world_size // size, size)
    return init_device_mesh(info.device.type, shape, mesh_dim_names=("replicate", "shard"))


class FSDPBackend(TorchStepBackend):
    """FSDP2 across the ranks (gloo on CPU, nccl on GPU); works alone too (a mesh of one rank)."""

    name = "fsdp"

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo) -> None:
        assert isinstance(cfg.backend, FSDPConfig)
        b = cfg.backend
        if b.cpu_offload and info.device.type != "cuda":
            raise ConfigError("backend.cpu_offload=true moves state off a GPU, and there is none; remove it")
        distributed.ensure_process_group(info.device)
        self.device = info.device
        self.max_grad_norm = cfg.train.max_grad_norm
        self.reduce_every_micro_batch = b.reduce_every_micro_batch
        bf16 = cfg.train.precision == Precision.bf16
        options: dict[str, Any] = {
            "mesh": device_mesh(b, info),
            "reshard_after_forward": b.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy(),
        }
        if b.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy()
        blocks = decoder_blocks(model)
        if not b.cpu_offload:
            model.to(info.device)
        for block in blocks:
            if cfg.train.compile:
                block.compile()  # in place: parameter names (and so checkpoints) stay the same
            fully_shard(block, **options)
        fully_shard(model, **options)
        assert isinstance(model, FSDPModule)
        self.fsdp: FSDPModule = model
        self.module = self.model = model
        self.adopt(build_optimizer(model, cfg.optim, torch.device("cpu") if b.cpu_offload else info.device))

    def accumulate(self, last: bool) -> AbstractContextManager[Any]:
        """Gradients reduce-scatter on ``last`` (or on every micro-batch, backend.reduce_every_micro_batch)."""
        self.fsdp.set_requires_gradient_sync(last or self.reduce_every_micro_batch)
        return contextlib.nullcontext()
