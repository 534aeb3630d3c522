"""Rank-0 output, decided in one place.

``setup_logging`` makes global rank 0 the only rank that prints information, while warnings and
errors from every rank still reach the user (tagged with their rank). ``Recorder`` owns the sinks
(console, metrics.jsonl, wandb, tensorboard); on every other rank it holds none, so the rest of the
code logs freely without asking which rank it is on. ``job_log`` is for events every rank meets
alike: rank 0 alone says them. ``redact`` and ``scrub`` keep secrets out of all of it.
"""

from __future__ import annotations

from trainer.observe.console import job_log, setup_logging
from trainer.observe.recorder import Recorder
from trainer.observe.redact import redact, scrub

__all__ = ["Recorder", "job_log", "redact", "scrub", "setup_logging"]
