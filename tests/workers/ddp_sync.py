"""Run under torchrun with 2 ranks: does the DDP backend all-reduce gradients only on a step's last micro-batch?

Writes a JSON report to the path in $RAMP_TEST_REPORT (rank 0).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from trainer import distributed
from trainer.backends import build_backend
from trainer.config import register_configs, to_config
from trainer.models import build_model


def grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def main() -> None:
    register_configs()
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        cfg = to_config(compose("config", overrides=["train.grad_accum_steps=3", "train.seq_len=32"]))
    info = distributed.setup()
    torch.manual_seed(0)
    backend = build_backend(cfg, build_model(cfg.model, tokenizer_vocab=257, eos_id=256), info)
    calls = []

    def counting_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        calls.append(bucket.index())
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]

    backend.ddp.register_comm_hook(None, counting_hook)  # type: ignore[union-attr]
    generator = torch.Generator().manual_seed(100 + info.rank)  # different data on each rank
    report: dict[str, object] = {}
    for micro in range(3):
        batch = torch.randint(0, 257, (2, 33), generator=generator)
        backend.micro_step(batch, last=micro == 2)
        report[f"calls_after_micro_{micro}"] = len(calls)
        report[f"grads_equal_after_micro_{micro}"] = same_on_all_ranks(grads(backend.module))
    backend.optimizer_step()
    params = torch.cat([p.detach().flatten() for p in backend.module.parameters()])
    report["params_equal_after_step"] = same_on_all_ranks(params)
    if info.is_main:
        with open(os.environ["RAMP_TEST_REPORT"], "w") as handle:
            json.dump(report, handle)
    del backend
    distributed.teardown()


if __name__ == "__main__":
    main()
