"""Contender (a) and (e): a bare PyTorch loop. Forward, backward, clip, AdamW step, schedule step.

Under torchrun it wraps the model in DDP (nothing else); alone it is a single process. By default it
trains the bench's gpt2-tiny in fp32 on the CPU; ``bench.gpu`` also runs it on a GPU with a ramp model
preset, bf16 autocast and torch.compile (see :func:`bench.common.args`), as ramp would.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench import common


def build_optimizer(
    model: nn.Module, steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (decay on matrices only; fused on CUDA, as ramp) and a linear-warmup cosine schedule."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": common.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=common.LR,
        betas=common.BETAS,
        fused=True if device.type == "cuda" else None,
    )

    def cosine(step: int) -> float:
        if step < common.WARMUP:
            return step / common.WARMUP
        progress = (step - common.WARMUP) / max(1, steps - common.WARMUP)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def batches(opts: argparse.Namespace, rank: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``--steps`` seeded random windows of ``--seq-len + 1`` tokens, ``--micro-batch`` at a time."""
    tokens = np.memmap(opts.tokens, dtype=np.uint16, mode="r")
    windows = (len(tokens) - 1) // opts.seq_len
    rng = np.random.default_rng([opts.seed, rank])
    for _ in range(opts.steps):
        starts = rng.integers(0, windows, opts.micro_batch) * opts.seq_len
        batch = torch.from_numpy(
            np.stack([tokens[s : s + opts.seq_len + 1] for s in starts]).astype(np.int64)
        )
        yield batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> float:
    """The GPU's peak allocation, or this process's resident memory on the CPU, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**30


def setup() -> tuple[argparse.Namespace, int, int, torch.device]:
    """Options, world size, rank and device; the gloo process group under torchrun."""
    opts = common.args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return opts, world, rank, torch.device(opts.device)


def main() -> None:
    """Train for ``--steps`` steps, printing the BENCH lines at the first and the last."""
    opts, world, rank, device = setup()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(opts.seed)
    model = AutoModelForCausalLM.from_config(common.model_config(opts.model, opts.vocab_size)).to(device)
    network: Any = torch.compile(model) if opts.compile else model
    net = torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network
    optimizer, scheduler = build_optimizer(model, opts.steps, device)
    autocast: AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if opts.bf16 else contextlib.nullcontext()
    )
    started = 0.0
    for step, batch in enumerate(batches(opts, rank, device), start=1):
        with autocast:
            logits = net(input_ids=batch[:, :-1]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), common.MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and step in (1, opts.steps):
            common.event(step)
        if 0 < opts.warmup_steps < opts.steps and step in (opts.warmup_steps, opts.steps):
            synchronize(device)
            if step == opts.warmup_steps:
                started = time.perf_counter()
            elif rank == 0:
                timed = opts.steps - opts.warmup_steps
                rate = timed * opts.micro_batch * opts.seq_len * world / (time.perf_counter() - started)
                common.measured(rate, peak_memory_gb(device), timed)
    common.leave()


if __name__ == "__main__":
    main()
