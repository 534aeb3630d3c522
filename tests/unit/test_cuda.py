"""The GPU path on a real GPU: bf16 autocast, fused AdamW, pinned copies, the peak table, NCCL, compile.

Every test needs CUDA and is skipped without it; ``bench/gpu.sh`` runs them on the GPU machine
(``pytest -m cuda tests``), and on a machine without a GPU they skip cleanly.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from trainer.backends import to_device
from trainer.config import compose
from trainer.models import build_model, build_optimizer, causal_lm_loss
from trainer.observe import flops
from trainer.schedules import build_schedule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

KNOWN_GPUS = ("H100", "H200", "A100", "B200", "MI300X", "L40S")
"""GPUs the peak table must know (any name that contains one of these)."""


def gpu() -> torch.device:
    """The current CUDA device, with its index."""
    return torch.device("cuda", torch.cuda.current_device())


def tiny_model(device: torch.device) -> nn.Module:
    """ramp's gpt2-tiny (byte vocabulary), seeded, on ``device``."""
    torch.manual_seed(0)
    return build_model(compose().model, tokenizer_vocab=257, eos_id=256).to(device)


def token_batch(device: torch.device) -> torch.Tensor:
    """A seeded batch of 2 sequences of 64 tokens (+1 for the targets)."""
    return torch.randint(0, 257, (2, 65), generator=torch.Generator().manual_seed(0)).to(device)


def loss_and_grads(model: nn.Module, batch: torch.Tensor, bf16: bool) -> tuple[float, torch.Tensor]:
    """The mean next-token loss and all gradients flattened, with or without bf16 autocast."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = causal_lm_loss(model, batch) / batch[:, 1:].numel()
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bf16_autocast_forward_and_backward_are_finite_and_close_to_fp32() -> None:
    model, batch = tiny_model(gpu()), token_batch(gpu())
    loss32, grads32 = loss_and_grads(model, batch, bf16=False)
    loss16, grads16 = loss_and_grads(model, batch, bf16=True)
    assert math.isfinite(loss16)
    assert bool(torch.isfinite(grads16).all())
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    # bf16 keeps 8 bits of mantissa: on the CPU the relative gradient error is about 0.7%.
    assert float((grads16 - grads32).norm() / grads32.norm()) < 5e-2


def test_build_optimizer_gives_fused_adamw_on_cuda() -> None:
    model = tiny_model(gpu())
    optimizer = build_optimizer(model, compose().optim, gpu())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    loss_and_grads(model, token_batch(gpu()), bf16=True)
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_to_device_pinned_non_blocking_copy_keeps_the_values() -> None:
    host = torch.randint(0, 128_256, (8, 2049), generator=torch.Generator().manual_seed(1))
    moved = to_device(host, gpu())
    torch.cuda.synchronize()
    assert moved.device == gpu()
    assert torch.equal(moved.cpu(), host)


def test_peak_flops_knows_this_gpu() -> None:
    name = torch.cuda.get_device_name(gpu())
    if not any(known in name for known in KNOWN_GPUS):
        pytest.skip(f"{name} is not a GPU the peak table lists; MFU needs logger.peak_flops there")
    peak = flops.peak_flops(gpu(), None)
    assert peak is not None
    assert peak == flops.peak_for_device_name(name)


def test_nccl_all_reduce_on_one_rank() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1, device_id=gpu()
    )
    try:
        tensor = torch.arange(4, dtype=torch.float32, device=gpu())
        dist.all_reduce(tensor)
        torch.cuda.synchronize()
        assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0]  # the sum over one rank
    finally:
        dist.destroy_process_group()


def test_compiled_forward_equals_eager_within_bf16_tolerance() -> None:
    model = tiny_model(gpu()).eval()
    inputs = token_batch(gpu())[:, :-1]
    compiled = torch.compile(model)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(input_ids=inputs).logits.float()
        fast = compiled(input_ids=inputs).logits.float()
    # Fused kernels round differently; bf16 against fp32 moves these logits by about 0.01 on the CPU.
    torch.testing.assert_close(fast, eager, atol=5e-2, rtol=5e-2)


def test_a_real_run_trains_on_cuda_with_fused_adamw_at_the_schedule_lrs(tmp_path: Path) -> None:
    """``python -m trainer.main`` on the GPU: bf16, fused AdamW with the LR written on the device at
    every step; the recorded LRs equal the schedule's (in float32, what the fused kernel uses)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "trainer.main",
        "model=gpt2-tiny",
        "train.max_steps=6",
        "train.micro_batch_size=2",
    ]
    cmd += ["train.seq_len=64", "train.precision=bf16", "train.log_every=1", "train.eval_every=0"]
    cmd += ["schedule.warmup_steps=2", "logger.wandb.mode=disabled", f"run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row and "lr" in row]
    assert [row["step"] for row in train] == [1, 2, 3, 4, 5, 6]
    cfg = compose(["train.max_steps=6", "schedule.warmup_steps=2"])
    schedule = build_schedule(cfg.schedule, max_steps=6, peak_lr=cfg.optim.lr)
    for row in train:
        assert math.isfinite(row["loss"])
        assert row["lr"] == pytest.approx(schedule.lr(row["step"]), rel=1e-6)


def run_on_gpu(run_dir: Path, *overrides: str) -> list[dict[str, float]]:
    """``python -m trainer.main`` on the GPU with gpt2-tiny in bf16; its training records."""
    cmd = [sys.executable, "-m", "trainer.main", "model=gpt2-tiny", "train.micro_batch_size=2"]
    cmd += ["train.seq_len=64", "train.precision=bf16", "train.log_every=1", "train.eval_every=0"]
    cmd += ["schedule.warmup_steps=2", "logger.wandb.mode=disabled", f"run.dir={run_dir}", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row and "lr" in row]


def test_fsdp2_trains_compiled_on_nccl_and_resumes_from_an_async_checkpoint(tmp_path: Path) -> None:
    """backend=fsdp on the GPU (NCCL, bf16 MixedPrecisionPolicy, each block compiled, fused AdamW on
    DTensors), saving in the background; a copy cut back to its step-3 checkpoint resumes to the same
    records within bf16 noise."""
    fsdp = ["backend=fsdp", "train.compile=true", "train.ckpt_async=true", "train.ckpt_every=3"]
    first = run_on_gpu(tmp_path / "a", "train.max_steps=6", *fsdp)
    assert [row["step"] for row in first] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(row["loss"]) for row in first)
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text() == "step_6"
    assert (tmp_path / "a" / "checkpoints" / "step_3" / "dcp" / ".metadata").is_file()
    subprocess.run(["cp", "-r", str(tmp_path / "a"), str(tmp_path / "b")], check=True, timeout=120)
    subprocess.run(["rm", "-rf", str(tmp_path / "b" / "checkpoints" / "step_6")], check=True, timeout=60)
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_3")
    resumed = run_on_gpu(tmp_path / "b", "train.max_steps=6", *fsdp)
    assert [row["step"] for row in resumed] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(first, resumed, strict=True):
        assert after["lr"] == before["lr"]
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-2)


def test_fsdp2_cpu_offload_trains(tmp_path: Path) -> None:
    """backend.cpu_offload=true: parameters, gradients and AdamW state on the host, the step there too."""
    rows = run_on_gpu(tmp_path / "run", "train.max_steps=3", "backend=fsdp", "backend.cpu_offload=true")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
