"""``python -m trainer.export`` as a user runs it on a run folder: the newest checkpoint, a tokenizer
ready for padding and generation, identical logits, nothing on stderr; a folder without a checkpoint
refused in one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import checkpoint_meta, export_command
from trainer import checkpoint
from trainer.backends import build_backend
from trainer.config import Config
from trainer.data.tokenizer import train_bpe
from trainer.distributed import DistInfo
from trainer.export import load_model
from trainer.models import build_model
from trainer.observe import redact

CORPUS = [["def add(x, y):\n    return x + y\n", "for line in open('a.txt'):\n    print(line)\n"] * 20]


@pytest.fixture
def bpe_run(tmp_path: Path, small_config: Callable[..., Config], alone: DistInfo) -> Path:
    """A run folder as ``data.tokenizer=train`` leaves it: the trained BPE's tokenizer.json, and DDP
    checkpoints of a gpt2-tiny model over its vocabulary at steps 2 and 4 (saved as the loop saves them)."""
    cfg = small_config("data.tokenizer=train", "data.vocab_size=300")
    tokenizer = train_bpe(CORPUS, cfg.data.vocab_size)
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.json").write_text(tokenizer.to_json())
    meta = checkpoint_meta(0) | {
        "tokenizer_vocab": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "config": redact(cfg.to_dict()),
    }
    for step in (2, 4):
        torch.manual_seed(step)  # each checkpoint its own weights
        model = build_model(cfg.model, tokenizer_vocab=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
        backend = build_backend(cfg, model, alone)
        checkpoint.save(run / "checkpoints", step, alone, backend, meta, {}, keep=3)
    return run


def test_a_run_folder_exports_its_newest_checkpoint_with_a_ready_tokenizer(
    bpe_run: Path, tmp_path: Path, cache_dir: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    result = export_command(bpe_run, out, cache_dir)
    newest = bpe_run / "checkpoints" / "step_4"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ramp | exported step 4 ({newest}) to {out}\n"
    assert result.stderr == "", "a DDP export prints ramp's own line only (no DeepSpeed, no progress bar)"

    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == tokenizer.pad_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == config["eos_token_id"] == generation["eos_token_id"] == 0
    assert tokenizer.pad_token_id == config["pad_token_id"] == generation["pad_token_id"] == 0
    assert tokenizer.bos_token_id == config["bos_token_id"] == generation["bos_token_id"] == 0
    assert tokenizer.model_max_length == config["n_positions"] == 512
    batch = tokenizer(["a", "longer text"], padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    assert batch["input_ids"][0, lengths[0] :].eq(0).all()  # padded with the end-of-document token

    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, load_model(newest)(tokens).logits)
        assert not torch.equal(
            exported(tokens).logits, load_model(bpe_run / "checkpoints" / "step_2")(tokens).logits
        )


def test_a_folder_without_a_checkpoint_fails_in_one_line(tmp_path: Path, cache_dir: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    result = export_command(run, tmp_path / "hf", cache_dir)
    assert result.returncode == 2
    assert result.stderr == (
        f"ramp: error: CHECKPOINT {run} holds no complete checkpoint; pass a run folder (outputs/<run>), its "
        "checkpoints folder or a checkpoints/step_<N> folder\n"
    )
    assert result.stdout == ""
    assert not (tmp_path / "hf").exists()
