"""Distributed behaviour with real gloo processes under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO, run_worker

pytestmark = pytest.mark.slow


def test_gradients_sync_only_on_the_last_micro_batch(tmp_path: Path, cache_dir: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {"RAMP_TEST_REPORT": str(report_path)}
    run_worker("ddp_sync.py", [str(REPO / "conf")], cwd=tmp_path, cache_dir=cache_dir, env=env)
    report = json.loads(report_path.read_text())
    # Accumulation micro-steps: no communication, and each rank holds its own gradients.
    assert report["calls_after_micro_0"] == 0 and report["calls_after_micro_1"] == 0
    assert report["grads_equal_after_micro_0"] is False and report["grads_equal_after_micro_1"] is False
    # The last micro-step all-reduces every bucket once; the ranks then agree.
    assert report["calls_after_micro_2"] >= 1
    assert report["grads_equal_after_micro_2"] is True
    assert report["params_equal_after_step"] is True
