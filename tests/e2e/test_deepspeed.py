"""backend=deepspeed end to end: parity with DDP on ZeRO 0-3, the LR DeepSpeed really applies,
non-finite updates, resuming only where the shards fit, and export from a ZeRO 3 checkpoint.

The slow tests share one 2-rank torchrun job (tests/e2e/workers/deepspeed_parity.py) that trains every
configuration through ramp's real loop, so DeepSpeed's start-up is paid once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import checkpoint_weights, read_metrics, run_export, run_ramp, run_worker
from trainer.errors import ConfigError
from trainer.resume import read_meta

STAGES = (0, 1, 2, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on the CPU only")
def test_fp16_on_the_cpu_stops_with_one_clear_line(tmp_path: Path, cache_dir: Path) -> None:
    result = run_ramp(
        ["backend=deepspeed", "+backend.extra.fp16.enabled=true", "train.on_nan=skip"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
        timeout=120,
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ramp: error: backend.extra.fp16.enabled=true: DeepSpeed does not support fp16 on")
    assert "train.precision=bf16" in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------------
# One 2-rank job: DDP and DeepSpeed ZeRO 0-3, grad_accum_steps 1 and 3 (tests/workers/deepspeed_parity.py)

MAX_STEPS = 6
ZERO_RUNS = [f"deepspeed-zero{z}-accum{a}" for a in (1, 3) for z in STAGES]
DEEPSPEED_RUNS = [*ZERO_RUNS, "deepspeed-zero3-offload-accum3", "deepspeed-zero2-bf16-accum1"]


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("parity")
    run_worker("deepspeed_parity.py", [str(root)], cwd=root, cache_dir=cache_dir, timeout=280)
    return root, json.loads((root / "report.json").read_text())


def train_records(root: Path, name: str) -> list[dict[str, Any]]:
    records, _ = read_metrics(root / name)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1)), name
    return records


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", [*ZERO_RUNS, "deepspeed-zero3-offload-accum3"])
def test_zero_stages_match_ddp(name: str, parity: tuple[Path, dict[str, Any]]) -> None:
    """fp32, 2 ranks: identical LR series, losses within 1e-5 relative, the same tokens."""
    root, report = parity
    ddp = train_records(root, f"ddp-accum{name[-1]}")
    ours = train_records(root, name)
    assert [r["lr"] for r in ours] == [r["lr"] for r in ddp] == report[name]["schedule"]
    assert [r["lr/decay"] for r in ours] == [r["lr/no_decay"] for r in ours] == [r["lr"] for r in ours]
    assert [r["tokens"] for r in ours] == [r["tokens"] for r in ddp]
    for mine, theirs in zip(ours, ddp, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4), mine["step"]
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.5  # it trains
    # Evaluation runs through the bare module (ZeRO 3 gathers each layer's weights as it goes).
    _, our_evals = read_metrics(root / name)
    _, ddp_evals = read_metrics(root / f"ddp-accum{name[-1]}")
    assert [e["step"] for e in our_evals] == [e["step"] for e in ddp_evals] == [3, 6]
    for mine, theirs in zip(our_evals, ddp_evals, strict=True):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bf16_trains_like_fp32(parity: tuple[Path, dict[str, Any]]) -> None:
    root, report = parity
    # bf16 really is on: the engine runs its bf16 mode and holds the weights it computes with in bf16.
    assert report["deepspeed-zero2-bf16-accum1"]["bf16"] is True
    assert report["deepspeed-zero2-bf16-accum1"]["weight_dtype"] == "torch.bfloat16"
    assert report["deepspeed-zero2-accum1"]["bf16"] is False
    assert report["deepspeed-zero2-accum1"]["weight_dtype"] == "torch.float32"
    bf16 = train_records(root, "deepspeed-zero2-bf16-accum1")
    fp32 = train_records(root, "ddp-accum1")
    assert [r["lr"] for r in bf16] == [r["lr"] for r in fp32]
    for mine, theirs in zip(bf16, fp32, strict=True):
        assert math.isfinite(mine["loss"])
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=0.02)


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", DEEPSPEED_RUNS)
def test_deepspeed_applies_exactly_the_schedules_lr_once_per_step(
    name: str, parity: tuple[Path, dict[str, Any]]
) -> None:
    """Recorded inside the torch optimizer's step, each time DeepSpeed really called it."""
    _, report = parity
    run = report[name]
    applied: list[dict[str, Any]] = run["applied"]
    steps = [call["step"] for call in applied]
    assert sorted(set(steps)) == list(range(1, MAX_STEPS + 1))
    per_step = [steps.count(k) for k in range(1, MAX_STEPS + 1)]
    assert len(set(per_step)) == 1, f"optimizer calls per step vary (accumulation leaked): {per_step}"
    for k in range(1, MAX_STEPS + 1):
        groups: dict[str, float] = {}
        for call in applied:
            if call["step"] == k:
                groups.update(call["lrs"])
        assert groups == {"decay": run["schedule"][k - 1], "no_decay": run["schedule"][k - 1]}, k
    # Nothing else holds or steps a scheduler: the engine counted exactly ramp's optimizer steps.
    assert run["engine_steps"] == MAX_STEPS
    assert run["engine_scheduler"] == run["client_scheduler"] == "None"


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [0, 3])
def test_a_non_finite_gradient_never_reaches_weights_or_moments(
    stage: int, parity: tuple[Path, dict[str, Any]]
) -> None:
    _, report = parity
    nan = report[f"nan-zero{stage}"]
    assert nan["clean_applied"]
    assert nan["clean_norm_finite"]
    assert nan["applied"] is False
    assert not math.isfinite(nan["norm"])
    assert nan["weights_untouched"]
    assert nan["moments_untouched"]
    assert nan["applied_after"]
    assert nan["weights_changed_after"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_export_from_a_zero3_checkpoint(
    parity: tuple[Path, dict[str, Any]], tmp_path: Path, cache_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from trainer.export import load_model

    root, _ = parity
    ckpt = root / "deepspeed-zero3-accum1" / "checkpoints" / f"step_{MAX_STEPS}"
    assert json.loads((ckpt / "meta.json").read_text())["backend"] == "deepspeed"
    out = tmp_path / "hf"
    run_export(ckpt, out, cache_dir)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    consolidated = load_model(ckpt)
    tokens = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, consolidated(tokens).logits)
    # The gathered shards are the trained model: DDP trained the same one (to Adam's rounding).
    ddp = checkpoint_weights(root / "ddp-accum1" / "checkpoints" / f"step_{MAX_STEPS}")
    weights = exported.state_dict()
    assert set(ddp) <= set(weights)
    for key, value in ddp.items():
        assert (weights[key] - value).abs().max() <= 1e-3 * value.abs().max(), key


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_checkpoint_resumes_only_where_its_shards_fit(
    parity: tuple[Path, dict[str, Any]], tmp_path: Path, cache_dir: Path
) -> None:
    """Another backend, another stage or another rank count: refused, naming what to set."""
    from trainer.backends.deepspeed import check_resumable

    root, _ = parity
    ckpt = root / "deepspeed-zero3-accum1" / "checkpoints" / f"step_{MAX_STEPS}"
    meta = read_meta(ckpt)
    check_resumable(ckpt, meta, zero_stage=3, world_size=2)
    with pytest.raises(ConfigError, match=r"resume it with backend\.zero_stage=3"):
        check_resumable(ckpt, meta, zero_stage=2, world_size=2)
    with pytest.raises(ConfigError, match="holds DeepSpeed shards for 2 ranks; resume it on 2 ranks"):
        check_resumable(ckpt, meta, zero_stage=3, world_size=4)
    ddp_ckpt = root / "ddp-accum1" / "checkpoints" / f"step_{MAX_STEPS}"
    with pytest.raises(ConfigError, match="holds no deepspeed/ folder"):
        check_resumable(ddp_ckpt, read_meta(ddp_ckpt), zero_stage=3, world_size=2)
    # As a user meets it: DDP asked to resume DeepSpeed shards stops with one line.
    result = run_ramp(
        ["backend=ddp", f"run.resume={ckpt}", "logger.wandb.mode=disabled"],
        cwd=tmp_path,
        cache_dir=cache_dir,
        nproc=0,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ramp: error: run.resume: ")
    assert "backend.name is deepspeed in" in last
    assert "keep backend=deepspeed" in last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_consolidates_to_the_trained_weights(
    stage: int, parity: tuple[Path, dict[str, Any]]
) -> None:
    from trainer.backends.deepspeed import consolidated_state_dict

    root, _ = parity
    ckpt = root / f"deepspeed-zero{stage}-accum3" / "checkpoints" / f"step_{MAX_STEPS}"
    state = consolidated_state_dict(ckpt)
    ddp = checkpoint_weights(root / "ddp-accum3" / "checkpoints" / f"step_{MAX_STEPS}")
    assert set(state) == set(ddp)
    for key, value in ddp.items():
        assert state[key].dtype == torch.float32
        assert (state[key] - value).abs().max() <= 1e-3 * value.abs().max(), key
