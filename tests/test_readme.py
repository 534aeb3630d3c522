"""The README's configuration reference covers every key the schemas define."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from trainer import config as schema

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

GROUPS = [
    ("run", schema.RunConfig),
    ("train", schema.TrainConfig),
    ("model", schema.ModelConfig),
    ("data", schema.DataConfig),
    ("optim", schema.OptimConfig),
    ("backend", schema.DDPBackend),
    ("backend", schema.DeepSpeedBackend),
    ("logger", schema.LoggerConfig),
    ("logger.wandb", schema.WandbConfig),
    ("schedule", schema.ScheduleConfig),
]


@pytest.mark.parametrize(("prefix", "dataclass"), GROUPS, ids=[g for g, _ in GROUPS])
def test_every_key_is_documented(prefix: str, dataclass: type) -> None:
    keys = [f"{prefix}.{f.name}" for f in fields(dataclass) if f.name != "wandb"]  # nested group: own row
    missing = [key for key in keys if f"`{key}`" not in README]
    assert not missing


def test_every_schedule_and_its_keys_are_documented() -> None:
    base = {f.name for f in fields(schema.ScheduleConfig)}
    for name, dataclass in schema.SCHEDULE_SCHEMAS.items():
        assert f"`{name}`" in README
        for key in {f.name for f in fields(dataclass)} - base:
            assert f"`{key}`" in README, f"schedule {name}: key {key}"
