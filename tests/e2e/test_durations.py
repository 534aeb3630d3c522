"""Lengths in tokens and epochs end to end on 2 ranks: the same steps, at exactly the same LRs, as the run
given in steps, and the records say where each step stands in every unit."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import read_metrics, run_ramp

pytestmark = pytest.mark.slow

COMMON = [
    "train.seq_len=64",
    "train.micro_batch_size=4",
    "train.log_every=1",
    "train.eval_every=0",
    "logger.wandb.mode=disabled",
]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def series(run_dir: Path) -> list[tuple[Any, ...]]:
    keys = ("step", "lr", "lr/decay", "loss", "grad_norm", "tokens", "samples", "global_batch", "epoch")
    return [tuple(r[k] for k in keys) for r in read_metrics(run_dir)[0]]


def test_a_run_in_tokens_is_the_run_in_steps(tmp_path: Path, cache_dir: Path) -> None:
    """2 ranks x 4 sequences x 64 tokens: 512 tokens a step; 6,144 tokens are 12 steps, 1,536 warm up 3."""
    by_steps = [*COMMON, "schedule=cosine", "train.max_steps=12", "schedule.warmup_steps=3", "run.name=steps"]
    by_tokens = [*COMMON, "schedule=cosine", "train.max_tokens=6144", "schedule.warmup_tokens=1.536k"]
    ok(run_ramp(by_steps, cwd=tmp_path, cache_dir=cache_dir))
    result = ok(run_ramp([*by_tokens, "run.name=tokens"], cwd=tmp_path, cache_dir=cache_dir))
    assert "length 12 steps = 6,144 tokens = 96 samples" in result.stdout
    assert "warmup 3 steps = 1,536 tokens = 24 samples" in result.stdout
    assert series(tmp_path / "outputs" / "tokens") == series(tmp_path / "outputs" / "steps")
    records = read_metrics(tmp_path / "outputs" / "tokens")[0]
    assert [(r["tokens"], r["samples"], r["global_batch"]) for r in records] == [
        (512 * k, 8 * k, 8) for k in range(1, 13)
    ]


def test_a_run_in_epochs_is_the_run_in_the_steps_the_hf_trainer_counts(
    tmp_path: Path, cache_dir: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:6]:
        (corpus / f"{path.stem}.txt").write_bytes(path.read_bytes())
    data = ["data=text", f"data.files={corpus}", "data.val_fraction=0.2"]
    by_epochs = [
        *COMMON,
        *data,
        "schedule=warmup_stable_decay",
        "train.epochs=0.5",
        "schedule.warmup_epochs=0.1",
    ]
    result = ok(run_ramp([*by_epochs, "run.name=epochs"], cwd=tmp_path, cache_dir=cache_dir))
    records = read_metrics(tmp_path / "outputs" / "epochs")[0]
    steps, warmup = len(records), int(result.stdout.split("| warmup ")[1].split(" steps")[0])
    by_steps = [*COMMON, *data, "schedule=warmup_stable_decay", f"train.max_steps={steps}"]
    ok(
        run_ramp(
            [*by_steps, f"schedule.warmup_steps={warmup}", "run.name=steps"],
            cwd=tmp_path,
            cache_dir=cache_dir,
        )
    )
    assert series(tmp_path / "outputs" / "epochs") == series(tmp_path / "outputs" / "steps")
    assert 0.45 < records[-1]["epoch"] < 0.55  # half a pass over the training samples
