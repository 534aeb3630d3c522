"""Contender (a) and (e): a bare PyTorch loop. Forward, backward, clip, AdamW step, schedule step.

Under torchrun it wraps the model in DDP (nothing else); alone it is a single process.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from bench import common


def main() -> None:
    """Train for ``--steps`` steps, printing the BENCH lines at the first and the last."""
    opts = common.args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(opts.seed)
    config = AutoConfig.for_model(
        **common.MODEL, vocab_size=common.VOCAB, bos_token_id=common.EOS, eos_token_id=common.EOS
    )
    model = AutoModelForCausalLM.from_config(config)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": common.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=common.LR,
        betas=common.BETAS,
    )

    def cosine(step: int) -> float:
        if step < common.WARMUP:
            return step / common.WARMUP
        progress = (step - common.WARMUP) / max(1, opts.steps - common.WARMUP)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    tokens = np.memmap(opts.tokens, dtype=np.uint16, mode="r")
    windows = (len(tokens) - 1) // opts.seq_len
    rng = np.random.default_rng([opts.seed, rank])
    for step in range(1, opts.steps + 1):
        starts = rng.integers(0, windows, opts.micro_batch) * opts.seq_len
        batch = torch.from_numpy(
            np.stack([tokens[s : s + opts.seq_len + 1] for s in starts]).astype(np.int64)
        )
        logits = net(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), common.MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0 and step in (1, opts.steps):
            common.event(step)
    common.leave()


if __name__ == "__main__":
    main()
