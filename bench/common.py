"""What every training contender shares: the model shape, the batch, the optimizer, the schedule.

The contenders are separate scripts so each is measured from its own process start, and each
prints the same two event lines that the driver times::

    BENCH step 1      (the first optimizer step is done)
    BENCH step K      (the last one is done)
"""

from __future__ import annotations

import argparse
import sys
from typing import TypedDict


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
    return parser.parse_args(argv)


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
