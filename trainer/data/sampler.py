"""Deterministic, resumable sampling of fixed-length windows from a flat token file.

Sample ``i`` is the window ``tokens[i * T : i * T + T + 1]`` (T inputs, T shifted targets). Pass
``e`` over the data visits samples in the order ``permutation(seed, e)``. Each micro-batch takes
the next ``B * world_size`` samples of that order and hands rank ``r`` the ``r``-th slice of ``B``,
so within a pass every sample goes to exactly one rank, and an optimizer step trains on the same
set of samples whatever the split between ranks and accumulation. A pass's tail that cannot fill a
micro-batch for every rank is skipped. The state is two integers: the pass and the position in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SamplerState:
    """Where sampling stands: the pass over the data and the position in it."""

    epoch: int = 0
    position: int = 0
    """Samples of this pass already handed out, summed over ranks."""


class WindowSampler:
    """This rank's share of every micro-batch of training windows, in a seeded order per pass."""

    def __init__(
        self, tokens: np.ndarray, seq_len: int, micro_batch_size: int, rank: int, world_size: int, seed: int
    ) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.num_samples = (len(tokens) - 1) // seq_len
        self.global_batch = micro_batch_size * world_size
        self.state = SamplerState()
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The seeded permutation of sample indices for pass ``epoch`` (the current pass's is cached)."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> np.ndarray:
        """This rank's sample indices for the next micro-batch."""
        if self.state.position + self.global_batch > self.num_samples:
            self.state = SamplerState(self.state.epoch + 1, 0)
        start = self.state.position + self.rank * self.micro_batch_size
        indices = self.order(self.state.epoch)[start : start + self.micro_batch_size]
        self.state.position += self.global_batch
        return indices

    def gather_from(self, tokens: np.ndarray, indices: np.ndarray) -> torch.Tensor:
        """Windows ``indices`` of ``tokens`` as an int64 batch of shape (B, T + 1)."""
        windows = [tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1] for i in indices]
        return torch.from_numpy(np.stack(windows).astype(np.int64))

    def next_batch(self) -> torch.Tensor:
        """This rank's next micro-batch of training windows, int64 of shape (B, T + 1)."""
        return self.gather_from(self.tokens, self.next_indices())

    def state_dict(self) -> dict[str, int]:
        """The position to save: the pass, and the samples of it handed out over all ranks."""
        return {"epoch": self.state.epoch, "position": self.state.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.state = SamplerState(int(state["epoch"]), int(state["position"]))


def eval_batches(
    tokens: np.ndarray, seq_len: int, micro_batch_size: int, rank: int, world_size: int, steps: int
) -> list[np.ndarray]:
    """The first ``steps`` global micro-batches of the validation windows, in order: the same every time."""
    num_samples = (len(tokens) - 1) // seq_len
    global_batch = micro_batch_size * world_size
    steps = min(steps, num_samples // global_batch)
    return [
        np.arange(
            step * global_batch + rank * micro_batch_size, step * global_batch + (rank + 1) * micro_batch_size
        )
        for step in range(steps)
    ]
