"""``python -m trainer.sample PATH``: print a few continuations of a prompt, to see what a model learned.

PATH is an export folder (``python -m trainer.export``'s), or what ``trainer.export`` takes: a run folder,
its ``checkpoints`` folder or a ``checkpoints/step_<N>`` folder (chosen as an export chooses it). The
model samples with transformers' ``generate`` and the run's tokenizer (``data.tokenizer=bytes`` too), as
nanoGPT's ``sample.py`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from trainer.errors import ConfigError
from trainer.export import find_checkpoint, load_model, save_tokenizer
from trainer.resume import read_meta

SEPARATOR = "-" * 40


def load(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an export folder or of the checkpoint ``path`` names, on the CPU.

    Raises:
        ConfigError: ``path`` does not exist, holds no usable checkpoint, or its run has no tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    folder = find_checkpoint(path)
    model: Any = load_model(folder)
    with tempfile.TemporaryDirectory() as scratch:
        save_tokenizer(folder, read_meta(folder), model.config.max_position_embeddings, Path(scratch))
        if not (Path(scratch) / "tokenizer.json").is_file():
            raise ConfigError(f"{path}: its run folder has no tokenizer.json to sample with; put it back")
        tokenizer = AutoTokenizer.from_pretrained(scratch)
    return model, tokenizer


def sample(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[str]:
    """``args.num_samples`` continuations of ``args.prompt`` (the end-of-document token when empty)."""
    torch.manual_seed(args.seed)
    prompt = tokenizer(args.prompt, return_tensors="pt")["input_ids"] if args.prompt else None
    if prompt is None or prompt.shape[1] == 0:
        prompt = torch.tensor([[tokenizer.eos_token_id]])
    room = model.config.max_position_embeddings - prompt.shape[1]
    with torch.no_grad():
        out = model.generate(
            prompt.repeat(args.num_samples, 1),
            attention_mask=torch.ones(args.num_samples, prompt.shape[1], dtype=torch.long),
            max_new_tokens=max(1, min(args.max_new_tokens, room)),
            do_sample=True,
            temperature=args.temperature,
            top_k=args.top_k,
            pad_token_id=tokenizer.pad_token_id,
        )
    return [tokenizer.decode(row[prompt.shape[1] :], skip_special_tokens=True) for row in out]


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(prog="python -m trainer.sample", description=__doc__.splitlines()[0])
    parser.add_argument(
        "path", type=Path, help="an export folder, a run folder or a checkpoints/step_<N> folder"
    )
    parser.add_argument("--prompt", default="", help="the text to continue (default: a new document)")
    parser.add_argument("--num-samples", type=int, default=3, help="how many continuations (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens each (default 100)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest (default 200)")
    parser.add_argument("--seed", type=int, default=1337, help="the sampling seed (default 1337)")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Refuse counts below 1 and a temperature of 0 or less.

    Raises:
        ConfigError: naming the argument to change.
    """
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.temperature <= 0:
        raise ConfigError("--num-samples and --max-new-tokens must be at least 1, --temperature above 0")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 (with one ``ramp: error:`` line) on bad input."""
    args = parse(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as trainer.export: no DeepSpeed GPU warning
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        check(args)
        model, tokenizer = load(args.path)
    except ConfigError as err:
        print(f"ramp: error: {err}", file=sys.stderr)
        return 2
    for text in sample(model, tokenizer, args):
        print(args.prompt + text)
        print(SEPARATOR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
