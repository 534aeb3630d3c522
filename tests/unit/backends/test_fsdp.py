"""backend=fsdp in-process: the blocks it shards, and the configurations it refuses before any collective."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.backends.fsdp import FSDPBackend, decoder_blocks, device_mesh
from trainer.config import FSDPBackend as FSDPConfig
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.models import build_model


def ranks(world_size: int) -> DistInfo:
    return DistInfo(
        rank=0, local_rank=0, world_size=world_size, local_world_size=world_size, device=torch.device("cpu")
    )


@pytest.mark.parametrize(
    ("model", "block"), [("gpt2-tiny", "GPT2Block"), ("llama-tiny", "LlamaDecoderLayer")]
)
def test_every_decoder_block_is_found_by_no_split_modules(model: str, block: str) -> None:
    built = build_model(compose([f"model={model}"]).model, tokenizer_vocab=257, eos_id=256)
    blocks = decoder_blocks(built)
    assert [type(b).__name__ for b in blocks] == [block] * 4
    assert len({id(b) for b in blocks}) == 4


def test_a_model_without_decoder_blocks_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        decoder_blocks(nn.Sequential(nn.Linear(2, 2)))
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("backend=fsdp finds no decoder blocks in Sequential")
    assert "use backend=ddp or backend=deepspeed" in str(caught.value)


def test_a_shard_group_that_does_not_divide_the_ranks_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^backend\.shard_group_size=3 does not divide the 2 ranks"):
        device_mesh(FSDPConfig(shard_group_size=3), ranks(2))


def test_a_shard_group_below_one_is_refused_when_composed() -> None:
    with pytest.raises(ConfigError, match=r"backend\.shard_group_size=0 must be at least 1"):
        compose(["backend=fsdp", "backend.shard_group_size=0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU offload is refused only without a GPU")
def test_cpu_offload_without_a_gpu_is_refused_before_any_process_group() -> None:
    cfg = compose(["backend=fsdp", "backend.cpu_offload=true"])
    model = build_model(cfg.model, tokenizer_vocab=257, eos_id=256)
    with pytest.raises(
        ConfigError, match=r"^backend\.cpu_offload=true moves state off a GPU, and there is none"
    ):
        FSDPBackend(cfg, model, ranks(1))
    assert not torch.distributed.is_initialized()


def test_ckpt_async_with_deepspeed_is_refused_when_composed() -> None:
    with pytest.raises(ConfigError, match=r"train\.ckpt_async=true needs backend=ddp or backend=fsdp"):
        compose(["backend=deepspeed", "train.ckpt_async=true"])


def test_a_backend_name_that_contradicts_the_backend_group_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError) as raised:
        compose(["backend=fsdp", "backend.name=ddp"])
    assert str(raised.value) == (
        "backend.name=ddp contradicts the backend group's keys (FSDPBackend); choose the backend with "
        "backend=ddp, not backend.name"
    )
