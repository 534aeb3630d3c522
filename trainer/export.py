"""``python -m trainer.export CHECKPOINT OUT_DIR``: a checkpoint as a Hugging Face model folder.

CHECKPOINT is a ``checkpoints/step_<N>`` folder, or a run folder, its ``checkpoints`` folder or
``checkpoints/latest``: then the newest complete checkpoint in it, chosen as a resume chooses it
(past a damaged one, saying so). The folder holds the transformers config and the weights as
safetensors (``--dtype bf16``: cast to bfloat16), the run's tokenizer (for ``data.tokenizer=bytes``, a
byte-level tokenizer.json with ramp's ids), configured for use: its end-of-document token as
``eos_token``, ``pad_token`` and (unless it has its own) ``bos_token``, and the model's positions as
``model_max_length``; the model's config and generation config carry the same ids. A model card
(``README.md``, :mod:`trainer.model_card`) says what was trained and how.
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` loads the exact trained model. A checkpoint's weights
alone also start a new run (``init.weights``, :func:`load_weights`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer import checkpoint as ckpt
from trainer.config import Config, ModelConfig
from trainer.data.tokenizer import ByteTokenizer
from trainer.distributed import DistInfo
from trainer.errors import ConfigError
from trainer.models import build_model
from trainer.observe import job_log, redact, setup_logging
from trainer.resume import CheckpointMeta, RunPlan, Start, choose, config_changes, problem, read_meta
from trainer.schema import OnResume

WHAT_TO_PASS = "pass a run folder (outputs/<run>), its checkpoints folder or a checkpoints/step_<N> folder"

BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
"""A tokenizer's own beginning-of-text token, by its usual names; without one, the end-of-document
token is ``bos_token`` as well (GPT-2's convention)."""
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
"""A tokenizer's own padding token, by its usual names; without one, the end-of-document token pads
(usual for causal LMs: padded positions are masked anyway)."""


def model_state(folder: Path, meta: CheckpointMeta) -> dict[str, torch.Tensor]:
    """A checkpoint's model weights as one state dict on the CPU (ZeRO's or FSDP2's shards gathered, from
    any number of ranks), loaded without executing any code."""
    if meta.backend == "deepspeed":
        from trainer.backends.deepspeed import consolidated_state_dict

        return consolidated_state_dict(folder)
    from trainer.backends.state import full_model_state

    return full_model_state(folder)


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


def find_checkpoint(path: Path) -> Path:
    """The checkpoint ``path`` names: a ``step_<N>`` folder as it is (checked when loaded, never swapped for
    another); a run folder, its ``checkpoints`` folder or ``checkpoints/latest``: the newest complete
    checkpoint in it, verified as a resume verifies it (:func:`trainer.resume.choose`: past a damaged
    one, with a warning).

    Raises:
        ConfigError: ``path`` does not exist, or holds no complete checkpoint.
    """
    if not path.exists():
        raise ConfigError(f"CHECKPOINT {path} does not exist; {WHAT_TO_PASS}")
    if path.name == ckpt.LATEST and path.is_file():  # the pointer: its folder holds what it points at
        path = path.parent
    if (path / ckpt.META).exists() or path.name.startswith(ckpt.PREFIX):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    one_process = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    start = choose(RunPlan(root, ckpt.complete_checkpoints(root)), one_process)
    if start is None:
        raise ConfigError(f"CHECKPOINT {path} holds no complete checkpoint; {WHAT_TO_PASS}")
    return start.path


@dataclass(frozen=True)
class SpecialTokens:
    """The exported tokenizer's special tokens, as text and as ids."""

    eos: str
    bos: str
    pad: str
    eos_id: int
    bos_id: int
    pad_id: int


def special_tokens(tokenizer_file: Path, eos_id: int) -> SpecialTokens:
    """The run's end-of-document token (``eos_id``, from the checkpoint) as ``eos``; the tokenizer's own
    beginning-of-text and padding tokens (its ``padding`` setting, else one of :data:`BOS_CANDIDATES` /
    :data:`PAD_CANDIDATES` among its special tokens), each else the end-of-document token.

    Raises:
        ConfigError: ``eos_id`` is not in the tokenizer (the run folder's tokenizer.json was replaced).
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = tokenizer.id_to_token(eos_id)
    if eos is None:
        raise ConfigError(
            f"{tokenizer_file} has no token {eos_id}, the checkpoint's end-of-document token: it is not the "
            "tokenizer the run trained with; put that run's tokenizer.json back"
        )
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    bos = next((name for name in BOS_CANDIDATES if name in special), eos)
    pad = (tokenizer.padding or {}).get("pad_token")  # a tokenizer.json may set its padding
    if pad not in vocab:
        pad = next((name for name in PAD_CANDIDATES if name in special), eos)
    return SpecialTokens(eos, bos, pad, eos_id, vocab[bos], vocab[pad])


def _save_tokenizer(
    tokenizer_file: Path, tokens: SpecialTokens, positions: int, out_dir: Path, split_special: bool = False
) -> None:
    """The run's tokenizer.json, byte for byte, with a tokenizer_config.json naming its special tokens and
    ``model_max_length`` (the model's positions); ``split_special``: a special token's text in a document
    is encoded as ordinary text (``split_special_tokens``), as ramp's byte tokenizer encodes it."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        eos_token=tokens.eos,
        bos_token=tokens.bos,
        pad_token=tokens.pad,
        model_max_length=positions,
        split_special_tokens=split_special,
    ).save_pretrained(out_dir)
    shutil.copy(tokenizer_file, out_dir / "tokenizer.json")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``--dtype``: the weights as trained (fp32), or cast to bfloat16 (half the size, bf16's rounding)."""


def run_folder(checkpoint: Path) -> Path:
    """The run folder of a ``checkpoints/step_<N>`` folder: its tokenizer.json, metrics.jsonl, config.yaml."""
    return checkpoint.parent.parent


def save_tokenizer(folder: Path, meta: CheckpointMeta, positions: int, out_dir: Path) -> tuple[int, int, int]:
    """Write the run's tokenizer, ready for ``AutoTokenizer.from_pretrained(out_dir)``, and return its
    (bos, eos, pad) ids: the run folder's tokenizer.json, or for ``data.tokenizer=bytes`` (no file, 257
    tokens) a byte-level tokenizer with ramp's ids (:meth:`ByteTokenizer.to_tokenizers`). A run folder
    without a tokenizer.json of another vocabulary writes none: the ids are then all the checkpoint's
    end-of-document id.

    Raises:
        ConfigError: the run folder's tokenizer.json lacks the checkpoint's end-of-document token.
    """
    tokenizer = run_folder(folder) / "tokenizer.json"  # every data.tokenizer but bytes leaves one
    with tempfile.TemporaryDirectory() as scratch:
        if not tokenizer.is_file():
            byte_level = ByteTokenizer()
            if (meta.tokenizer_vocab, meta.eos_id) != (byte_level.vocab_size, byte_level.eos_id):
                return (meta.eos_id,) * 3
            tokenizer = Path(scratch) / "tokenizer.json"
            byte_level.to_tokenizers().save(str(tokenizer))
        tokens = special_tokens(tokenizer, meta.eos_id)
        _save_tokenizer(
            tokenizer, tokens, positions, out_dir, split_special=tokenizer.parent == Path(scratch)
        )
    return tokens.bos_id, tokens.eos_id, tokens.pad_id


def export(checkpoint: Path, out_dir: Path, dtype: str = "fp32") -> Start:
    """Write ``checkpoint``'s model (weights in ``dtype``, a key of :data:`DTYPES`), the run's tokenizer
    and a model card (:mod:`trainer.model_card`) as a Hugging Face folder ``out_dir``; returns the
    checkpoint written (:func:`find_checkpoint` chose it) and its metadata.

    Raises:
        ConfigError: ``out_dir`` is not empty, no usable checkpoint is found, or the run folder's
            tokenizer.json lacks the checkpoint's end-of-document token.
    """
    from trainer.model_card import write_model_card

    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"OUT_DIR {out_dir} is a file; choose a new folder (nothing was overwritten)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConfigError(f"OUT_DIR {out_dir} is not empty; choose a new folder (nothing was overwritten)")
    folder = find_checkpoint(checkpoint)
    model: Any = load_model(folder)  # a transformers model: its config, generation config, save_pretrained
    meta = read_meta(folder)
    parameters = sum(p.numel() for p in model.parameters())  # before the cast: the count, not the bytes
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = save_tokenizer(folder, meta, model.config.max_position_embeddings, out_dir)
    for config in (model.config, model.generation_config):
        if config is not None:
            config.bos_token_id, config.eos_token_id, config.pad_token_id = ids
    model = model.to(DTYPES[dtype])
    model.config.dtype = DTYPES[dtype]
    model.save_pretrained(out_dir, safe_serialization=True)
    _readable_as_umask_says(out_dir)
    write_model_card(Start(folder, meta), model.config, parameters, dtype, out_dir)
    return Start(folder, meta)


def _readable_as_umask_says(out_dir: Path) -> None:
    """Give every exported file the mode a new file gets here (0644 under umask 022): the weights file is
    written through a private temporary file (0600), which other users could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 (with one ``ramp: error:`` line) on bad input."""
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoints/step_<N> folder, or a run folder, its checkpoints folder or checkpoints/latest "
        "(their newest complete checkpoint)",
    )
    parser.add_argument("out_dir", type=Path, help="the Hugging Face model folder to write")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="the weights' type: fp32 as trained, or bf16"
    )
    args = parser.parse_args(argv)
    setup_logging(rank=0)
    # Everything here runs on the CPU. transformers' save_pretrained imports deepspeed (through accelerate)
    # whenever it is installed, which warns that it detected no GPU unless told the device.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar of shards written: ramp's one line says when it is done
    try:
        written = export(args.checkpoint, args.out_dir, args.dtype)
    except ConfigError as err:
        print(f"ramp: error: {err}", file=sys.stderr)
        return 2
    print(f"ramp | exported step {written.meta.step} ({written.path}) to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
