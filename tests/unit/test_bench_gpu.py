"""bench.gpu's machinery without a GPU: parts that fail or run out of time, commands, ramp's rate."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import gpu


def fine() -> dict[str, Any]:
    return {"tokens_per_s": 100.0}


def test_a_part_that_raises_is_recorded_as_failed_and_the_next_part_still_runs() -> None:
    ran: list[str] = []

    def broken() -> dict[str, Any]:
        raise ValueError("the device caught fire")

    def after() -> dict[str, Any]:
        ran.append("after")
        return fine()

    def absent() -> dict[str, Any]:
        raise gpu.Skipped("no fsdp backend")

    parts = [gpu.Part("broken", broken), gpu.Part("after", after), gpu.Part("fsdp", absent)]
    reports: list[list[str]] = []
    results = gpu.run_parts(parts, gpu.Budget(60), lambda done: reports.append(list(done)))
    assert results["broken"]["status"] == "failed"
    assert "ValueError: the device caught fire" in results["broken"]["error"]  # the traceback's last lines
    assert ran == ["after"]
    assert all(isinstance(record.pop("seconds"), float) for record in results.values())
    assert results["after"] == {"status": "ok", "error": None, "tokens_per_s": 100.0}
    assert results["fsdp"] == {"status": "skipped", "reason": "no fsdp backend", "error": None}
    assert reports == [["broken"], ["broken", "after"], ["broken", "after", "fsdp"]]  # written after each


def test_a_part_that_failed_after_measuring_keeps_its_numbers() -> None:
    def half() -> dict[str, Any]:
        raise gpu.PartFailed("the bare loop failed; ramp was measured\nexit 1", {"tokens_per_s": 5.0})

    record = gpu.run_part(gpu.Part("half", half), gpu.Budget(60))
    assert record["status"] == "failed"
    assert record["tokens_per_s"] == 5.0
    assert gpu.status_text(record) == "failed: exit 1"


def test_parts_the_budget_cannot_hold_are_skipped_out_of_time() -> None:
    budget = gpu.Budget(10, started=time.monotonic() - 8)  # 2 s left
    results = gpu.run_parts([gpu.Part("quick", fine), gpu.Part("long", fine, needs_s=30)], budget)
    assert results["quick"]["status"] == "ok"
    assert results["long"] == {"status": "skipped", "reason": "out of time", "error": None, "seconds": 0.0}
    assert gpu.status_text(results["long"]) == "skipped: out of time"


def runner(tmp_path: Path, seconds: float = 60) -> gpu.Runner:
    return gpu.Runner(gpu.Budget(seconds), tmp_path / "gpu.log", gpu.command_env())


def test_a_command_that_fails_reports_its_exit_and_last_lines(tmp_path: Path) -> None:
    code = "print('\\n'.join(f'line {i}' for i in range(100))); raise SystemExit(3)"
    with pytest.raises(gpu.CommandFailed, match="exit 3") as failure:
        runner(tmp_path).run([sys.executable, "-c", code], cap=60)
    assert str(failure.value).endswith("line 99")
    assert "line 60" not in str(failure.value)  # only the tail
    assert "line 0\n" in (tmp_path / "gpu.log").read_text()  # the log has it all


def test_a_command_past_its_time_is_killed(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(gpu.CommandFailed, match="timed out after 1 s"):
        runner(tmp_path).run([sys.executable, "-c", "import time; time.sleep(60)"], cap=1)
    assert time.monotonic() - started < 30


def test_a_command_is_cut_to_the_budget_left(tmp_path: Path) -> None:
    with pytest.raises(gpu.CommandFailed, match="out of time"):
        runner(tmp_path, seconds=gpu.RESERVE_S).run([sys.executable, "-c", "pass"], cap=60)


def test_stop_at_ends_a_command_once_its_line_appears(tmp_path: Path) -> None:
    code = "print('step 3/3 | loss 1.0', flush=True); import time; time.sleep(60)"
    started = time.monotonic()
    output = runner(tmp_path).run([sys.executable, "-c", code], cap=60, stop_at=r"\bstep 3/3\b")
    assert output == "step 3/3 | loss 1.0\n"
    assert time.monotonic() - started < 30


def test_ramp_rate_weights_each_record_by_its_interval_after_the_warm_up(tmp_path: Path) -> None:
    records = [
        {"step": 1, "tokens": 100, "tokens_per_s": 1.0, "mfu": 0.01, "memory_gb": 9.0},  # compiling
        {"step": 2, "tokens": 200, "tokens_per_s": 100.0, "mfu": 0.1, "memory_gb": 2.0},
        {"step": 3, "tokens": 300, "tokens_per_s": 50.0, "mfu": 0.05, "memory_gb": 2.5},
        {"step": 3, "val_loss": 1.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rate = gpu.ramp_rate(tmp_path, warmup_steps=1)
    assert rate["tokens_per_s"] == pytest.approx(200 / 3)  # 200 tokens in 1 s + 2 s
    assert rate["mfu"] == pytest.approx((0.1 * 1 + 0.05 * 2) / 3)  # the same ratio as the rate
    assert rate["memory_gb"] == 9.0  # the peak of the whole run
    assert rate["measured_steps"] == 2
    with pytest.raises(RuntimeError, match="no training record after step 3"):
        gpu.ramp_rate(tmp_path, warmup_steps=3)


def test_markdown_names_every_part_and_shows_each_error() -> None:
    parts = {
        "environment": {"status": "ok", "error": None, "seconds": 0.1},
        "gpt2-124m compile=off": {"status": "failed", "error": "Traceback\nOOM", "seconds": 3.0},
        "fsdp": {"status": "skipped", "reason": "no fsdp backend", "error": None, "seconds": 0.0},
    }
    report = {"mode": "gpu", "budget_s": 480, "elapsed_s": 3.1, "notes": ["a note"], "parts": parts}
    text = gpu.markdown(report)
    assert "| gpt2-124m compile=off | failed: OOM |" in text
    assert "| fsdp | skipped: no fsdp backend |" in text
    assert "## gpt2-124m compile=off: error" in text
    assert "- a note" in text


def test_markdown_gives_the_fsdp_ratio_to_ddp_and_the_checkpoint_times() -> None:
    fsdp = {"status": "ok", "error": None, "seconds": 40.0, "tokens_per_s": 190000.0, "ratio_to_ddp": 0.95}
    saves = {"plain_s": 2.0, "sync_s": 3.0, "async_blocked_s": 0.5, "async_written_s": 2.5}
    saves |= {
        "async_complete_s": 0.4,
        "sync_ratio": 1.5,
        "async_blocked_ratio": 0.25,
        "async_written_ratio": 1.25,
    }
    checkpoint = {"status": "ok", "error": None, "seconds": 30.0, "parameters_m": 124.4, "rounds": 5, **saves}
    parts = {"fsdp gpt2-124m": fsdp, "checkpoint gpt2-124m": checkpoint}
    text = gpu.markdown({"mode": "gpu", "budget_s": 480, "elapsed_s": 70.0, "notes": [], "parts": parts})
    assert "| fsdp gpt2-124m | ok | 40 | 190,000 |  |  |  |  | 0.950 |" in text
    assert "| checkpoint gpt2-124m | ok | 30 |" in text
    assert (
        "torch.save 2.000 s; ramp's sync DCP save 3.000 s (x1.50); its async DCP save blocks 0.500 s (x0.25)"
        in text
    )


def test_the_smoke_plan_runs_what_the_gpu_plan_runs_on_tiny_models() -> None:
    assert gpu.GPU.precision == gpu.SMOKE.precision == "bf16"
    assert {m.compile for m in gpu.GPU.measures} == {m.compile for m in gpu.SMOKE.measures}
    assert [m.name for m in gpu.GPU.measures] == [
        "gpt2-124m compile=off",
        "llama-1b compile=off",
        "gpt2-124m compile=on",
        "llama-1b compile=on",
    ]
    assert gpu.SMOKE.warmup_steps < gpu.SMOKE.steps
    assert gpu.GPU.warmup_steps < gpu.GPU.steps
    for plan in (gpu.GPU, gpu.SMOKE):  # FSDP2 runs configurations that DDP and the bare loop run too
        assert all(m in plan.measures and not m.compile for m in plan.fsdp)
    assert [m.model for m in gpu.GPU.fsdp] == ["gpt2-124m", "llama-1b"]
    assert gpu.GPU.checkpoint.model == "gpt2-124m"
    assert gpu.GPU.checkpoint.vocab_size == 50304


def test_only_picks_parts_by_name_or_pattern(tmp_path: Path) -> None:
    names = [part.name for part in gpu.build_parts(gpu.GPU, runner(tmp_path), tmp_path, {})]
    assert names == [
        "environment",
        "cuda_tests",
        *(m.name for m in gpu.GPU.measures),
        "fsdp gpt2-124m",
        "fsdp llama-1b",
        "checkpoint gpt2-124m",
    ]
    only = ["environment", "gpt2-124m compile=off", "fsdp *", "checkpoint *"]
    picked = gpu.build_parts(gpu.GPU, runner(tmp_path), tmp_path, {}, only)
    assert [part.name for part in picked] == [
        "environment",
        "gpt2-124m compile=off",
        "fsdp gpt2-124m",
        "fsdp llama-1b",
        "checkpoint gpt2-124m",
    ]
    assert gpu.options(["--only", "environment, fsdp *"]).only == ["environment", "fsdp *"]
