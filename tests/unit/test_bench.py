"""The CPU benchmarks' machinery, cheaply: bench.train's contenders and one round of bench.checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import checkpoint as checkpoint_bench
from bench import train as train_bench
from trainer import checkpoint
from trainer.distributed import DistInfo


def test_fsdp2_is_a_contender_next_to_ddp_and_the_control_comes_last(tmp_path: Path) -> None:
    field = train_bench.contenders(tmp_path / "train.bin", 30, 8, 256, 2)
    names = [c.name for c in field]
    assert names[:3] == ["bare", "ramp", "fsdp"]
    assert names[-1] == "control"
    assert field[0].module == field[-1].module == "bench.bare_loop"  # the reference, then its control
    ddp, fsdp = field[1], field[2]
    assert fsdp.module == "trainer.main"
    assert fsdp.args == [*ddp.args, "backend=fsdp"]  # the same run but for the backend
    assert [c.label[:3] for c in field] == [f"({letter})" for letter in "abcdef"[: len(field)]]


def test_a_round_times_each_save_and_completes_the_async_one_before_the_next(
    tmp_path: Path, alone: DistInfo
) -> None:
    backend = checkpoint_bench.trained_backend("gpt2-tiny", None, alone)
    timings = checkpoint_bench.Timings()
    for index in range(3):  # each of the three saves comes first once
        checkpoint_bench.run_round(backend, tmp_path, index, alone, timings)
    assert all(len(seconds) == 3 and min(seconds) > 0 for seconds in asdict(timings).values())
    assert all(b < w for b, w in zip(timings.async_blocked, timings.async_written, strict=True))
    root = tmp_path / "checkpoints"
    # Six ramp saves, synchronous and asynchronous by turns: every one completed, the newest two kept.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_5", "step_6"]
    assert (root / "latest").read_text() == "step_6"
    meta = json.loads((root / "step_6" / "meta.json").read_text())
    assert any(name.startswith("dcp/") for name in meta["files"])
    assert checkpoint.verify(root / "step_6", meta["files"]) is None
    assert not (tmp_path / "plain.pt").exists()
    summary = checkpoint_bench.summary(timings)
    assert summary["async_blocked_s"] == pytest.approx(sorted(timings.async_blocked)[1])
    assert summary["sync_ratio"] > 0
