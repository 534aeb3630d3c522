"""Preemption and the end of the parent: how a rank learns it must stop.

SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to any rank makes every rank checkpoint at the same step and exit
0, whoever launched it: a terminal's Ctrl-C reaches every rank of a ``torchrun`` job, and ``torchrun``
passes a SIGTERM or SIGINT it receives on to its ranks. The handler only sets a flag. Once per optimizer step the ranks agree on it with a max all-reduce on the CPU, so
they stop together whichever rank the scheduler (Slurm, Kubernetes, a person) signalled.

Under torchrun, a rank also dies with its launcher (:func:`exit_with_parent`): when torchrun is killed
outright (an OOM killer, a hard job kill), no rank lives on as an orphan holding memory and ports.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from trainer import distributed
from trainer.distributed import DistInfo

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_REASON = "RAMP_STOP_REASON"
"""Set by ``launch.run``: a file where it writes the signal it received before it asks the trainers to
stop (with SIGUSR1, which they can ignore until they listen), so they can say what stopped them."""
PR_SET_PDEATHSIG = 1


class StopSignal:
    """Notes SIGTERM or SIGUSR1 on this rank, and SIGINT once :meth:`listen_for_ctrl_c` is called;
    :meth:`agreed` tells every rank whether any rank got one. Until then a Ctrl-C ends the start-up
    (``trainer.main`` says so in one line): nothing is written yet, and a long start-up (tokenizing a
    corpus, loading a checkpoint) is not waited for."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.received: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def listen_for_ctrl_c(self) -> Callable[[], None]:
        """From now on SIGINT (Ctrl-C) is a stop signal too (call it just before the run folder is written,
        on the main thread). Returns the function that puts the previous SIGINT handler back."""
        previous = signal.signal(signal.SIGINT, self._handle)

        def restore() -> None:
            signal.signal(signal.SIGINT, previous)

        return restore

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was signalled; the same answer on every rank."""
        return distributed.any_rank(self.received is not None, self.info)

    def describe(self) -> str:
        """What stopped the run, as the preemption message names it."""
        reason = Path(os.environ.get(STOP_REASON, "/nonexistent"))
        if reason.is_file():
            return f"{reason.read_text().strip()} (to the launcher)"
        if self.received == signal.SIGINT.name:
            return "SIGINT (Ctrl-C)"
        return self.received or "a signal to another rank"


def exit_with_parent() -> None:
    """Under torchrun, have the kernel kill this rank (SIGKILL) when torchrun dies, whatever it is doing.

    ``prctl(PR_SET_PDEATHSIG)`` (Linux): without it, ranks whose torchrun was killed outright sleep on in
    the rendezvous store's reconnect loop for many minutes. A kill mid-save is safe (saves are atomic).
    Outside torchrun (``python -m trainer.main`` from a shell, which may end while the run goes on under
    ``nohup``) and off Linux nothing changes.
    """
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent or parent == 1:  # torchrun died before the request took effect
        os._exit(1)
