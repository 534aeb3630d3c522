"""What a user watches, end to end: wandb offline files, tensorboard events, plots, the terminal, secrets.

One job runs in three segments, as a preempted and then crashed job does: started, preempted by
SIGTERM (checkpoint, exit 0), resumed, killed with SIGKILL after a checkpoint (every process at once,
wandb's own included), resumed to the end. Every test below reads what that job left behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import (
    _wandb_payloads,
    kill_job,
    launch_ramp,
    ramp_env,
    read_metrics,
    read_wandb_history,
    run_ramp,
    train_steps,
    wandb_runs,
    workers,
)

pytestmark = pytest.mark.slow

MAX_STEPS = 16
CONFIG_SECRET = "hubtok-3f9a1c7e5b2d"
ENV_SECRETS = {"WANDB_API_KEY": "wandbkey-0c1d2e3f4a5b6c7d8e9f", "HF_TOKEN": "hf_envtok_99a8b7c6d5e4"}
PEAK = 1e12
OVERRIDES = [
    f"train.max_steps={MAX_STEPS}",
    "train.log_every=1",
    "train.ckpt_every=4",
    "train.eval_every=8",
    "train.eval_steps=2",
    "train.seq_len=128",
    "train.micro_batch_size=4",
    "logger=tensorboard",
    "logger.wandb.mode=offline",
    f"logger.peak_flops={PEAK}",
    f"+model.extra.hub_token={CONFIG_SECRET}",
    "run.name=obs",
]


@dataclass
class Job:
    cwd: Path
    run_dir: Path
    console: str
    """Everything the three segments printed."""
    runs_after_first_segment: list[Path]
    preempted_at: int
    killed_at: int
    """The last step metrics.jsonl held when the second segment was killed."""
    resumed_from: int
    """The checkpoint the third segment resumed from."""


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while train_steps(run_dir) < step:
        assert proc.poll() is None, "the job ended early"
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.03)


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Job:
    cwd = tmp_path_factory.mktemp("observe")
    run_dir = cwd / "outputs" / "obs"
    env = {**ramp_env(cache_dir), **ENV_SECRETS}
    first = launch_ramp(OVERRIDES, cwd=cwd, cache_dir=cache_dir, log=cwd / "segment1.log", env=env)
    try:
        wait_for_step(run_dir, 3, first)
        workers(first)[-1].send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0, (cwd / "segment1.log").read_text()
    finally:
        if first.poll() is None:
            kill_job(first)
    preempted_at = train_steps(run_dir)
    runs_after_first = wandb_runs(run_dir)
    second = launch_ramp(OVERRIDES, cwd=cwd, cache_dir=cache_dir, log=cwd / "segment2.log", env=env)
    try:
        wait_for_step(run_dir, 9, second)
    finally:
        kill_job(second)
    killed_at = train_steps(run_dir)
    resumed_from = max(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    third = run_ramp(OVERRIDES, cwd=cwd, cache_dir=cache_dir, env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    console = (cwd / "segment1.log").read_text() + (cwd / "segment2.log").read_text()
    return Job(
        cwd,
        run_dir,
        console + third.stdout + third.stderr,
        runs_after_first,
        preempted_at,
        killed_at,
        resumed_from,
    )


def test_the_scenario_redid_steps_after_a_checkpoint(job: Job) -> None:
    assert "ramp | preempted by" in job.console
    assert job.killed_at > job.resumed_from >= job.preempted_at
    train, evals = read_metrics(job.run_dir)
    assert [r["step"] for r in train] == list(range(1, MAX_STEPS + 1))
    assert [e["step"] for e in evals] == [8, 16]


def test_two_ranks_make_one_wandb_run_that_every_restart_continues(job: Job) -> None:
    run_id = (job.run_dir / "wandb_run_id").read_text().strip()
    assert len(job.runs_after_first_segment) == 1  # two ranks, one run
    segments = wandb_runs(job.run_dir)
    assert len(segments) == 3  # one per start of the job, all of the same run
    for segment in segments:
        assert segment.name == f"run-{run_id}.wandb"
        assert segment.parent.name.startswith("offline-run-")
        assert segment.parent.name.endswith(f"-{run_id}")


def test_wandb_history_holds_each_step_once_and_equals_metrics_jsonl(job: Job) -> None:
    rows = [row for segment in wandb_runs(job.run_dir) for row in read_wandb_history(segment)]
    steps = [row["_step"] for row in rows]
    assert sorted(steps) == list(range(1, MAX_STEPS + 1)), steps  # no step twice, none missing
    by_step = {row["_step"]: row for row in rows}
    train, evals = read_metrics(job.run_dir)
    for record in train:
        row = by_step[record["step"]]
        assert row["step"] == record["step"]
        assert row["lr"] == record["lr"]
        assert row["lr/decay"] == row["lr/no_decay"] == record["lr"]
        # Steps redone after the kill are bit-identical on the CPU, whichever segment logged them.
        for key in ("loss", "grad_norm", "tokens"):
            assert row[key] == record[key], (record["step"], key)
        for key in ("tokens_per_s", "step_time", "data_wait_s", "memory_gb", "mfu"):
            assert row[key] > 0 or key == "data_wait_s", key
    for record in evals:
        assert by_step[record["step"]]["val_loss"] == record["val_loss"]
        assert by_step[record["step"]]["val_ppl"] == record["val_ppl"]


def test_wandb_plots_every_series_against_the_global_step(job: Job) -> None:
    from wandb.proto import wandb_internal_pb2

    # A segment killed with SIGKILL can lose everything wandb had not yet written (its history too).
    for segment in [s for s in wandb_runs(job.run_dir) if read_wandb_history(s)]:
        metrics = {}
        for payload in _wandb_payloads(segment.read_bytes()):
            record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, no stubs
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "metric":
                metrics[record.metric.glob_name or record.metric.name] = record.metric.step_metric
        assert metrics.get("*") == "step", metrics


def test_resume_reader_survives_a_file_cut_anywhere(job: Job, tmp_path: Path) -> None:
    from trainer.observe.wandb_sink import last_logged_step

    segment = wandb_runs(job.run_dir)[-1]
    data = segment.read_bytes()
    run_id = segment.stem.removeprefix("run-")
    target = tmp_path / "wandb" / f"offline-run-20000101_000000-{run_id}" / segment.name
    target.parent.mkdir(parents=True)
    seen = []
    for cut in [*range(0, len(data), max(1, len(data) // 150)), len(data)]:
        target.write_bytes(data[:cut])
        seen.append(last_logged_step(tmp_path / "wandb", run_id))
    assert seen == sorted(seen)
    assert seen[-1] == MAX_STEPS == max(row["_step"] for row in read_wandb_history(segment))


def test_tensorboard_shows_each_step_once_with_the_metrics_jsonl_values(job: Job) -> None:
    # The accumulator the tensorboard server itself loads runs with (it honours purge_step).
    from tensorboard.backend.event_processing.plugin_event_accumulator import TENSORS, EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(job.run_dir / "tensorboard"), size_guidance={TENSORS: 0})
    events.Reload()
    assert len(list((job.run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]

    train, evals = read_metrics(job.run_dir)
    for key in ("lr", "loss", "grad_norm", "tokens", "tokens_per_s", "step_time", "memory_gb", "mfu"):
        assert series(key) == [(r["step"], r[key]) for r in train], key
    assert series("val_loss") == [(e["step"], e["val_loss"]) for e in evals]


def test_every_series_is_recorded_and_mfu_follows_the_palm_formula(job: Job) -> None:
    config = yaml.safe_load((job.run_dir / "config.yaml").read_text())
    meta = json.loads((job.run_dir / "checkpoints" / f"step_{MAX_STEPS}" / "meta.json").read_text())
    m = config["model"]
    d, layers, heads, seq = m["hidden_size"], m["num_layers"], m["num_heads"], config["train"]["seq_len"]
    assert m["arch"] == "gpt2"
    assert m["tie_word_embeddings"]
    assert m["intermediate_size"] is None
    vocab = -(-meta["tokenizer_vocab"] // 64) * 64
    # GPT-2 block: qkv 3d^2+3d, proj d^2+d, MLP 8d^2+5d, two layer norms 4d; final norm 2d; tied head V*d.
    n = layers * (12 * d * d + 13 * d) + 2 * d + vocab * d
    flops_per_token = 6 * n + 12 * layers * heads * (d // heads) * seq
    train, _ = read_metrics(job.run_dir)
    for record in train:
        assert record["mfu"] == pytest.approx(flops_per_token * record["tokens_per_s"] / (2 * PEAK), rel=1e-9)
        assert 0.05 < record["memory_gb"] < 24  # the largest rank's resident memory, in GiB
        assert record["step_time"] > 0
        assert record["tokens_per_s"] > 0
        assert record["data_wait_s"] >= 0


def test_planted_secrets_appear_nowhere(job: Job) -> None:
    secrets = [CONFIG_SECRET, *ENV_SECRETS.values()]
    leaks = []
    for root, _dirs, files in os.walk(job.cwd):
        for name in files:
            path = Path(root, name)
            data = path.read_bytes()
            leaks += [(str(path), s) for s in secrets if s.encode() in data]
    assert not leaks  # run folder, checkpoints, wandb (binary .wandb and its logs), tensorboard, job logs
    assert not [s for s in secrets if s in job.console]
    config = yaml.safe_load((job.run_dir / "config.yaml").read_text())
    assert config["model"]["extra"]["hub_token"] == "***"  # planted, and masked
    for meta in (job.run_dir / "checkpoints").glob("step_*/meta.json"):
        assert json.loads(meta.read_text())["config"]["model"]["extra"]["hub_token"] == "***"


def test_plot_draws_the_runs_metrics(job: Job, tmp_path: Path) -> None:
    from trainer.plot import main

    out = tmp_path / "metrics.png"
    figure = main([str(job.run_dir), "--out", str(out)])
    loss_axes, lr_axes = figure.axes
    lines = {line.get_label(): line for axes in figure.axes for line in axes.lines}
    assert {str(label) for label in lines if not str(label).startswith("_")} == {
        "loss",
        "val_loss",
        "lr",
        "resume",
    }
    history = [json.loads(line) for line in (job.run_dir / "history.jsonl").read_text().splitlines()]
    for axes in (loss_axes, lr_axes):  # each resume marked, at the step it resumed from
        marks = [line for line in axes.lines if line.get_linestyle() == ":"]
        assert [float(np.asarray(line.get_xdata())[0]) for line in marks] == [h["step"] for h in history[1:]]
    assert len(history) == 3
    assert lines["lr"] in lr_axes.lines
    assert lines["loss"] in loss_axes.lines
    train, evals = read_metrics(job.run_dir)
    assert list(np.asarray(lines["loss"].get_xdata())) == [r["step"] for r in train]
    assert list(np.asarray(lines["loss"].get_ydata())) == [r["loss"] for r in train]
    # The LR drawn at every step, each segment's schedule rebuilt from the run's records: what was logged.
    assert list(np.asarray(lines["lr"].get_xdata())) == list(range(1, MAX_STEPS + 1))
    assert list(np.asarray(lines["lr"].get_ydata())) == [r["lr"] for r in train]
    assert list(np.asarray(lines["val_loss"].get_xdata())) == [8, 16]
    assert list(np.asarray(lines["val_loss"].get_ydata())) == [e["val_loss"] for e in evals]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def read_terminal(master: int, proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    output, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: every writer has exited
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    return output


def test_a_terminal_gets_a_progress_bar_and_no_log_lines(tmp_path: Path, cache_dir: Path) -> None:
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 150, 0, 0))
    overrides = ["train.max_steps=6", "train.log_every=2", "train.eval_every=0", "logger.wandb.mode=disabled"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.main", *overrides],
        cwd=tmp_path,
        env=ramp_env(cache_dir),
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    try:
        screen = read_terminal(master, proc, timeout=180).decode()
        assert proc.wait(timeout=60) == 0, screen
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "\r" in screen  # the bar is redrawn in place
    draws = [part for part in re.split(r"[\r\n]", screen) if "step 6/6" in part]
    assert draws, screen
    for word in ("100%", "eta 00:00", "loss ", "lr ", "tok/s "):
        assert word in draws[-1], (word, draws[-1])
    assert "step 2/6 |" not in screen  # no log lines when a bar is shown
    assert "ramp | done: 6 steps" in screen
