"""Run under torchrun with 2 ranks: the same short training through DDP and DeepSpeed ZeRO 0-3.

Every configuration runs in this one job (DeepSpeed's start-up is paid once), through ramp's real
loop, data, schedule and recorder; each writes ``<root>/<name>/metrics.jsonl``. For DeepSpeed runs a
pre-hook on the torch optimizer records the LR of every parameter group each time DeepSpeed really
steps it, which the test compares with ramp's schedule. Then a NaN gradient is injected into ZeRO 0
and ZeRO 3 engines to show that no non-finite update reaches weights or optimizer state.

Usage: deepspeed_parity.py ROOT; rank 0 writes ROOT/report.json.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import torch

from tests.helpers import one_step, random_batch, tiny_backend
from trainer import distributed
from trainer.backends import build_backend
from trainer.config import Config, compose
from trainer.data import build_data
from trainer.loop import Trainer, TrainState
from trainer.models import build_model
from trainer.observe import Recorder
from trainer.preemption import StopSignal

MAX_STEPS = 6
COMMON = [
    f"train.max_steps={MAX_STEPS}",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_steps=2",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "schedule=cosine",
    "schedule.warmup_steps=2",
    "train.max_grad_norm=1.0",
    "logger.wandb.mode=disabled",
    "logger.progress=off",
]
RUNS = [
    (
        f"{backend}-accum{accum}",
        [f"backend={backend.split('-')[0]}", *stage, f"train.grad_accum_steps={accum}"],
    )
    for accum in (1, 3)
    for backend, stage in [
        ("ddp", []),
        *((f"deepspeed-zero{z}", [f"backend.zero_stage={z}"]) for z in (0, 1, 2, 3)),
    ]
]
RUNS += [
    # ZeRO-Offload steps DeepSpeed's CPU Adam (a one-time build) instead of torch's AdamW.
    (
        "deepspeed-zero3-offload-accum3",
        [
            "backend=deepspeed",
            "backend.zero_stage=3",
            "backend.offload_optimizer=cpu",
            "backend.offload_params=cpu",
            "train.grad_accum_steps=3",
        ],
    ),
    ("deepspeed-zero2-bf16-accum1", ["backend=deepspeed", "backend.zero_stage=2", "train.precision=bf16"]),
]


def config(overrides: list[str]) -> Config:
    """The typed config of one run of the job."""
    return compose([*COMMON, *overrides])


def record_applied_lrs(backend: Any, calls: list[dict[str, Any]]) -> None:
    """Note the LR of each group whenever DeepSpeed actually steps the torch optimizer."""
    engine = backend.engine

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        calls.append(
            {
                "step": engine.global_steps + 1,  # DeepSpeed counts the step after the update
                "lrs": {str(g.get("name")): g["lr"] for g in optimizer.param_groups if g["params"]},
            }
        )

    engine.basic_optimizer.register_step_pre_hook(hook)


def train(root: Path, name: str, overrides: list[str], info: Any) -> dict[str, Any]:
    """Train one configuration through ramp's loop into ``root/name``; what the test compares."""
    cfg = config([*overrides, f"run.dir={root / name}"])
    run_dir = root / name
    if info.is_main:
        run_dir.mkdir(parents=True)
    distributed.barrier(info)
    data = build_data(cfg, info)
    torch.manual_seed(cfg.train.seed)
    backend = build_backend(
        cfg, build_model(cfg.model, tokenizer_vocab=data.vocab_size, eos_id=data.eos_id), info
    )
    torch.manual_seed(cfg.train.seed + info.rank)
    schedule = cfg.lr_schedule
    report: dict[str, Any] = {"schedule": [schedule.lr(k) for k in range(1, MAX_STEPS + 1)]}
    calls: list[dict[str, Any]] = []
    if cfg.backend.name == "deepspeed":
        record_applied_lrs(backend, calls)
    recorder = Recorder(info.is_main, run_dir, {"run": {"name": name}}, cfg.logger, MAX_STEPS, start_step=0)
    trainer = Trainer(cfg, info, backend, data, schedule, run_dir, cfg.to_dict())
    trainer.fit(TrainState(), StopSignal(info), recorder)
    recorder.close()
    if cfg.backend.name == "deepspeed":
        engine = backend.engine  # type: ignore[attr-defined]
        report.update(
            applied=calls,
            engine_steps=engine.global_steps,
            engine_scheduler=repr(engine.lr_scheduler),
            client_scheduler=repr(engine.client_lr_scheduler),
            bf16=bool(engine.bfloat16_enabled()),
            weight_dtype=str(next(backend.module.parameters()).dtype),
        )
    del trainer, backend
    gc.collect()
    return report


def full_weights(backend: Any) -> list[torch.Tensor]:
    """Every parameter in full (gathered from the ranks' shards under ZeRO 3)."""
    import deepspeed

    params = list(backend.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=backend.zero_stage == 3):
        return [p.detach().clone() for p in params]


def optimizer_state(backend: Any) -> list[torch.Tensor]:
    state = backend.engine.basic_optimizer.state
    return [v.detach().clone() for s in state.values() for v in s.values() if torch.is_tensor(v)]


def nan_step(stage: int, info: Any) -> dict[str, Any]:
    """One clean step, then a step whose gradients are all NaN: nothing may change."""
    backend: Any = tiny_backend(config(["backend=deepspeed", f"backend.zero_stage={stage}"]), info)
    batch = random_batch(10 + info.rank, width=65)
    clean_norm, clean_applied = one_step(backend, batch)
    weights, moments = full_weights(backend), optimizer_state(backend)
    handle = backend.module.lm_head.register_forward_hook(lambda m, i, out: out * float("nan"))
    norm, applied = one_step(backend, batch)
    handle.remove()
    report = {
        "clean_applied": clean_applied,
        "clean_norm_finite": bool(torch.isfinite(clean_norm)),
        "applied": applied,
        "norm": float(norm),
        "weights_untouched": all(
            torch.equal(a, b) for a, b in zip(weights, full_weights(backend), strict=True)
        ),
        "moments_untouched": bool(moments)
        and all(torch.equal(a, b) for a, b in zip(moments, optimizer_state(backend), strict=True)),
    }
    # The next clean step trains again.
    report["applied_after"] = one_step(backend, batch)[1]
    report["weights_changed_after"] = not all(
        torch.equal(a, b) for a, b in zip(weights, full_weights(backend), strict=True)
    )
    del backend
    gc.collect()
    return report


def main() -> None:
    root = Path(sys.argv[1])
    info = distributed.setup()
    report: dict[str, Any] = {}
    for name, overrides in RUNS:
        report[name] = train(root, name, overrides, info)
    for stage in (0, 3):
        report[f"nan-zero{stage}"] = nan_step(stage, info)
    if info.is_main:
        (root / "report.json").write_text(json.dumps(report))
    distributed.teardown()


if __name__ == "__main__":
    main()
