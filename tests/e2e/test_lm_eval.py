"""Downstream evaluation with the real lm-eval, offline, on ramp's own ``ramp_tiny`` task:
``python -m trainer.evaluate`` scores what the ``lm_eval`` command scores on the same export and records a
checkpoint's results in its run's metrics.jsonl at its step (and in its wandb run, offline here, on the
``lm_eval/step`` axis); ``train.lm_eval_every`` does the same in the background during training without
changing a training record; bad input is one line and exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    REPO,
    _wandb_payloads,
    export_command,
    ramp_env,
    read_metrics,
    read_wandb_history,
    run_ramp,
    wandb_runs,
)
from trainer.config import compose
from trainer.errors import ConfigError
from trainer.evaluate import TASKS_DIR

pytestmark = pytest.mark.slow

pytest.importorskip("lm_eval")

ITEMS = [json.loads(line) for line in (TASKS_DIR / "ramp_tiny" / "ramp_tiny.jsonl").read_text().splitlines()]
RUN = [
    "data=text",
    "data.files=corpus.txt",
    "data.tokenizer=train",
    "data.vocab_size=300",
    "train.seq_len=32",
    "train.micro_batch_size=4",
    "train.max_steps=6",
    "train.ckpt_every=2",
    "train.log_every=1",
    "train.eval_every=0",
]
WITH_LM_EVAL = ["train.lm_eval_every=4", "train.lm_eval_tasks=[ramp_tiny]", "logger.wandb.mode=offline"]
NO_WANDB = ["logger.wandb.mode=disabled"]
METRICS = ("acc", "acc_norm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two BPE runs (2 ranks) of 6 steps on the task's own sentences, one with train.lm_eval_every=4 and wandb
    offline (run ``evaluated``) and one with neither (``plain``); checkpoints every 2 steps."""
    cwd = tmp_path_factory.mktemp("lm_eval")
    cache = tmp_path_factory.mktemp("cache")
    sentences = [f"{item['context']} {item['choices'][item['label']]}" for item in ITEMS]
    (cwd / "corpus.txt").write_text("\n".join(sentences * 40))
    outputs = {}
    for name, extra in (("evaluated", WITH_LM_EVAL), ("plain", NO_WANDB)):
        # two ranks, as torchrun starts them: the background evaluation must not join their process group
        result = run_ramp([*RUN, *extra, f"run.name={name}"], cwd=cwd, cache_dir=cache, nproc=2, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        outputs[name] = result.stdout + result.stderr
    return {
        "cwd": cwd,
        "cache": cache,
        "output": outputs,
        "run": {name: cwd / "outputs" / name for name in outputs},
    }


def evaluate(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trainer.evaluate", *args],
        cwd=cwd,
        env=ramp_env(cache),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def lm_eval_records(run_dir: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if any(key.startswith("lm_eval/") for key in r)]


def test_the_score_is_what_the_lm_eval_command_reports_for_the_same_export(runs: dict[str, Any]) -> None:
    cwd, cache = runs["cwd"], runs["cache"]
    export = cwd / "hf_step_6"
    exported = export_command(runs["run"]["plain"] / "checkpoints" / "step_6", export, cache)
    assert exported.returncode == 0, exported.stderr

    ours = evaluate([str(export), "--tasks", "ramp_tiny"], cwd, cache)
    assert ours.returncode == 0, ours.stdout + ours.stderr
    printed = {
        line.split(" | ")[-1].split()[0]: float(line.split()[-1])
        for line in ours.stdout.splitlines()
        if "lm_eval/" in line
    }
    cli = subprocess.run(
        [
            *(str(Path(sys.executable).with_name("lm_eval")), "--model", "hf"),
            *("--model_args", f"pretrained={export},dtype=float32", "--tasks", "ramp_tiny"),
            *("--include_path", str(TASKS_DIR), "--output_path", str(cwd / "cli"), "--device", "cpu"),
        ],
        cwd=cwd,
        env=ramp_env(cache),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    (result_file,) = (cwd / "cli").rglob("results_*.json")
    theirs = json.loads(result_file.read_text())["results"]["ramp_tiny"]
    for metric in METRICS:
        assert printed[f"lm_eval/ramp_tiny/{metric}"] == theirs[f"{metric},none"], metric
    # The background evaluation of the run that trained the same weights recorded the same scores.
    (at_6,) = [r for r in lm_eval_records(runs["run"]["evaluated"]) if r["step"] == 6]
    for metric in METRICS:
        assert at_6[f"lm_eval/ramp_tiny/{metric}"] == theirs[f"{metric},none"]
    assert 0 < theirs["acc,none"] <= 1
    assert not lm_eval_records(runs["run"]["plain"]), "an export belongs to no run: nothing is appended"


def test_a_checkpoint_s_results_land_in_its_run_at_its_step(runs: dict[str, Any]) -> None:
    run_dir = runs["run"]["plain"]
    checkpoint = run_dir / "checkpoints" / "step_4"
    before = (run_dir / "metrics.jsonl").read_text()
    result = evaluate(
        [str(checkpoint), "--tasks", "ramp_tiny", "--batch-size", "4"], runs["cwd"], runs["cache"]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"ramp | appended to {run_dir / 'metrics.jsonl'} at step 4"
    assert not (run_dir / "wandb").exists(), "a run without wandb gets none"
    after = (run_dir / "metrics.jsonl").read_text()
    assert after.startswith(before), "the training records stay as they were"
    (record,) = [json.loads(line) for line in after[len(before) :].splitlines()]
    assert record["step"] == 4
    assert set(record) == {"step"} | {f"lm_eval/ramp_tiny/{m}{s}" for m in METRICS for s in ("", "_stderr")}
    # The same weights, trained alongside a background evaluation, scored the same at step 4.
    (background,) = [r for r in lm_eval_records(runs["run"]["evaluated"]) if r["step"] == 4]
    assert background == record


def test_in_training_evaluations_log_at_their_steps_and_leave_training_unchanged(
    runs: dict[str, Any],
) -> None:
    evaluated, plain = runs["run"]["evaluated"], runs["run"]["plain"]
    # every 4th step's checkpoint and the last, in the order the background evaluations ended
    assert sorted(r["step"] for r in lm_eval_records(evaluated)) == [4, 6]
    train, _ = read_metrics(evaluated)
    reference, _ = read_metrics(plain)
    assert [r["step"] for r in train] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens"):
        assert [r[key] for r in train] == [r[key] for r in reference], key
    output = runs["output"]["evaluated"]
    assert "ramp | lm-eval of step 4 done: in metrics.jsonl and wandb" in output
    assert "ramp | lm-eval of step 6 done: in metrics.jsonl and wandb" in output
    assert "lm_eval/ramp_tiny/acc " in (evaluated / "lm_eval" / "step_4.log").read_text()


def lm_eval_axes(run_dir: Path) -> dict[str, str]:
    """The step axis of each lm_eval key (but the axis itself) the run's wandb segments declare by name."""
    from wandb.proto import wandb_internal_pb2

    axes = {}
    for segment in wandb_runs(run_dir):
        for payload in _wandb_payloads(segment.read_bytes()):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, no stubs
            record.ParseFromString(payload)
            name = record.metric.name if record.WhichOneof("record_type") == "metric" else ""
            if name.startswith("lm_eval/") and name != "lm_eval/step":
                axes[name] = record.metric.step_metric
    return axes


def test_in_training_results_reach_wandb_at_their_checkpoint_s_step(runs: dict[str, Any]) -> None:
    evaluated = runs["run"]["evaluated"]
    (segment,) = wandb_runs(
        evaluated
    )  # the training's: the background evaluations opened no run of their own
    history = read_wandb_history(segment)
    results = {row["lm_eval/step"]: row for row in history if "lm_eval/step" in row}
    records = {record["step"]: record for record in lm_eval_records(evaluated)}
    assert sorted(results) == sorted(records) == [4, 6]
    for step, record in records.items():
        assert {key: results[step][key] for key in record if key != "step"} == {
            key: value for key, value in record.items() if key != "step"
        }
    keys = {key for record in records.values() for key in record if key != "step"}
    assert lm_eval_axes(evaluated) == dict.fromkeys(keys, "lm_eval/step")
    # wandb's own step is still the training's: each training step once, in its row, as metrics.jsonl has it
    steps = [row["_step"] for row in history]
    assert len(steps) == len(set(steps))
    by_step = {row["_step"]: row for row in history}
    train, _ = read_metrics(evaluated)
    for record in train:
        assert (by_step[record["step"]]["step"], by_step[record["step"]]["loss"]) == (
            record["step"],
            record["loss"],
        )


def test_the_command_adds_a_checkpoint_s_results_to_its_run_s_wandb_run(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    run_dir = tmp_path / "evaluated"  # a copy: the other tests read the run as training left it
    shutil.copytree(runs["run"]["evaluated"], run_dir, symlinks=True)
    before = wandb_runs(run_dir)
    last_row = max(row["_step"] for segment in before for row in read_wandb_history(segment))
    result = evaluate(
        [str(run_dir / "checkpoints" / "step_2"), "--tasks", "ramp_tiny", "--batch-size", "4"],
        runs["cwd"],
        runs["cache"],
    )
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = (run_dir / "wandb_run_id").read_text()
    assert result.stdout.splitlines()[-1] == f"ramp | logged to wandb run {run_id} at lm_eval/step 2"
    (record,) = [r for r in lm_eval_records(run_dir) if r["step"] == 2]
    (segment,) = [s for s in wandb_runs(run_dir) if s not in before]  # the same run, continued
    assert segment.name == f"run-{run_id}.wandb"
    (row,) = read_wandb_history(segment)
    assert (row["_step"], row["lm_eval/step"]) == (last_row + 1, 2)  # after the training's rows
    assert {key: row[key] for key in record if key != "step"} == {
        key: value for key, value in record.items() if key != "step"
    }
    assert set(lm_eval_axes(run_dir).values()) == {"lm_eval/step"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing_run", "--tasks", "ramp_tiny"], "ramp: error: CHECKPOINT missing_run does not exist"),
        (
            ["outputs/plain", "--tasks", "ramp_tiny,no_such_task"],
            "ramp: error: unknown lm-eval task no_such_task",
        ),
    ],
)
def test_a_bad_path_or_task_is_one_line_and_exit_2(
    runs: dict[str, Any], args: list[str], message: str
) -> None:
    result = evaluate(args, runs["cwd"], runs["cache"])
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_an_unknown_in_training_task_is_refused_at_start_up_and_a_partial_score_is_not_recorded(
    runs: dict[str, Any],
) -> None:
    cwd, cache = runs["cwd"], runs["cache"]
    bad = [*RUN, *NO_WANDB, "train.lm_eval_every=2", "train.lm_eval_tasks=[no_such_task]", "run.name=bad"]
    result = run_ramp(bad, cwd=cwd, cache_dir=cache, nproc=0, timeout=200)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("ramp: error: unknown lm-eval task no_such_task")
    assert not (cwd / "outputs" / "bad").exists()
    before = (runs["run"]["plain"] / "metrics.jsonl").read_text()
    partial = evaluate(["outputs/plain", "--tasks", "ramp_tiny", "--limit", "4"], cwd, cache)
    assert partial.returncode == 0, partial.stderr
    assert "a partial evaluation, not recorded" in partial.stdout
    assert (runs["run"]["plain"] / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lm_eval_every=4", "train.ckpt_every=4"], "needs tasks: set train.lm_eval_tasks"),
        (
            ["train.lm_eval_every=4", "train.lm_eval_tasks=[ramp_tiny]"],
            "make it a multiple of train.ckpt_every=0",
        ),
        (
            ["train.lm_eval_every=6", "train.ckpt_every=4", "train.lm_eval_tasks=[ramp_tiny]"],
            "make it a multiple of train.ckpt_every=4",
        ),
    ],
)
def test_the_in_training_option_is_refused_where_it_cannot_run(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        compose(overrides)


def test_the_task_ships_with_the_package() -> None:
    assert TASKS_DIR.is_relative_to(REPO / "trainer")
    assert {p.name for p in (TASKS_DIR / "ramp_tiny").iterdir()} >= {
        "ramp_tiny.yaml",
        "ramp_tiny.jsonl",
        "utils.py",
    }
    assert 30 <= len(ITEMS) <= 40
    assert all(0 <= item["label"] < len(item["choices"]) for item in ITEMS)
