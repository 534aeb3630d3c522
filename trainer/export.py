"""``python -m trainer.export CHECKPOINT OUT_DIR``: a checkpoint as a Hugging Face model folder.

The folder holds the transformers config and the weights as safetensors (plus the tokenizer when the
run had one), so ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads the exact trained model.
A checkpoint's weights alone also start a new run (``init.weights``, :func:`load_weights`).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from trainer.config import Config, ModelConfig
from trainer.errors import ConfigError
from trainer.models import build_model
from trainer.observe import job_log, redact
from trainer.resume import CheckpointMeta, config_changes, problem, read_meta
from trainer.schema import OnResume


def model_state(folder: Path, meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as one state dict on the CPU (ZeRO shards gathered), loaded without
    executing any code."""
    if meta.backend == "deepspeed":
        from trainer.backends.deepspeed import consolidated_state_dict

        return consolidated_state_dict(folder)
    state: dict[str, torch.Tensor] = torch.load(folder / "model.pt", weights_only=True, map_location="cpu")
    return state


def load_weights(cfg: Config, model: nn.Module, tokenizer_vocab: int) -> CheckpointMeta:
    """Load ``init.weights``'s model weights into ``model`` (built from this run's config, not yet
    wrapped by a backend); nothing else of the checkpoint. Every rank reads them; nothing is written.

    Raises:
        ConfigError: the checkpoint is unusable, or its model or tokenizer differs from this run's,
            naming the key.
    """
    folder = Path(str(cfg.init.weights))
    reason = problem(folder)
    if reason is not None:
        raise ConfigError(f"init.weights={folder} is unusable: {reason}")
    meta = read_meta(folder)
    current = {"model": redact(cfg.to_dict())["model"]}
    for change in config_changes({"model": meta.config.get("model", {})}, current):
        if change.effect is OnResume.refused:
            raise ConfigError(
                f"init.weights: {change.key} is {change.old} in {folder} but {change.new} here; the weights fit "
                f"only the same model: keep {change.key}={change.old}"
            )
    if meta.tokenizer_vocab != tokenizer_vocab:
        raise ConfigError(
            f"init.weights: {folder} was trained with a tokenizer of {meta.tokenizer_vocab} tokens, this run's "
            f"data.* gives {tokenizer_vocab}; use the same tokenizer (data.tokenizer)"
        )
    model.load_state_dict(model_state(folder, meta))
    job_log.info(
        "ramp | weights from %s (step %d): fresh optimizer, the schedule from step %d, the data %s",
        folder,
        meta.step,
        cfg.init.step + 1,
        "from its start" if cfg.init.data == "fresh" else "from the checkpoint's position",
    )
    return meta


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
    model.load_state_dict(model_state(checkpoint, meta))  # ZeRO shards gathered into one fp32 state dict
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
