"""Run a function on several gloo ranks inside one test: ramp's collective logic, tested for real.

:func:`run_distributed` starts ``world_size`` processes (spawned, so nothing of the test process
leaks in), joins them into one gloo process group through :func:`trainer.distributed.setup`, calls
``fn(info, *args)`` on each and hands back every rank's return value, in rank order. A rank that
raises fails the call with that rank's traceback; a job that does not finish within ``timeout``
seconds is killed and fails the call. Nothing here is used by training itself.

The shape follows OLMo-core's ``run_distributed_test(fn, world_size=2, backend="gloo")``.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

from trainer import distributed


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank_main(
    rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple[Any, ...], results: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    ok = False
    try:
        info = distributed.setup(threads=1)
        # Pickled here, by value: torch would share a tensor's storage through a file descriptor that
        # dies with this process, before the parent reads it.
        results.put((rank, True, pickle.dumps(fn(info, *args))))
        ok = True
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    if ok:
        distributed.teardown()
    results.close()
    results.join_thread()  # the result reaches the parent before the process leaves
    os._exit(0)  # past torch 2.13's gloo abort at interpreter exit (see distributed.teardown)


def _collect(results: Any, processes: list[Any], world_size: int, timeout: float) -> dict[int, Any]:
    collected: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    while len(collected) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"run_distributed: ranks {sorted(set(range(world_size)) - set(collected))} "
                f"did not finish within {timeout} s"
            )
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            died = [i for i, p in enumerate(processes) if p.exitcode not in (None, 0) and i not in collected]
            if died:
                raise RuntimeError(
                    f"run_distributed: rank {died[0]} died (exit {processes[died[0]].exitcode})"
                ) from None
            continue
        if not ok:
            raise RuntimeError(f"run_distributed: rank {rank} failed:\n{value}")
        collected[rank] = pickle.loads(value)
    return collected


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 120.0
) -> list[Any]:
    """``fn(info, *args)`` on ``world_size`` gloo ranks on the CPU; every rank's result, in rank order.

    ``fn`` must be importable by name (a module-level function) and its arguments and result
    picklable.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or died.
        TimeoutError: the ranks did not all finish within ``timeout`` seconds.
    """
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank_main, args=(rank, world_size, port, fn, args, results), daemon=True)
        for rank in range(world_size)
    ]
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU, whatever the machine has
    try:
        for process in processes:
            process.start()
    finally:
        if hidden is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden
    try:
        collected = _collect(results, processes, world_size, timeout)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=10)
    return [collected[rank] for rank in range(world_size)]
