"""The model card's final validation loss as the run's metrics.jsonl records it, and the byte-level
tokenizer an export of a ``bytes`` run gets."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.data.tokenizer import ByteTokenizer
from trainer.model_card import final_val_loss


def test_the_last_evaluation_at_or_before_the_step_is_the_final_one(tmp_path: Path) -> None:
    records = [
        {"step": 2, "val_loss": 3.5},
        {"step": 4, "loss": 3.0},
        {"step": 4, "val_loss": 3.25},
        {"step": 6, "val_loss": 3.0},
        {"step": 4, "val_loss": 3.125},  # a resumed run evaluated step 4 again: the later record counts
    ]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "val'
    )
    assert final_val_loss(tmp_path, 4) == (4, 3.125)
    assert final_val_loss(tmp_path, 3) == (2, 3.5)
    assert final_val_loss(tmp_path, 1) is None
    assert final_val_loss(tmp_path / "elsewhere", 4) is None


def test_the_byte_level_tokenizer_gives_ramps_ids_and_decodes_back() -> None:
    ours = ByteTokenizer()
    theirs = ours.to_tokenizers()
    every_byte = bytes(range(128)).decode() + "é ü ÿ ¡ ¬ ® 😀 中文\n\t  x"
    for text in ("", " lead", "a\nb", "naïve café", every_byte):
        ids = theirs.encode(text, add_special_tokens=False).ids
        assert ids == ours.encode(text).tolist()
        assert theirs.decode(ids) == text
    assert theirs.get_vocab_size(with_added_tokens=True) == ours.vocab_size
    assert theirs.id_to_token(ours.eos_id) == "<|endoftext|>"
