"""Tensorboard event files under ``run.dir/tensorboard``: the same series as metrics.jsonl, per global step.

A resumed job opens its writer with ``purge_step`` = the checkpoint's step + 1. Tensorboard then
discards what earlier event files logged from that step on (the steps a killed run took after its
last checkpoint), so each step is shown once. Every record is flushed as written, so a kill
never loses a step the checkpoint already covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class TensorboardSink:
    """Writes each record's numbers as scalars at its global step, and a fresh run's config as text."""

    def __init__(self, run_dir: Path, config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        if not start_step:
            # Indented so tensorboard's markdown renders it as a code block.
            text = "    " + yaml.safe_dump(config, sort_keys=False).replace("\n", "\n    ")
            self.writer.add_text("config", text, global_step=0)

    def write(self, record: dict[str, Any]) -> None:
        """Add the record's numeric fields (booleans excepted) as float64 scalars at its step; flush."""
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                # A float64 tensor summary: the value tensorboard shows is the one metrics.jsonl holds.
                self.writer.add_scalar(key, value, global_step=step, new_style=True, double_precision=True)
        self.writer.flush()

    def close(self) -> None:
        """Close the event writer."""
        self.writer.close()
