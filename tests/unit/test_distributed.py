"""ramp's collective logic on two real gloo ranks in-process: what each rank contributes, what all agree on."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainer import distributed
from trainer.distributed import DistInfo
from trainer.loop import IntervalMeter
from trainer.observe.flops import memory_gb
from trainer.testing import run_distributed


def _reduce_an_interval(info: DistInfo) -> dict[str, float]:
    """Rank r saw (r + 1) * 100 tokens at a summed loss of (r + 1) * 250 over two steps; rank 1 holds
    256 MiB more memory than rank 0."""
    held = torch.ones(info.rank * 256 * 2**20 // 4)  # touched: resident
    meter = IntervalMeter(info.device)
    for _ in range(2):  # two applied steps and one dropped one
        loss = torch.tensor((info.rank + 1) * 125.0, dtype=torch.float64)
        meter.add(loss, (info.rank + 1) * 50, torch.tensor(True))
    meter.add(torch.tensor(1e9, dtype=torch.float64), 10**6, torch.tensor(False))
    meter.data_wait = 0.5 * (info.rank + 1)
    own = memory_gb(info.device)
    reduced = meter.reduce(info)
    return {**reduced, "own_memory_gb": own, "held": float(held.sum())}


def test_the_logged_loss_is_the_token_weighted_mean_over_ranks_and_memory_the_largest() -> None:
    first, second = run_distributed(_reduce_an_interval)
    assert first["loss"] == second["loss"] == pytest.approx((250 + 500) / (100 + 200), rel=1e-12)
    assert first["data_wait_s"] == pytest.approx((0.5 + 1.0) / 2 / 2)  # mean over ranks, per step
    assert first["memory_gb"] == second["memory_gb"]
    assert second["own_memory_gb"] > first["own_memory_gb"] + 0.2
    assert first["memory_gb"] == pytest.approx(second["own_memory_gb"], rel=0.02)  # the max, not the sum


def _agree(info: DistInfo) -> dict[str, Any]:
    return {
        "any_when_one_says_so": distributed.any_rank(info.rank == 1, info),
        "any_when_none_does": distributed.any_rank(False, info),
        "rank_0s_value": distributed.broadcast_object({"chosen": f"from rank {info.rank}"}, info),
        "sum": distributed.all_reduce_sum(torch.tensor([info.rank + 1.0]), info).item(),
        "max": distributed.all_reduce_max(torch.tensor([info.rank * 10.0]), info).item(),
    }


def test_ranks_agree_on_flags_objects_sums_and_maxima() -> None:
    for report in run_distributed(_agree):
        assert report == {
            "any_when_one_says_so": True,
            "any_when_none_does": False,
            "rank_0s_value": {"chosen": "from rank 0"},
            "sum": 3.0,
            "max": 10.0,
        }


def _fail_on_rank_1(info: DistInfo) -> int:
    if info.rank == 1:
        raise ValueError("rank 1 says no")
    return info.rank


def test_a_failing_rank_fails_the_call_with_its_traceback() -> None:
    with pytest.raises(RuntimeError, match="rank 1 failed") as excinfo:
        run_distributed(_fail_on_rank_1, timeout=60)
    assert "ValueError: rank 1 says no" in str(excinfo.value)
