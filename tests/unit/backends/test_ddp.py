"""backend=ddp in-process: the gradient sync the loop asks for, and non-finite updates never applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from tests.helpers import one_step, random_batch, tiny_trainer
from trainer.backends.ddp import DDPBackend
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.testing import run_distributed


def params(backend: DDPBackend) -> list[torch.Tensor]:
    return [p.detach().clone() for p in backend.module.parameters()]


def test_a_non_finite_gradient_leaves_weights_and_optimizer_untouched(ddp_backend: DDPBackend) -> None:
    one_step(ddp_backend, random_batch(1))
    before = params(ddp_backend)
    first = next(ddp_backend.module.parameters())
    state_before = {k: v.clone() for k, v in ddp_backend.optimizer.state[first].items()}
    handle = first.register_hook(lambda grad: grad * float("nan"))
    norm, applied = one_step(ddp_backend, random_batch(3))
    handle.remove()
    assert not applied
    assert not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(params(ddp_backend), before, strict=True))
    state_after = ddp_backend.optimizer.state[first]
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert all(p.grad is None for p in ddp_backend.module.parameters())


def _same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _grads(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def _one_loop_step_with_three_micro_batches(info: DistInfo, cache: str, run_dir: str) -> dict[str, Any]:
    """Through the loop's own train_step: all-reduces and gradient agreement after each micro-batch."""
    cfg = compose(
        [
            *(
                "train.seq_len=32",
                "train.micro_batch_size=2",
                "train.grad_accum_steps=3",
                "train.eval_every=0",
            ),
            *(f"data.cache_dir={cache}", "logger.wandb.mode=disabled", "logger.progress=off"),
        ]
    )
    trainer, _ = tiny_trainer(cfg, info, Path(run_dir))
    backend = trainer.backend
    assert isinstance(backend, DDPBackend)
    assert backend.ddp is not None
    all_reduces: list[int] = []

    def counting_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        all_reduces.append(bucket.index())
        return allreduce_hook(None, bucket)  # type: ignore[arg-type]  # None: the default process group

    # DDP checks a hook's annotations at run time; this module's future import made them strings.
    counting_hook.__annotations__ = {
        "state": object,
        "bucket": dist.GradBucket,
        "return": torch.futures.Future[torch.Tensor],
    }
    backend.ddp.register_comm_hook(None, counting_hook)
    after: list[tuple[int, bool]] = []
    backward = backend.backward

    def observed_backward(loss: torch.Tensor) -> None:
        backward(loss)
        after.append((len(all_reduces), _same_on_all_ranks(_grads(backend.module))))

    backend.backward = observed_backward  # type: ignore[method-assign]
    trainer.train_step(trainer.clock.grad_accum(1))
    _, applied = backend.step()
    return {
        "after": after,
        "applied": bool(applied),
        "params_equal": _same_on_all_ranks(torch.cat([p.flatten() for p in params(backend)])),
    }


def test_the_loop_syncs_gradients_only_on_a_steps_last_micro_batch(tmp_path: Path, cache_dir: Path) -> None:
    reports = run_distributed(_one_loop_step_with_three_micro_batches, str(cache_dir), str(tmp_path))
    after = reports[0]["after"]
    # Accumulation micro-batches: no communication, and each rank holds its own gradients.
    assert after[0] == (0, False)
    assert after[1] == (0, False)
    # The last micro-batch all-reduces every bucket once; the ranks then agree, and so do the weights.
    assert after[2][0] >= 1
    assert after[2][1] is True
    assert all(report["applied"] and report["params_equal"] for report in reports)
