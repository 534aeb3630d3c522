"""What every training contender shares: the model shape, the batch, the optimizer, the schedule.

The contenders are separate scripts so each is measured from its own process start, and each
prints the same two event lines that the driver times::

    BENCH step 1      (the first optimizer step is done)
    BENCH step K      (the last one is done)

By default they train the bench's gpt2-tiny on the CPU in fp32. The GPU check (``bench.gpu``) also
names a model preset (``--model``, any ``conf/model/*.yaml``), its vocabulary, the device, bf16
autocast and torch.compile, and asks for the rate after ``--warmup-steps`` (one more line, see
:func:`measured`).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class ModelShape(TypedDict):
    """The keyword arguments of ``AutoConfig.for_model`` that shape the model."""

    model_type: str
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int
    resid_pdrop: float
    embd_pdrop: float
    attn_pdrop: float
    use_cache: bool


# ramp's gpt2-tiny preset exactly: no dropout (model.dropout=0.0), and no key/value cache while training
# (transformers' defaults, dropout 0.1 and use_cache=True, would make a different and slower model).
MODEL: ModelShape = {
    "model_type": "gpt2",
    "n_embd": 192,
    "n_layer": 4,
    "n_head": 4,
    "n_positions": 512,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "use_cache": False,
}
VOCAB = 320  # the byte tokenizer's 257 tokens, padded to a multiple of 64 as ramp does
EOS = 256
LR = 6e-4
WARMUP = 5
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0


def args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options every contender takes: the token file, steps, micro-batch, sequence length, seed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", required=True, help="a flat uint16 token file (ramp's train.bin)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--model", default=None, help="a ramp model preset; default: the bench's gpt2-tiny")
    parser.add_argument("--vocab-size", type=int, default=None, help="default: the byte tokenizer's, padded")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="the forward pass under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=0,
        help="when > 0: print the rate after these steps (BENCH measured)",
    )
    return parser.parse_args(argv)


def model_config(preset: str | None, vocab_size: int | None) -> PretrainedConfig:
    """The transformers config of the model to train: the bench's gpt2-tiny (:data:`MODEL`) when
    ``preset`` is None, else ramp's preset ``conf/model/<preset>.yaml`` exactly as ramp builds it."""
    from transformers import AutoConfig

    vocab = vocab_size or VOCAB
    if preset is None:
        return AutoConfig.for_model(**MODEL, vocab_size=vocab, bos_token_id=EOS, eos_token_id=EOS)
    import yaml

    from trainer.config import ModelConfig, conf_dir
    from trainer.models import hf_config_kwargs

    fields = yaml.safe_load((conf_dir() / "model" / f"{preset}.yaml").read_text())
    fields.pop("defaults", None)
    cfg = ModelConfig(**fields)
    config = AutoConfig.for_model(cfg.arch, **hf_config_kwargs(cfg, vocab, EOS))
    config._attn_implementation = "sdpa"  # as trainer.models.build_model sets it
    return config


def measured(tokens_per_s: float, memory_gb: float, steps: int) -> None:
    """Print ``BENCH measured tokens_per_s=<x> memory_gb=<y> steps=<n>``: the rate over the last ``steps``."""
    print(
        f"BENCH measured tokens_per_s={tokens_per_s:.3f} memory_gb={memory_gb:.4f} steps={steps}", flush=True
    )


def leave() -> None:
    """End the process at once: torch 2.13 with gloo aborts at exit about 1 run in 10 otherwise."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def event(step: int) -> None:
    """Print the ``BENCH step <step>`` line the driver times, flushed."""
    print(f"BENCH step {step}", flush=True)
    sys.stdout.flush()
