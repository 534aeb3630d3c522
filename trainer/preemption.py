"""Preemption: SIGTERM or SIGUSR1 to any rank makes every rank checkpoint at the same step and exit 0.

The handler only sets a flag. Once per optimizer step the ranks agree on it with a max all-reduce on
the CPU, so they stop together whichever rank the scheduler (Slurm, Kubernetes, a person) signalled.
"""

from __future__ import annotations

import signal
from types import FrameType

from trainer import distributed
from trainer.distributed import DistInfo

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Notes SIGTERM or SIGUSR1 on this rank; :meth:`agreed` tells every rank whether any rank got one."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info
        self.received: str | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Whether any rank was signalled; the same answer on every rank."""
        return distributed.any_rank(self.received is not None, self.info)
