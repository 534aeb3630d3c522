"""``python -m bench.gpu --smoke``: the GPU check's code paths on the CPU, tiny, as on the GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import gpu
from tests.helpers import REPO, ramp_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("gpu-smoke")
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)],
        cwd=REPO,
        env=ramp_env(cache_dir),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads((out / "gpu.json").read_text()), out


def test_every_part_is_recorded_with_a_status(smoke: tuple[dict[str, Any], Path]) -> None:
    report, _ = smoke
    fsdp = [f"fsdp {m.model}" for m in gpu.SMOKE.fsdp]
    expected = [
        "environment",
        "cuda_tests",
        *(m.name for m in gpu.SMOKE.measures),
        *fsdp,
        "checkpoint gpt2-tiny",
    ]
    assert list(report["parts"]) == expected
    for name, record in report["parts"].items():
        assert record["status"] in ("ok", "failed", "skipped"), name
        assert record["seconds"] >= 0, name
    assert report["mode"] == "smoke"
    assert report["elapsed_s"] < report["budget_s"]


def test_the_environment_part_names_this_machine(smoke: tuple[dict[str, Any], Path]) -> None:
    env = smoke[0]["parts"]["environment"]
    assert env["status"] == "ok", env["error"]
    assert env["device"] == "cpu"
    assert env["gpu_count"] == 0
    assert env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert env["date"].endswith("+00:00")


def test_the_cuda_tests_run_and_skip_without_a_gpu(smoke: tuple[dict[str, Any], Path]) -> None:
    record = smoke[0]["parts"]["cuda_tests"]
    assert record["status"] == "ok", record["error"]
    assert record["skipped"] >= 6  # every test of tests/unit/test_cuda.py, none failed or run
    assert record["passed"] == record["failed"] == record["errors"] == 0


def test_the_measured_parts_have_a_rate_and_a_ratio(smoke: tuple[dict[str, Any], Path]) -> None:
    for measure in gpu.SMOKE.measures:
        record = smoke[0]["parts"][measure.name]
        assert record["status"] == "ok", record["error"]
        assert record["tokens_per_s"] > 0
        assert record["bare_tokens_per_s"] > 0
        assert record["ratio"] == pytest.approx(record["tokens_per_s"] / record["bare_tokens_per_s"])
        assert 0 < record["mfu"] < 1  # against the smoke plan's nominal peak
        assert record["memory_gb"] > 0
        assert record["measured_steps"] == gpu.SMOKE.steps - gpu.SMOKE.warmup_steps
        assert record["compile"] is measure.compile


def test_the_fsdp_part_is_compared_with_ddp_and_the_bare_loop(smoke: tuple[dict[str, Any], Path]) -> None:
    parts = smoke[0]["parts"]
    for measure in gpu.SMOKE.fsdp:
        record, ddp = parts[f"fsdp {measure.model}"], parts[measure.name]
        assert record["status"] == "ok", record["error"]
        assert record["tokens_per_s"] > 0
        assert record["ratio_to_ddp"] == pytest.approx(record["tokens_per_s"] / ddp["tokens_per_s"])
        assert record["ratio"] == pytest.approx(record["tokens_per_s"] / ddp["bare_tokens_per_s"])


def test_the_checkpoint_part_times_the_three_saves(smoke: tuple[dict[str, Any], Path]) -> None:
    record = smoke[0]["parts"]["checkpoint gpt2-tiny"]
    assert record["status"] == "ok", record["error"]
    assert record["rounds"] == gpu.SMOKE.checkpoint.repeats
    for save in ("plain", "sync", "async_blocked", "async_written", "async_complete"):
        assert record[f"{save}_s"] > 0, save
    # One round: each median ratio is that round's ratio.
    assert record["async_blocked_ratio"] == pytest.approx(record["async_blocked_s"] / record["plain_s"])


def test_the_markdown_table_names_each_part(smoke: tuple[dict[str, Any], Path]) -> None:
    report, out = smoke
    text = (out / "gpu.md").read_text()
    for name in report["parts"]:
        assert f"| {name} | " in text, name
    assert "| fsdp gpt2-tiny | ok |" in text
    assert "checkpoint gpt2-tiny (1.9M parameters, median of 1 round(s)): torch.save" in text
    assert (out / "gpu.log").stat().st_size > 0
