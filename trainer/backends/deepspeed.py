"""DeepSpeed's engine behind the loop's seam: ZeRO stages 0-3, optional CPU offload.

The engine owns backward, gradient reduction, clipping and the optimizer step. ramp keeps the rest:

- **The LR.** The loop sets it on the optimizer's parameter groups before the step's
  ``engine.step()``; no scheduler is handed to ``deepspeed.initialize``, so the engine advances
  nothing but the weights and the schedule has exactly one owner, whatever the accumulation.
- **The accumulation boundary.** Set from the loop's ``last`` flag before every micro-batch
  (:meth:`DeepSpeedBackend.accumulate`), so the engine's micro-step counter can never drift from
  ramp's micro-batches (a skipped step included).
- **The loss.** Each micro-batch backpropagates its share of the step's token-weighted mean, exactly
  as with DDP; ``engine.backward(scale_wrt_gas=False)`` keeps DeepSpeed from dividing it again.
- **Batch sizes, clipping, precision.** Built from ``train.*`` (a ``train.batch_schedule`` then changes
  the batch through ``engine.set_train_batch_size``); ``backend.extra`` may add any other
  DeepSpeed key, never one of these (``DeepSpeedBackend.check`` in :mod:`trainer.config`).
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
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer import checkpoint, distributed
from trainer.backends import AppliedLRs, Backend
from trainer.config import Config, Offload, Precision
from trainer.config import DeepSpeedBackend as DeepSpeedConfig
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.models import build_optimizer, param_groups

if TYPE_CHECKING:
    from trainer.resume import CheckpointMeta

TAG = "deepspeed"
"""The engine's checkpoint tag: its files go to ``step_<N>/deepspeed/``. ramp's own ``latest``
pointer is the only one (``save_latest=False``)."""


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict: ramp's keys, then ``backend.extra`` (checked by its schema)."""
    b, t = cfg.backend, cfg.train
    assert isinstance(b, DeepSpeedConfig)
    first = cfg.batching(world_size)  # the first step's batch; train.batch_schedule may change it later
    zero: dict[str, Any] = {"stage": b.zero_stage}
    if b.offload_optimizer != Offload.none:
        zero["offload_optimizer"] = {"device": b.offload_optimizer.value}
    if b.offload_params != Offload.none:
        zero["offload_param"] = {"device": b.offload_params.value}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": first.grad_accum(1),
        "train_batch_size": first.batch_of(1),
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


def check_device(cfg: Config) -> None:
    """What only the device can tell: DeepSpeed supports fp16 on a GPU, not on the CPU.

    Raises:
        ConfigError: ``backend.extra.fp16.enabled=true`` without CUDA.
    """
    assert isinstance(cfg.backend, DeepSpeedConfig)
    if cfg.backend.fp16() and not torch.cuda.is_available():
        raise ConfigError(
            "backend.extra.fp16.enabled=true: DeepSpeed does not support fp16 on the CPU ('Type fp16 is "
            "not supported on your device'); use train.precision=bf16 or fp32"
        )


class DeepSpeedBackend(Backend):
    """DeepSpeed's engine with ZeRO 0-3: it owns gradient reduction, backward, clipping and the step."""

    name = "deepspeed"

    def __init__(self, cfg: Config, model: nn.Module, info: DistInfo) -> None:
        assert isinstance(cfg.backend, DeepSpeedConfig)
        check_device(cfg)
        deepspeed = import_deepspeed(info.device)
        distributed.ensure_process_group()
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))  # DeepSpeed asserts it; torchrun sets it
        self.zero_stage = cfg.backend.zero_stage
        self.precision = cfg.train.precision.value
        optimizer = _build_optimizer(cfg, model, info.device)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size)
        )
        assert self.engine.lr_scheduler is None, "no scheduler may be handed to DeepSpeed's engine"
        self.module = self.engine.module
        self.model = self.engine
        self.probe = AppliedLRs(self.engine.basic_optimizer)  # the torch optimizer the engine steps
        # Any wrapper (ZeRO, bf16, fp16) checks the norm inside engine.step(); the bare torch
        # optimizer (ZeRO 0 in fp32) does not, so ramp checks before calling it.
        self.engine_checks_norm = self.engine.optimizer is not self.engine.basic_optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups of the optimizer the engine steps (its ZeRO wrapper's, which it copies from)."""
        return self.engine.optimizer.param_groups

    @property
    def applied_lrs(self) -> dict[str, float]:
        """Read by the pre-step hook on the torch optimizer inside the engine."""
        return self.probe.read()

    def accumulate(self, last: bool) -> AbstractContextManager[Any]:
        """Tell the engine whether this micro-batch ends the step: it reduces gradients only then."""
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def set_global_batch(self, global_batch: int) -> None:
        """``engine.set_train_batch_size``: DeepSpeed's supported way to change the accumulation count
        (the micro-batch stays; its config's batch and accumulation follow the batch schedule)."""
        self.engine.set_train_batch_size(global_batch)

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward`` without DeepSpeed's own division by the accumulation count."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, hold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``engine.step()`` (clip, step), unless the norm of the reduced gradients is not finite or
        ``hold`` is set. The engine decides on the host: this reads the outcome back every step."""
        if hold is not None and bool(hold):
            self.engine.zero_grad()
            return torch.tensor(float("nan")), torch.tensor(False)
        if not self.engine_checks_norm:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            # The gradients are all-reduced by now: every rank reaches the same answer without talking.
            norm = torch.nn.utils.get_total_norm(grads, foreach=True)
            if not bool(torch.isfinite(norm)):
                self.engine.zero_grad()
                return norm.detach(), torch.tensor(False)
            self.engine.step()  # DeepSpeed clips (train.max_grad_norm) and steps
            return norm.detach(), torch.tensor(True)
        self.engine.step()
        reported = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float(reported) if reported is not None else float("nan"))
        return norm, torch.tensor(bool(self.engine.was_step_applied()))

    def save(self, folder: Path, info: DistInfo, background: bool = False) -> None:
        """The engine's files under ``deepspeed/``; every rank writes its shards (never in the background:
        train.ckpt_async is refused with DeepSpeed)."""
        # ramp's own state is in meta.json and rank_<r>.pt, so the engine's client state stays empty.
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False)
        checkpoint.fsync_tree(folder)  # DeepSpeed writes without flushing; the atomic rename needs it

    def load(self, folder: Path, meta: CheckpointMeta, info: DistInfo) -> None:
        """The engine's files, every ``torch.load`` inside forced to ``weights_only=True``.

        Raises:
            ConfigError: another ZeRO stage, or shards for another rank count.
            RuntimeError: DeepSpeed found no checkpoint to load in the folder.
        """
        check_resumable(folder, meta, self.zero_stage, info.world_size, self.precision)
        with weights_only_loads():
            loaded, _ = self.engine.load_checkpoint(
                str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {folder / TAG}")


def check_resumable(
    folder: Path, meta: CheckpointMeta, zero_stage: int, world_size: int, precision: str = "fp32"
) -> None:
    """A DeepSpeed checkpoint resumes with the stage, the precision (DeepSpeed's bf16 mode keeps its own
    optimizer state) and, when sharded, the rank count that wrote it.

    Raises:
        ConfigError: naming the setting to resume it with.
    """
    if not (folder / TAG).is_dir():
        raise ConfigError(
            f"run.resume: {folder} holds no {TAG}/ folder; resume it with backend={meta.backend}"
        )
    saved_stage = meta.config.get("backend", {}).get("zero_stage")
    if saved_stage != zero_stage:
        raise ConfigError(
            f"run.resume: {folder} was written with backend.zero_stage={saved_stage}; resume it with "
            f"backend.zero_stage={saved_stage}"
        )
    saved_precision = meta.config.get("train", {}).get("precision")
    if saved_precision != precision:
        raise ConfigError(
            f"run.resume: {folder} was written with train.precision={saved_precision}, whose DeepSpeed "
            f"optimizer state does not convert; resume it with train.precision={saved_precision}"
        )
    sharded = any((folder / TAG).glob("*zero_pp_rank_*"))
    if sharded and meta.world_size != world_size:
        raise ConfigError(
            f"run.resume: {folder} holds DeepSpeed shards for {meta.world_size} ranks; resume it on "
            f"{meta.world_size} ranks (ramp does not re-split them across {world_size})"
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
