"""Run under torchrun with 2 ranks: the same short training through DDP and FSDP2 (and HSDP).

Every configuration runs in this one job (torchrun's start-up is paid once), through ramp's real loop,
data, schedule, recorder and checkpoints (every 2 steps); each writes ``<root>/<name>/metrics.jsonl``
and ``<root>/<name>/checkpoints/step_<N>``; rank 0 writes ``<root>/report.json``: for each FSDP2 run, the
device mesh, the placements and how much of the model this rank holds (its shards), and the modules
``fully_shard`` wrapped. Runs are named ``<backend>-<model>-accum<A>``; ``hsdp`` is
backend=fsdp with backend.shard_group_size=1 (2 replicas of a 1-rank shard group); ``-async`` saves in the background
(train.ckpt_async).

Usage: fsdp_parity.py ROOT.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from trainer import distributed
from trainer.backends import build_backend
from trainer.config import compose
from trainer.data import build_data
from trainer.distributed import DistInfo
from trainer.loop import Trainer, TrainState
from trainer.models import build_model
from trainer.observe import Recorder
from trainer.preemption import StopSignal

MAX_STEPS = 6
COMMON = [
    f"train.max_steps={MAX_STEPS}",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_steps=1",
    "train.ckpt_every=2",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "schedule=cosine",
    "schedule.warmup_steps=2",
    "train.max_grad_norm=1.0",
    "logger.wandb.mode=disabled",
    "logger.progress=off",
]
"""Shared by every run here, and by the runs the tests resume from these checkpoints."""
BACKENDS = {
    "ddp": ["backend=ddp"],
    "fsdp": ["backend=fsdp"],
    "hsdp": ["backend=fsdp", "backend.shard_group_size=1"],
}
RUNS = [
    (
        f"{backend}-{model}-accum{accum}",
        [*BACKENDS[backend], f"model={model}", f"train.grad_accum_steps={accum}"],
    )
    for model in ("gpt2-tiny", "llama-tiny")
    for accum in (1, 3)
    for backend in ("ddp", "fsdp")
]
RUNS.append(("hsdp-gpt2-tiny-accum1", [*BACKENDS["hsdp"], "model=gpt2-tiny", "train.grad_accum_steps=1"]))
RUNS.append(
    (
        "fsdp-gpt2-tiny-accum1-async",
        ["backend=fsdp", "model=gpt2-tiny", "train.grad_accum_steps=1", "train.ckpt_async=true"],
    )
)


def sharding(model: nn.Module) -> dict[str, Any]:
    """How ``fully_shard`` laid ``model`` out on this rank: its mesh, placements and share of the weights."""
    params = list(model.parameters())
    first: Any = params[0]
    if not hasattr(first, "device_mesh"):
        return {}
    return {
        "mesh_shape": list(first.device_mesh.shape),
        "mesh_dims": list(first.device_mesh.mesh_dim_names),
        "placements": [str(p) for p in first.placements],
        "local_numel": sum(p.to_local().numel() for p in params),  # type: ignore[attr-defined]
        "numel": sum(p.numel() for p in params),
        "wrapped": [type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)],
    }


def train(root: Path, name: str, overrides: list[str], info: DistInfo) -> dict[str, Any]:
    """Train one configuration through ramp's loop into ``root/name``, as trainer.main builds it; its
    sharding (:func:`sharding`)."""
    run_dir = root / name
    cfg = compose([*COMMON, *overrides, f"run.dir={run_dir}"])
    if info.is_main:
        run_dir.mkdir(parents=True)
    distributed.barrier(info)
    data = build_data(cfg, info)
    schedule = cfg.schedule_for(info.world_size, data.train.num_samples)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tokenizer_vocab=data.vocab_size, eos_id=data.eos_id)
    backend = build_backend(cfg, model, info)
    report = sharding(backend.module)
    torch.manual_seed(cfg.train.seed + info.rank)
    recorder = Recorder(info.is_main, run_dir, {"run": {"name": name}}, cfg.logger, MAX_STEPS, start_step=0)
    trainer = Trainer(cfg, info, backend, data, schedule, run_dir, cfg.to_dict())
    trainer.fit(TrainState(), StopSignal(info), recorder)
    recorder.close()
    del trainer, backend, model
    gc.collect()
    return report


def main() -> None:
    """Every run of :data:`RUNS` (or those named after ROOT) in turn, on this job's ranks."""
    root = Path(sys.argv[1])
    wanted = set(sys.argv[2:])
    info = distributed.setup()
    report = {name: train(root, name, o, info) for name, o in RUNS if not wanted or name in wanted}
    if info.is_main:
        (root / "report.json").write_text(json.dumps(report))
    distributed.teardown()


if __name__ == "__main__":
    main()
