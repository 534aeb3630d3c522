"""Downstream evaluation results in wandb (real wandb, offline): each on the ``lm_eval/step`` axis in a row of
its own, wandb's own step left to training; results metrics.jsonl holds and no segment does are sent on
the next start, never twice; ``python -m trainer.evaluate``'s writer continues the run in a later row."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import _wandb_payloads, read_wandb_history, wandb_runs
from trainer.config import WandbConfig
from trainer.observe.wandb_sink import WandbSink, log_to_run

CONFIG = {"run": {"name": "unit"}, "logger": {"wandb": {"mode": "offline", "project": "ramp"}}}


def train(step: int) -> dict[str, Any]:
    return {"step": step, "loss": 10.0 - step}


def result(step: int, acc: float) -> dict[str, Any]:
    return {"step": step, "lm_eval/t/acc": acc, "lm_eval/t/acc_stderr": acc / 10}


def sink(run_dir: Path, start_step: int) -> WandbSink:
    time.sleep(1.1)  # a segment's folder is named by the second it starts in
    return WandbSink(run_dir, WandbConfig(mode="offline"), "unit", CONFIG, start_step)


def written() -> None:
    """Wait for wandb's service to write what the finished runs logged: ``finish`` returns before it has."""
    import wandb

    wandb.teardown()


def rows(run_dir: Path) -> list[dict[str, Any]]:
    return [row for segment in wandb_runs(run_dir) for row in read_wandb_history(segment)]


def axes(run_dir: Path) -> dict[str, str]:
    """Each declared metric (by name) and its step axis, over every segment."""
    from wandb.proto import wandb_internal_pb2

    declared = {}
    for segment in wandb_runs(run_dir):
        for payload in _wandb_payloads(segment.read_bytes()):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, no stubs
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "metric" and record.metric.name:
                declared[record.metric.name] = record.metric.step_metric
    return declared


def test_results_take_training_rows_one_each_and_the_rest_rows_after_the_last(tmp_path: Path) -> None:
    first = sink(tmp_path, 0)
    for step in (1, 2, 3):
        first.write(train(step))
    first.write_lm_eval(result(2, 0.5))  # two results between two training rows
    first.write_lm_eval(result(3, 0.6))
    first.write(train(4))
    first.write({"step": 4, "val_loss": 1.5})  # an eval record of the same step: the same row
    first.write_lm_eval(result(4, 0.7))  # ends after the last training row
    first.close()
    written()

    by_step = {row["_step"]: row for row in rows(tmp_path)}
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    for step in (1, 2, 3, 4):
        assert (by_step[step]["step"], by_step[step]["loss"]) == (step, 10.0 - step)
    assert by_step[4]["val_loss"] == 1.5
    assert {s: (r.get("lm_eval/step"), r.get("lm_eval/t/acc")) for s, r in by_step.items()} == {
        1: (None, None),
        2: (None, None),
        3: (2, 0.5),
        4: (3, 0.6),
        5: (4, 0.7),
    }
    assert "step" not in by_step[5], "a row of its own carries no training step"
    assert axes(tmp_path)["lm_eval/t/acc"] == axes(tmp_path)["lm_eval/t/acc_stderr"] == "lm_eval/step"


def test_a_restart_sends_what_wandb_lacks_once_and_the_command_adds_a_later_row(tmp_path: Path) -> None:
    first = sink(tmp_path, 0)
    first.write(train(1))
    first.write(train(2))
    first.write_lm_eval(result(2, 0.5))
    first.close()
    written()
    lines = [train(1), train(2), result(2, 0.5), result(2, 0.25) | {"lm_eval/u/acc": 0.3}, train(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    second = sink(tmp_path, 3)  # step 3 re-sent; the second result at step 2 (a task wandb lacks) too
    second.write(train(4))
    second.close()
    written()

    history = rows(tmp_path)
    assert [row["_step"] for row in history] == [1, 2, 3, 4]
    results = [(row["lm_eval/step"], row["lm_eval/t/acc"]) for row in history if "lm_eval/step" in row]
    assert results == [(2, 0.5), (2, 0.25)]
    assert (history[2]["step"], history[2]["lm_eval/u/acc"]) == (3, 0.3)

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    time.sleep(1.1)
    assert log_to_run(tmp_path, result(4, 0.9)) == (tmp_path / "wandb_run_id").read_text()
    written()
    newest = read_wandb_history(wandb_runs(tmp_path)[-1])
    assert [(row["_step"], row["lm_eval/step"], row["lm_eval/t/acc"]) for row in newest] == [(5, 4, 0.9)]
    assert axes(tmp_path)["lm_eval/t/acc"] == "lm_eval/step"


@pytest.mark.parametrize("case", ["disabled", "no run id", "no config"])
def test_the_command_leaves_a_run_without_wandb_alone(tmp_path: Path, case: str) -> None:
    config = json.loads(json.dumps(CONFIG))
    if case == "disabled":
        config["logger"]["wandb"]["mode"] = "disabled"
    if case != "no config":
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    if case != "no run id":
        (tmp_path / "wandb_run_id").write_text("abcd1234")
    assert log_to_run(tmp_path, result(4, 0.9)) is None
    assert not (tmp_path / "wandb").exists()
