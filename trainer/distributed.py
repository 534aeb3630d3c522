"""Process-group set-up and tear-down, rank facts, and the reductions ranks agree on.

This is the one module that talks to ``torch.distributed`` for the trainer: models never import it.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: global and local rank, global and per-node world size, device."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes files and speaks on the console."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Rank 0 of this node: builds per-node caches while the others wait."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one rank; alone, this module's collectives are no-ops."""
        return self.world_size > 1


def env_rank() -> int:
    """The global rank from the launcher's environment, usable before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def _store_for_restart_round() -> dist.Store | None:
    """A per-round prefix on torchrun's shared store.

    torch 2.13's torchrun reuses one key-value store across restart rounds without a per-round
    prefix, so a restarted round can read the dead round's addresses and fail in gloo's
    connectFullMesh. Prefixing with the restart count keeps the rounds apart.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(minutes=10),
    )
    return dist.PrefixStore(f"ramp/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def setup(threads: int | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = env_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks on one node share its cores; oversubscribing them slows every rank down.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world_size))
    if world_size > 1 and not dist.is_initialized():  # a sweep's next job keeps the group of the last
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _store_for_restart_round()
        if store is None:
            dist.init_process_group(backend=backend, timeout=timedelta(minutes=10))
        else:
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=10)
            )
    return DistInfo(rank, local_rank, world_size, local_world_size, device)


def ensure_process_group(device: torch.device | None = None) -> None:
    """A 1-rank group on an in-memory store when running alone (no port, nothing to clean up): gloo, and
    nccl for a CUDA ``device`` beside it.

    DeepSpeed's engine and FSDP2 need a process group even for one process; under torchrun they join
    ramp's.
    """
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def barrier(info: DistInfo) -> None:
    """Wait until every rank gets here."""
    if info.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks, in place; one call carries every metric of a log interval."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Elementwise max of a tensor over ranks, in place."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


_cpu_group: Any = None


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when any rank says so. Runs on the CPU (a gloo group beside nccl), so it
    costs no device sync and can run every step."""
    global _cpu_group
    if not info.distributed:
        return flag
    if info.device.type != "cpu" and _cpu_group is None:
        _cpu_group = dist.new_group(backend="gloo")
    tensor = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(tensor.item())


def broadcast_object(value: object, info: DistInfo) -> object:
    """Rank 0's value on every rank."""
    if not info.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def teardown(leave: bool = True) -> None:
    """Leave the process group safely (with ``leave=False``, a sweep's job that the next one follows:
    collect, wait for every rank, keep the group).

    With gloo, destroying the process group while a DDP-wrapped model is still alive makes torch
    2.13 abort at exit now and then. Callers drop their references to the model and optimizer first;
    collecting garbage here finishes the job before the group goes away.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if leave:
            dist.destroy_process_group()
