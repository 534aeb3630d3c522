"""backend=deepspeed in-process: its configuration rules, the engine config ramp builds, safe loading."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from trainer.backends.deepspeed import deepspeed_config, weights_only_loads
from trainer.config import Config, DeepSpeedBackend, Offload, compose
from trainer.errors import ConfigError


def config(*overrides: str) -> Config:
    """The default config with backend=deepspeed, then ``overrides``."""
    return compose(["backend=deepspeed", *overrides])


def test_the_preset_composes_with_its_defaults() -> None:
    backend = config().backend
    assert type(backend) is DeepSpeedBackend
    assert (backend.zero_stage, backend.offload_optimizer, backend.offload_params, backend.extra) == (
        2,
        Offload.none,
        Offload.none,
        {},
    )


def test_the_deepspeed_config_comes_from_ramps_keys() -> None:
    cfg = config(
        "train.micro_batch_size=3",
        "train.grad_accum_steps=4",
        "train.max_grad_norm=0.5",
        "train.precision=bf16",
        "backend.zero_stage=3",
        "backend.offload_optimizer=cpu",
        "backend.offload_params=cpu",
        "+backend.extra.zero_optimization.reduce_bucket_size=1000",
        "+backend.extra.steps_per_print=5",
    )
    assert deepspeed_config(cfg, world_size=2) == {
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 4,
        "train_batch_size": 24,
        "gradient_clipping": 0.5,
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"},
            "reduce_bucket_size": 1000,  # extra keys merge into ramp's sections
        },
        "bf16": {"enabled": True, "check_grad_overflow": True},
        "steps_per_print": 5,
    }
    fp32 = deepspeed_config(config("train.max_grad_norm=0"), world_size=1)
    assert "bf16" not in fp32
    assert fp32["gradient_clipping"] == 0
    assert fp32["zero_optimization"] == {"stage": 2}


REFUSED = [
    (["backend.zero_stage=4"], ["backend.zero_stage=4"]),
    (["backend.offload_params=cpu"], ["backend.offload_params=cpu", "backend.zero_stage=3"]),
    (["backend.zero_stage=0", "backend.offload_optimizer=cpu"], ["backend.offload_optimizer=cpu", "ZeRO 1"]),
    (["+backend.extra.train_batch_size=64"], ["backend.extra.train_batch_size", "train.micro_batch_size"]),
    (["+backend.extra.train_micro_batch_size_per_gpu=2"], ["train.micro_batch_size"]),
    (["+backend.extra.gradient_accumulation_steps=4"], ["train.grad_accum_steps"]),
    (["+backend.extra.gradient_clipping=0.5"], ["backend.extra.gradient_clipping", "train.max_grad_norm"]),
    (["+backend.extra.bf16.enabled=true"], ["backend.extra.bf16", "train.precision"]),
    (
        ["+backend.extra.zero_optimization.stage=3"],
        ["backend.extra.zero_optimization.stage", "backend.zero_stage"],
    ),
    (["+backend.extra.zero_optimization.offload_param.device=cpu"], ["backend.offload_params"]),
    (["+backend.extra.scheduler.type=WarmupLR"], ["backend.extra.scheduler", "schedule.*"]),
    (["+backend.extra.optimizer.type=Adam"], ["backend.extra.optimizer", "optim.*"]),
    (["train.compile=true"], ["train.compile"]),
    (["+backend.extra.fp16.enabled=true"], ["train.on_nan=skip", "fp16 needs a GPU"]),
    (
        ["+backend.extra.fp16.enabled=true", "train.on_nan=skip", "train.precision=bf16"],
        ["train.precision=fp32"],
    ),
]


@pytest.mark.parametrize(("overrides", "needles"), [pytest.param(o, n, id=" ".join(o)) for o, n in REFUSED])
def test_conflicting_or_impossible_settings_are_refused(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config(*overrides)
    for needle in needles:
        assert needle in str(excinfo.value)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/ramp-deepspeed-executed-code",))


def test_deepspeed_loads_cannot_execute_code(tmp_path: Path) -> None:
    """DeepSpeed asks torch.load for weights_only=False; ramp's guard overrides it."""
    marker = Path("/tmp/ramp-deepspeed-executed-code")
    marker.unlink(missing_ok=True)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Payload()}, path)
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards
