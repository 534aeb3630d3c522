"""DeepSpeed's engine behind the loop's seam: ZeRO stages 0-3, optional CPU offload.

The engine owns backward, gradient reduction, clipping and the optimizer step. ramp keeps the rest:

- **The LR.** The loop sets it on the optimizer's parameter groups before the step's
  ``engine.step()``; no scheduler is handed to ``deepspeed.initialize``, so the engine advances
  nothing but the weights and the schedule has exactly one owner, whatever the accumulation.
- **The accumulation boundary.** Set from the loop's ``last`` flag before every micro-batch, so the
  engine's micro-step counter can never drift from ramp's micro-batches (a skipped step included).
- **The loss.** Each micro-batch backpropagates its share of the step's token-weighted mean, exactly
  as with DDP; ``engine.backward(scale_wrt_gas=False)`` keeps DeepSpeed from dividing it again.
- **Batch sizes, clipping, precision.** Built from ``train.*``; ``backend.extra`` may add any other
  DeepSpeed key, never one of these (:func:`check_config`).
- **Non-finite updates.** With ZeRO 1-3, bf16 or fp16, DeepSpeed's optimizer wrapper computes the
  global norm of the reduced gradients inside ``engine.step()`` and skips the update itself when it
  is NaN or infinite (the norm then reads inf); ramp reads ``engine.was_step_applied()``. ZeRO 0 in
  fp32 hands the bare torch optimizer to ``engine.step()``, which never looks at the norm, so there
  ramp computes the norm of the all-reduced gradients first and does not call ``engine.step()`` at all.

deepspeed is imported only when this backend is built, so DDP start-up does not pay for it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from trainer import checkpoint, distributed
from trainer.backends import Backend, group_lrs, to_device
from trainer.config import Config, ConfigError, Offload, OnNan, Precision
from trainer.config import DeepSpeedBackend as DeepSpeedConfig
from trainer.distributed import DistInfo
from trainer.models import build_optimizer, causal_lm_loss, param_groups

TAG = "deepspeed"
"""The engine's checkpoint tag: its files go to ``step_<N>/deepspeed/``. ramp's own ``latest``
pointer is the only one (``save_latest=False``)."""

OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.grad_accum_steps x ranks",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "train.precision",
    "bfloat16": "train.precision",
    "torch_autocast": "train.precision",
    "amp": "train.precision",
    "optimizer": "optim.*",
    "scheduler": "schedule.* (ramp's schedule is the only one that sets the LR)",
    "zero_optimization.stage": "backend.zero_stage",
    "zero_optimization.offload_optimizer": "backend.offload_optimizer",
    "zero_optimization.offload_param": "backend.offload_params",
    "zero_optimization.cpu_offload": "backend.offload_optimizer",
    "zero_optimization.cpu_offload_params": "backend.offload_params",
    "zero_optimization.compute_grad_norm": "train.on_nan (the norm decides whether an update is applied)",
}
"""DeepSpeed keys ramp sets from its own: one source of truth, so backend.extra may not set them."""


def _flat_keys(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_keys(value, f"{prefix}{key}.")


def _fp16_requested(extra: dict[str, Any]) -> bool:
    fp16 = extra.get("fp16")
    return isinstance(fp16, dict) and bool(fp16.get("enabled", False))


def check_config(cfg: Config) -> None:
    """Refuse what DeepSpeed would refuse later, or what would set one thing in two places."""
    b = cfg.backend
    assert isinstance(b, DeepSpeedConfig)
    if b.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"backend.zero_stage={b.zero_stage} must be 0, 1, 2 or 3")
    if b.offload_params != Offload.none and b.zero_stage != 3:
        raise ConfigError(
            f"backend.offload_params={b.offload_params.value} needs ZeRO 3 (only it partitions parameters); "
            "set backend.zero_stage=3 or backend.offload_params=none"
        )
    if b.offload_optimizer != Offload.none and b.zero_stage == 0:
        raise ConfigError(
            f"backend.offload_optimizer={b.offload_optimizer.value} needs ZeRO 1, 2 or 3; "
            "set backend.zero_stage=1 (or higher) or backend.offload_optimizer=none"
        )
    if cfg.train.compile:
        raise ConfigError(
            "train.compile=true is not supported with backend=deepspeed; set train.compile=false"
        )
    extra = dict(b.extra)
    for key in _flat_keys(extra):
        if key in OWNED_KEYS:
            raise ConfigError(
                f"backend.extra.{key} is set by ramp from {OWNED_KEYS[key]}; remove it from backend.extra "
                "and set that instead"
            )
    if _fp16_requested(extra):
        if not torch.cuda.is_available():
            raise ConfigError(
                "backend.extra.fp16.enabled=true: DeepSpeed does not support fp16 on the CPU ('Type fp16 is "
                "not supported on your device'); use train.precision=bf16 or fp32"
            )
        if cfg.train.precision != Precision.fp32:
            raise ConfigError(
                f"backend.extra.fp16.enabled=true conflicts with train.precision={cfg.train.precision.value}; "
                "set train.precision=fp32 to train in fp16"
            )
        if cfg.train.on_nan == OnNan.halt:
            raise ConfigError(
                "backend.extra.fp16.enabled=true with train.on_nan=halt: fp16's dynamic loss scaling overflows "
                "and skips steps by design while it calibrates; set train.on_nan=skip"
            )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: ramp's keys, then backend.extra (checked by :func:`check_config`)."""
    b, t = cfg.backend, cfg.train
    assert isinstance(b, DeepSpeedConfig)
    zero: dict[str, Any] = {"stage": b.zero_stage}
    if b.offload_optimizer != Offload.none:
        zero["offload_optimizer"] = {"device": b.offload_optimizer.value}
    if b.offload_params != Offload.none:
        zero["offload_param"] = {"device": b.offload_params.value}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
    }
    if t.precision == Precision.bf16:
        # check_grad_overflow: DeepSpeed skips a bf16 update whose norm is not finite (train.on_nan).
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    return _merge(config, dict(b.extra))


def import_deepspeed(device: torch.device) -> ModuleType:
    """Import deepspeed on ramp's device, without the op build and the log lines ramp does not need."""
    # ramp has already chosen the device; saying so spares DeepSpeed's detection and its warning.
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    import deepspeed
    import deepspeed.ops

    # DeepSpeed compiles a shared-memory all-reduce op when its comm backend starts (about 30 s on
    # first use on this kind of machine). Only inference all-reduce (tensor-parallel inference) uses
    # it; training never does, so it is marked unavailable instead of built. Reading the table probes
    # every op once, and setuptools echoes each probe's compiler command at INFO: keep that quiet.
    compiler_log = logging.getLogger("compilers")
    level = compiler_log.level
    compiler_log.setLevel(logging.WARNING)
    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    finally:
        compiler_log.setLevel(level)
    # DeepSpeed's logger prints on every rank through its own handler; route it through ramp's
    # (rank 0 only for information; warnings and errors from any rank, tagged).
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.handlers.clear()
    ds_logger.propagate = True
    ds_logger.setLevel(logging.WARNING)
    # Raised inside DeepSpeed's own collectives; nothing a user can act on.
    warnings.filterwarnings(
        "ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning
    )
    return deepspeed


def _safe_globals() -> list[Any]:
    """The few DeepSpeed classes its checkpoints pickle: plain records, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True, whatever DeepSpeed's code asks for.

    DeepSpeed loads its checkpoints with ``weights_only=False``, which can execute code from a crafted
    file. torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides that per call, and only the classes in
    :func:`_safe_globals` are allowed besides tensors and containers.
    """
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """ramp's AdamW (same decay / no-decay groups as DDP); DeepSpeed's CPU Adam when offloading it.

    A torch optimizer needs no compiled op. ZeRO-Offload refuses a torch optimizer (DeepSpeed's
    vectorised CPU Adam is several times faster there), which costs a one-time build (about 50 s).
    """
    assert isinstance(cfg.backend, DeepSpeedConfig)
    if cfg.backend.offload_optimizer == Offload.none:
        return build_optimizer(model, cfg.optim, device)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    o = cfg.optim
    return DeepSpeedCPUAdam(
        param_groups(model, o), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, adamw_mode=True
    )


class DeepSpeedBackend(Backend):
    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo) -> None:
        assert isinstance(cfg.backend, DeepSpeedConfig)
        check_config(cfg)
        deepspeed = import_deepspeed(info.device)
        distributed.ensure_process_group()
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))  # DeepSpeed asserts it; torchrun sets it
        self.device = info.device
        self.zero_stage = cfg.backend.zero_stage
        optimizer = _build_optimizer(cfg, model, info.device)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size)
        )
        assert self.engine.lr_scheduler is None, "no scheduler may be handed to DeepSpeed's engine"
        self.module = self.engine.module
        t = cfg.train
        # As DDP: each rank backpropagates its share of the step's token mean; the engine averages
        # over ranks and the micro-batches of one step add up.
        self.loss_scale = 1.0 / (t.grad_accum_steps * t.micro_batch_size * t.seq_len)
        # Any wrapper (ZeRO, bf16, fp16) checks the norm inside engine.step(); the bare torch
        # optimizer (ZeRO 0 in fp32) does not, so ramp checks before calling it.
        self.engine_checks_norm = self.engine.optimizer is not self.engine.basic_optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, batch: torch.Tensor, last: bool) -> torch.Tensor:
        self.engine.set_gradient_accumulation_boundary(last)
        loss = causal_lm_loss(self.engine, to_device(batch, self.device))
        self.engine.backward(loss * self.loss_scale, scale_wrt_gas=False)
        return loss.detach()

    def optimizer_step(self) -> tuple[torch.Tensor, bool]:
        if not self.engine_checks_norm:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            # The gradients are all-reduced by now: every rank reaches the same answer without talking.
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if not bool(torch.isfinite(norm)):
                self.engine.zero_grad()
                return norm.detach(), False
            self.engine.step()  # DeepSpeed clips (train.max_grad_norm) and steps
            return norm.detach(), True
        self.engine.step()
        reported = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float(reported) if reported is not None else float("nan"))
        return norm, bool(self.engine.was_step_applied())

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        try:
            # The module itself: ZeRO 3's hooks on it gather each layer's parameters as it runs.
            return causal_lm_loss(self.module, to_device(batch, self.device))
        finally:
            self.module.train()

    def lrs(self) -> dict[str, float]:
        return group_lrs(self.engine.optimizer.param_groups)

    def save(self, folder: Path, info: DistInfo) -> None:
        # Collective: every rank writes its shard of the optimizer (and, with ZeRO 3, of the weights).
        # ramp's own state is in meta.json and rank_<r>.pt, so the engine's client state stays empty.
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False)
        checkpoint.fsync_tree(folder)  # DeepSpeed writes without flushing; the atomic rename needs it

    def load(self, folder: Path, info: DistInfo) -> None:
        check_resumable(folder, self.zero_stage, info.world_size)
        with weights_only_loads():
            loaded, _ = self.engine.load_checkpoint(
                str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder / TAG}")


def check_resumable(folder: Path, zero_stage: int, world_size: int) -> None:
    """A DeepSpeed checkpoint resumes with the stage and (when sharded) the rank count that wrote it."""
    meta = json.loads((folder / checkpoint.META).read_text())
    written_by = meta.get("backend", "ddp")
    if written_by != "deepspeed" or not (folder / TAG).is_dir():
        raise ConfigError(
            f"run.resume: {folder} was written by backend={written_by}; resume it with backend={written_by}"
        )
    saved_stage = meta["config"].get("backend", {}).get("zero_stage")
    if saved_stage != zero_stage:
        raise ConfigError(
            f"run.resume: {folder} was written with backend.zero_stage={saved_stage}; resume it with "
            f"backend.zero_stage={saved_stage}"
        )
    sharded = any((folder / TAG).glob("*zero_pp_rank_*"))
    if sharded and meta["world_size"] != world_size:
        raise ConfigError(
            f"run.resume: {folder} holds DeepSpeed shards for {meta['world_size']} ranks; resume it on "
            f"{meta['world_size']} ranks (ramp does not re-split them across {world_size})"
        )


def consolidated_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a DeepSpeed checkpoint, on the CPU, without an engine or ranks.

    ZeRO 1-3 and bf16 keep the fp32 master weights sharded in the optimizer files: DeepSpeed's
    zero_to_fp32 gathers them. ZeRO 0 in fp32 saves the whole module in one file.
    """
    import_deepspeed(torch.device("cpu"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    shards = folder / TAG
    with weights_only_loads():
        if any(shards.glob("*_optim_states.pt")):
            # zero_to_fp32 reports its progress on stdout; the export command prints its own line.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
        else:
            state = torch.load(shards / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}
