"""``python -m trainer.export CHECKPOINT OUT_DIR``: a checkpoint as a Hugging Face model folder.

The folder holds the transformers config and the weights as safetensors (plus the tokenizer when the
run had one), so ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads the exact trained model.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.errors import ConfigError
from trainer.models import build_model
from trainer.resume import problem, read_meta


def load_model(checkpoint: Path) -> nn.Module:
    """The checkpoint's model on the CPU, weights loaded without executing any code.

    Raises:
        ConfigError: the checkpoint is missing, damaged or not a ramp checkpoint.
    """
    reason = problem(checkpoint)
    if reason is not None:
        raise ConfigError(f"CHECKPOINT {checkpoint} is unusable: {reason}")
    meta = read_meta(checkpoint)
    model_cfg = ModelConfig(**meta.config["model"])
    model = build_model(model_cfg, tokenizer_vocab=meta.tokenizer_vocab, eos_id=meta.eos_id)
    if meta.backend == "deepspeed":
        # Sharded by ZeRO across the ranks that wrote it: gathered into one fp32 state dict here.
        from trainer.backends.deepspeed import consolidated_state_dict

        state = consolidated_state_dict(checkpoint)
    else:
        state = torch.load(checkpoint / "model.pt", weights_only=True, map_location="cpu")
    model.load_state_dict(state)
    return model.eval()


def export(checkpoint: Path, out_dir: Path) -> None:
    """Write ``checkpoint``'s model (and the run's tokenizer) as a Hugging Face folder ``out_dir``.

    Raises:
        ConfigError: ``out_dir`` is not empty, or the checkpoint is unusable.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"OUT_DIR {out_dir} is not empty; choose a new folder (nothing was overwritten)")
    model = load_model(checkpoint)
    model.save_pretrained(out_dir, safe_serialization=True)  # type: ignore[operator]
    tokenizer = checkpoint.parent.parent / "tokenizer.json"
    if tokenizer.exists():
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(tokenizer)).save_pretrained(out_dir)
        shutil.copy(tokenizer, out_dir / "tokenizer.json")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 (with one ``ramp: error:`` line) on bad input."""
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint folder: RUN_DIR/checkpoints/step_<N>")
    parser.add_argument("out_dir", type=Path, help="the Hugging Face model folder to write")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir)
    except ConfigError as err:
        print(f"ramp: error: {err}", file=sys.stderr)
        return 2
    print(f"ramp | exported {args.checkpoint} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
